"""What a norm is, defined once: the LayerNorm / RMSNorm modules of a model, found from the names its tensors are
stored under, for a checkpoint on disk (the LayerNorm patch kind) and for a loaded model (LayerNormBank) alike."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from splice.arch.names import stored_to_module_names
from splice.tensors.checkpoint import Checkpoint

# Last module-name component of a normalisation layer across HF architectures:
# LayerNorm (BERT), layernorm_before/after (ViT), ln_1/ln_2/ln_f (GPT-2), input_layernorm, norm (Llama),
# layer_norm, final_layer_norm (T5).
_NORM_MODULE = re.compile(r"(?i)(layer_?norm|(^|_)ln(_|$)|^ln_\w+$|(^|_)norm$|rms_?norm|^norm\d*$)")
_WEIGHT_LEAVES = ("weight", "gamma")


@dataclass(frozen=True)
class NormModule:
    name: str  # module path as stored, e.g. "bert.encoder.layer.0.output.LayerNorm"
    size: int
    has_bias: bool


def is_norm_weight(name: str, shape: Sequence[int], floating: bool) -> bool:
    """Whether the tensor stored as `name` is a norm's scale: a 1-D floating-point `weight` (or `gamma`) of a module
    whose name marks a LayerNorm / RMSNorm."""
    module, _, leaf = name.rpartition(".")
    return (
        leaf in _WEIGHT_LEAVES and len(shape) == 1 and floating and bool(_NORM_MODULE.search(module.rpartition(".")[2]))
    )


def find_norm_modules(checkpoint: Checkpoint) -> list[NormModule]:
    """The norms of a stored model (`is_norm_weight` on its tensors), in storage order."""
    found = []
    for name, info in checkpoint.tensors.items():
        if is_norm_weight(name, info.shape, info.dtype.is_floating_point):
            module = name.rpartition(".")[0]
            has_bias = f"{module}.bias" in checkpoint.tensors or f"{module}.beta" in checkpoint.tensors
            found.append(NormModule(module, info.shape[0], has_bias))
    return found


def norm_tensor_names(checkpoint: Checkpoint) -> list[str]:
    """The stored weight and bias tensors of every normalisation module."""
    names = []
    for module in find_norm_modules(checkpoint):
        names += [
            f"{module.name}.{leaf}"
            for leaf in ("weight", "gamma", "bias", "beta")
            if f"{module.name}.{leaf}" in checkpoint.tensors
        ]
    return names


def loaded_norm_modules(model: torch.nn.Module) -> list[str]:
    """The norms of a loaded model, as module names, in module order: the modules whose `weight` Parameter is a
    norm's scale (`is_norm_weight`) under the name it is stored as, so they are the norms `find_norm_modules` finds
    in the model's saved checkpoint."""
    stored = {module: name for name, module in stored_to_module_names(model).items()}
    found = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        stored_name = stored.get(f"{name}.weight" if name else "weight")
        if (
            isinstance(weight, torch.nn.Parameter)
            and stored_name is not None
            and is_norm_weight(stored_name, weight.shape, weight.is_floating_point())
        ):
            found.append(name)
    return found
