"""Extract a patch from a base model and its fine-tune, reading both tensor by tensor."""

from __future__ import annotations

import os

from splice.adapters.layernorm import norm_tensor_names
from splice.adapters.patch import Patch, PatchError, PatchKind, PatchMeta, fingerprint_base
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.stream import check_same_tensors


def extract_patch(base: str | os.PathLike, tuned: str | os.PathLike, kind: PatchKind | str,
                  storage_options: dict | None = None, description: str = "") -> Patch:
    """layernorm: the tuned model's LayerNorm/RMSNorm weights and biases (absolute values, replacing the
    base's); delta: tuned - base for every float tensor that changed."""
    try:
        kind = PatchKind(kind)
    except ValueError:
        raise PatchError(f"unknown patch kind {kind!r}; use one of {', '.join(k.value for k in PatchKind)}") from None
    base_ckpt = Checkpoint.open(base, storage_options)
    tuned_ckpt = Checkpoint.open(tuned, storage_options)
    check_same_tensors([base_ckpt, tuned_ckpt])
    if kind is PatchKind.layernorm:
        names = norm_tensor_names(tuned_ckpt)
        if not names:
            raise PatchError(f"{tuned}: no LayerNorm or RMSNorm modules found; try --kind delta")
        tensors = {name: tuned_ckpt.read(name) for name in names}
    elif kind is PatchKind.delta:
        tensors = {}
        for name, info in base_ckpt.tensors.items():
            if not info.dtype.is_floating_point:
                continue
            delta = tuned_ckpt.read(name).float() - base_ckpt.read(name).float()
            if delta.any():
                tensors[name] = delta
        if not tensors:
            raise PatchError(f"{tuned} is identical to {base}: the delta would be empty")
    else:
        raise PatchError(f"--kind {kind.value} extraction is not available yet; use layernorm or delta")
    targets = sorted({name.rpartition(".")[0] for name in tensors}) if kind is PatchKind.layernorm else sorted(tensors)
    meta = PatchMeta(kind=kind, targets=targets, base=fingerprint_base(base_ckpt, tensors),
                     lineage=[str(base), str(tuned)], description=description)
    return Patch(tensors, meta)
