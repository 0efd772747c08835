"""Delta patches: tuned - base for every float tensor that changed, added to the base."""

from __future__ import annotations

from splice.adapters.deltas import Extracted, deltas
from splice.adapters.kinds.spec import KindSpec, describe_plain, scale_tensors
from splice.adapters.steps import add_steps
from splice.errors import PatchError
from splice.progress import Progress
from splice.tensors.checkpoint import Checkpoint


def extract_delta(
    base: Checkpoint, tuned: Checkpoint, options: None = None, device: str = "auto", progress: Progress | None = None
) -> Extracted:
    tensors = {name: delta.cpu() for name, delta in deltas(base, tuned, progress=progress)}
    if not tensors:
        raise PatchError(f"{tuned.location} is identical to {base.location}: the delta would be empty")
    return Extracted(tensors, list(tensors), sorted(tensors))


SPEC = KindSpec(
    extract=extract_delta,
    steps=add_steps,
    describe=describe_plain,
    rescale=lambda patch, scale: scale_tensors(patch, scale, set(patch.tensors)),
)
