"""LayerNorm patches: the tuned model's LayerNorm / RMSNorm weights and biases, replacing the base's."""

from __future__ import annotations

from splice.adapters.deltas import Extracted
from splice.adapters.kinds.spec import KindSpec, describe_plain, keep_as_is
from splice.adapters.steps import replace_steps
from splice.arch.norms import norm_tensor_names
from splice.errors import PatchError
from splice.progress import Progress
from splice.tensors.checkpoint import Checkpoint


def extract_layernorm(base: Checkpoint, tuned: Checkpoint, options: None = None,
                      device: str = "auto", progress: Progress | None = None) -> Extracted:
    names = norm_tensor_names(tuned)
    if not names:
        raise PatchError(f"{tuned.location}: no LayerNorm or RMSNorm modules found; try --kind delta")
    return Extracted({name: tuned.read(name) for name in names}, names, sorted({n.rpartition(".")[0] for n in names}))


SPEC = KindSpec(extract=extract_layernorm, steps=replace_steps, describe=describe_plain, rescale=keep_as_is)
