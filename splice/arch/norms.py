"""LayerNorm / RMSNorm modules of a stored model, found from the tensor names on disk."""

from __future__ import annotations

import re
from dataclasses import dataclass

from splice.tensors.checkpoint import Checkpoint

# Last module-name component of a normalisation layer across HF architectures:
# LayerNorm (BERT), layernorm_before/after (ViT), ln_1/ln_2/ln_f (GPT-2), input_layernorm, norm (Llama).
_NORM_MODULE = re.compile(r"(?i)(layer_?norm|(^|_)ln(_|$)|^ln_\w+$|(^|_)norm$|rms_?norm|^norm\d*$)")


@dataclass(frozen=True)
class NormModule:
    name: str  # module path as stored, e.g. "bert.encoder.layer.0.output.LayerNorm"
    size: int
    has_bias: bool


def find_norm_modules(checkpoint: Checkpoint) -> list[NormModule]:
    """Modules whose stored `weight` is 1-D and whose name marks a LayerNorm/RMSNorm, in storage order."""
    found = []
    for name, info in checkpoint.tensors.items():
        module, _, leaf = name.rpartition(".")
        if leaf not in ("weight", "gamma") or len(info.shape) != 1 or not info.dtype.is_floating_point:
            continue
        if _NORM_MODULE.search(module.rpartition(".")[2]):
            has_bias = f"{module}.bias" in checkpoint.tensors or f"{module}.beta" in checkpoint.tensors
            found.append(NormModule(module, info.shape[0], has_bias))
    return found


def norm_tensor_names(checkpoint: Checkpoint) -> list[str]:
    """The stored weight and bias tensors of every normalisation module."""
    names = []
    for module in find_norm_modules(checkpoint):
        names += [f"{module.name}.{leaf}" for leaf in ("weight", "gamma", "bias", "beta")
                  if f"{module.name}.{leaf}" in checkpoint.tensors]
    return names
