"""Turn what a user has into a pushed registry version: a splice patch directory, a Patch, or a PEFT adapter
directory with the base model it was trained on (which maps its module names to stored tensor names and
gives the base fingerprint that the adapter itself does not record)."""

from __future__ import annotations

import os

from splice.adapters.compose import patch_steps
from splice.adapters.fingerprint import fingerprint_base
from splice.adapters.patch import Patch
from splice.adapters.sources import PatchSource, load_patch
from splice.registry.leases import DEFAULT_WAIT
from splice.registry.store import PushResult, Registry
from splice.tensors.checkpoint import Checkpoint


def publish_patch(registry: Registry, name: str, source: PatchSource, *, alias: str | None = None,
                  message: str = "", base: str | os.PathLike | None = None,
                  wait: float = DEFAULT_WAIT) -> PushResult:
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


def with_base_record(patch: Patch, base: Checkpoint) -> Patch:
    """`patch` with a fingerprint of the `base` tensors it touches where it has no record of its base; where it has
    one, `patch` itself, once `base` is checked to be the base it records."""
    if patch.meta.base is not None:
        patch.check_base(base)
        return patch
    fingerprint = fingerprint_base(base, patch_steps(patch).keys())
    return Patch(patch.tensors, patch.meta.model_copy(update={"base": fingerprint}))
