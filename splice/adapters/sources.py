"""Where a patch comes from: a Patch object, a splice patch directory or URL, or a PEFT adapter directory."""

from __future__ import annotations

import os

import torch

from splice.adapters.patch import Patch
from splice.adapters.peft.read import is_peft_adapter, load_peft_adapter
from splice.tensors.checkpoint import Checkpoint

PatchSource = Patch | str | os.PathLike


def patch_location(patch: PatchSource) -> str | os.PathLike | None:
    """Where a patch was read from (None: made in memory)."""
    return patch.stored_at if isinstance(patch, Patch) else patch


def load_patch(
    patch: PatchSource, storage_options: dict | None = None, base: Checkpoint | torch.nn.Module | None = None
) -> Patch:
    """A Patch as given, or loaded from a splice patch directory or a PEFT adapter directory. `base` (the
    stored or live model it will be applied to) lets a PEFT adapter's module names be mapped to stored names."""
    if isinstance(patch, Patch):
        return patch
    if is_peft_adapter(patch, storage_options):
        return load_peft_adapter(patch, storage_options, base=base)
    return Patch.load(patch, storage_options)
