"""Turn what a user has into a pushed registry version: a splice patch directory, a Patch, or a PEFT adapter
directory with the base model it was trained on (which maps its module names to stored tensor names and
gives the base fingerprint that the adapter itself does not record)."""

from __future__ import annotations

import os

from splice.adapters.compose import with_base_record
from splice.adapters.sources import PatchSource, load_patch
from splice.registry.leases import DEFAULT_WAIT
from splice.registry.store import PushResult, Registry
from splice.tensors.checkpoint import Checkpoint


def publish_patch(
    registry: Registry,
    name: str,
    source: PatchSource,
    *,
    alias: str | None = None,
    message: str = "",
    base: str | os.PathLike | None = None,
    wait: float = DEFAULT_WAIT,
) -> PushResult:
    """Push `source` as the next version of `name`. A patch without a record of its base (a PEFT adapter)
    needs `base`, whose tensors it touches are fingerprinted; a patch with one is checked against `base` when
    given."""
    registry.check_push(name, alias, wait)
    if base is None:
        patch = load_patch(source)
    else:
        with Checkpoint.open(base) as checkpoint:
            patch = with_base_record(load_patch(source, base=checkpoint), checkpoint)
    return registry.push(name, patch, alias=alias, message=message, wait=wait)
