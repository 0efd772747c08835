"""Extract a patch from a base model and its fine-tune, reading both tensor by tensor."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from splice.adapters.fingerprint import fingerprint_base
from splice.adapters.patch import Patch, PatchError, PatchKind, PatchMeta
from splice.arch.norms import norm_tensor_names
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.device import resolve_device
from splice.tensors.stream import check_same_tensors, read_ahead


@dataclass
class Extracted:
    """What one kind's extractor found: the patch tensors, the base tensors they change, their settings."""

    tensors: dict[str, torch.Tensor]
    touched: list[str]  # base tensors the patch changes (fingerprinted)
    targets: list[str]  # what a user reads as "the targets": modules or tensors
    settings: dict[str, Any] = field(default_factory=dict)


def deltas(base: Checkpoint, tuned: Checkpoint, device: torch.device | None = None
           ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tuned - base in fp32) for every float tensor that changed, in storage order, read ahead."""
    names = [name for name, info in base.tensors.items() if info.dtype.is_floating_point]
    reads = [((base, name, None), (tuned, name, None)) for name in names]
    for position, (before, after) in read_ahead(reads, depth=2):
        delta = after.to(device=device, dtype=torch.float32) - before.to(device=device, dtype=torch.float32)
        if delta.any():
            yield names[position], delta


def _layernorm(base: Checkpoint, tuned: Checkpoint) -> Extracted:
    names = norm_tensor_names(tuned)
    if not names:
        raise PatchError(f"{tuned.location}: no LayerNorm or RMSNorm modules found; try --kind delta")
    return Extracted({name: tuned.read(name) for name in names}, names, sorted({n.rpartition(".")[0] for n in names}))


def _delta(base: Checkpoint, tuned: Checkpoint) -> Extracted:
    tensors = {name: delta.cpu() for name, delta in deltas(base, tuned)}
    if not tensors:
        raise PatchError(f"{tuned.location} is identical to {base.location}: the delta would be empty")
    return Extracted(tensors, list(tensors), sorted(tensors))


def extract_patch(base: str | os.PathLike, tuned: str | os.PathLike, kind: PatchKind | str,
                  storage_options: dict | None = None, description: str = "", *, rank: int | None = None,
                  energy: float | None = None, rslora: bool = False, density: float | None = None,
                  mask_scope: str = "tensor", mask_values: bool = True, device: str = "auto") -> Patch:
    """layernorm: the tuned model's LayerNorm/RMSNorm weights and biases (absolute values, replacing the
    base's); delta: tuned - base for every float tensor that changed; lora: a truncated SVD of each changed
    matrix's delta (`rank`, or the smallest rank keeping `energy` of it); mask: the top `density` share of
    |delta| per tensor or over the whole model (`mask_scope`), with the selected values unless `mask_values`
    is False."""
    try:
        kind = PatchKind(kind)
    except ValueError:
        raise PatchError(f"unknown patch kind {kind!r}; use one of {', '.join(k.value for k in PatchKind)}") from None
    base_ckpt = Checkpoint.open(base, storage_options)
    tuned_ckpt = Checkpoint.open(tuned, storage_options)
    check_same_tensors([base_ckpt, tuned_ckpt])
    if kind is PatchKind.layernorm:
        found = _layernorm(base_ckpt, tuned_ckpt)
    elif kind is PatchKind.delta:
        found = _delta(base_ckpt, tuned_ckpt)
    elif kind is PatchKind.lora:
        from splice.adapters.kinds.lora import extract_lora

        found = extract_lora(base_ckpt, tuned_ckpt, rank=rank, energy=energy, rslora=rslora,
                             device=resolve_device(device))
    else:
        from splice.adapters.kinds.mask import extract_mask

        found = extract_mask(base_ckpt, tuned_ckpt, density=density, scope=mask_scope, values=mask_values,
                             device=resolve_device(device))
    meta = PatchMeta(kind=kind, targets=found.targets, base=fingerprint_base(base_ckpt, found.touched),
                     lineage=[str(base), str(tuned)], description=description, settings=found.settings)
    return Patch(found.tensors, meta)
