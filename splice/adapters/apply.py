"""Apply patches to a base model, streamed: each base tensor is read, patched and written in turn."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from splice.adapters.patch import Patch, PatchError, PatchKind
from splice.progress import Progress
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.stream import StreamItem, StreamReport, run_stream
from splice.tensors.writer import DEFAULT_SHARD_SIZE, OutputTensor, ensure_output_free

REPLACING = {PatchKind.layernorm}
ADDING = {PatchKind.delta}


def _as_patch(patch: Patch | str | os.PathLike, storage_options: dict | None) -> Patch:
    return patch if isinstance(patch, Patch) else Patch.load(patch, storage_options)


def composition_plan(patches: Sequence[Patch]) -> dict[str, list[tuple[PatchKind, torch.Tensor]]]:
    """Per base tensor, the patch tensors to apply in order; refuses overlaps that do not compose."""
    plan: dict[str, list[tuple[PatchKind, torch.Tensor]]] = {}
    for index, patch in enumerate(patches):
        if patch.meta.kind not in REPLACING | ADDING:
            raise PatchError(f"applying {patch.meta.kind.value} patches is not available yet")
        for name, tensor in patch.tensors.items():
            earlier = plan.setdefault(name, [])
            if earlier and (patch.meta.kind in REPLACING or any(k in REPLACING for k, _ in earlier)):
                raise PatchError(f"patch {index + 1} ({patch.meta.kind.value}) and an earlier one both change "
                                 f"{name}, and a replacement does not compose with another change; apply one of them")
            earlier.append((patch.meta.kind, tensor))
    return plan


def patched_value(value: torch.Tensor, steps: list[tuple[PatchKind, torch.Tensor]]) -> torch.Tensor:
    """A base tensor after its patch steps: replacements take the patch's value, deltas add."""
    for kind, tensor in steps:
        tensor = tensor.to(device=value.device, dtype=value.dtype)
        value = tensor if kind in REPLACING else value + tensor
    return value


def apply_patches(patches: Sequence[Patch | str | os.PathLike], base: str | os.PathLike, out: str | os.PathLike, *,
                  allow_base_drift: bool = False, device: str = "auto", shard_size: int = DEFAULT_SHARD_SIZE,
                  force: bool = False, progress: Progress | None = None, storage_options: dict | None = None
                  ) -> StreamReport:
    """Write `base` with every patch applied: deltas add, LayerNorm patches replace. Every patch's base
    fingerprint is checked and every overlap resolved before the first tensor is written."""
    ensure_output_free(out, force)
    loaded = [_as_patch(p, storage_options) for p in patches]
    if not loaded:
        raise PatchError("no patches given")
    base_ckpt = Checkpoint.open(base, storage_options)
    for patch in loaded:
        patch.check_base(base_ckpt, allow_drift=allow_base_drift)
    plan = composition_plan(loaded)
    for name, steps in plan.items():
        info = base_ckpt.tensors.get(name)
        if info is None:
            raise PatchError(f"{base}: has no tensor {name}, which a patch changes")
        for _, tensor in steps:
            if tuple(tensor.shape) != info.shape:
                raise PatchError(f"patch tensor {name} has shape {list(tensor.shape)}, base has {list(info.shape)}")

    def patched(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        return patched_value(tensors[0], plan.get(name, []))

    items = [StreamItem(OutputTensor(name, info.dtype, info.shape), ((base_ckpt, name),))
             for name, info in base_ckpt.tensors.items()]
    return run_stream(items, patched, out, side_files_from=base_ckpt, device=device, shard_size=shard_size,
                      force=force, progress=progress, description="applying patches")
