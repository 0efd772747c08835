"""A base model read with a patch applied on the fly (a recipe's `base+lora`): the stream reads it as a model.

Nothing is materialised: each tensor the patch changes is computed when it is read (W + scale * B @ A for a LoRA,
a block of rows from the same rows of W and B), through the steps `apply_patches` runs; the others, and the side
files, are the base's.
"""

from __future__ import annotations

import torch

from splice.adapters.compose import base_steps, computes_rows, patched_value
from splice.adapters.fingerprint import refuse_drift
from splice.adapters.sources import PatchSource, load_patch, patch_location
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.stream import Rows
from splice.tensors.views import DerivedCheckpoint


def patched_checkpoint(
    base: Checkpoint, patch: PatchSource, storage_options: dict | None = None, location: str | None = None
) -> DerivedCheckpoint:
    """`base` as it reads with `patch` (a PEFT adapter or a splice patch) applied, each changed tensor in its stored
    dtype, as if the patched model had been saved; the patch is checked against `base` (the base it records, or
    the names and shapes of a PEFT adapter) before any tensor is read. `location` names the view in messages."""
    loaded = load_patch(patch, storage_options, base=base)
    refuse_drift(loaded.check_base(base, allow_drift=True), base.location, loaded.meta.kind.value, None)
    plan = base_steps([loaded], base)

    def derive(name: str, rows: Rows) -> torch.Tensor:
        steps = plan[name]
        whole = rows is not None and not computes_rows(steps)  # a step that needs the whole tensor (a packed mask)
        read = None if whole else rows
        value = base.read(name, read)
        working = value.to(torch.float32, copy=True) if value.is_floating_point() else value.clone()
        patched = patched_value(working, steps, read)
        if whole:
            assert rows is not None
            patched = patched[rows[0] : rows[1]]
        return patched.to(value.dtype)

    where = patch_location(patch)
    adapter = [Checkpoint.files_of(where, storage_options)] if where is not None else []
    return DerivedCheckpoint(base, {name: base.tensors[name] for name in plan}, derive, location, derived_from=adapter)
