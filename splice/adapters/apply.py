"""Apply patches to a base model, streamed: each base tensor is read, patched and written in turn."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
from typing_extensions import Unpack

from splice.adapters.compose import check_plan_shapes, composition_plan, patched_value
from splice.adapters.patch import PatchError
from splice.adapters.sources import PatchSource, load_patch, patch_location
from splice.options import RunKeywords, RunOptions, run_options
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.stream import Kernel, OutputExtras, StreamItem, StreamReport, run_stream
from splice.tensors.writer import OutputTensor, ensure_output_free


def apply_patches(
    patches: Sequence[PatchSource],
    base: str | os.PathLike,
    out: str | os.PathLike,
    *,
    allow_base_drift: bool = False,
    metadata: dict[str, str] | None = None,
    extra_files: Mapping[str, bytes] | None = None,
    check_bases: bool = True,
    run: RunOptions | None = None,
    **run_keywords: Unpack[RunKeywords],
) -> StreamReport:
    """Write `base` with every patch applied in order: deltas, LoRA products and sparse deltas add, masks
    multiply, LayerNorm patches replace. Every patch's base fingerprint is checked and every overlap
    resolved before the first tensor is written; patch tensors are read as their base tensor streams by.
    `metadata` goes into every shard's header and `extra_files` (name -> content) beside the weights.
    `check_bases=False` skips the fingerprint checks (for a caller that has just made them). `run` (or its
    fields as keywords: device, shard_size, force, progress, storage_options, ...) says how the run runs."""
    run = run_options(run, run_keywords, "apply_patches")
    sources = [patch_location(p) for p in patches]
    ensure_output_free(out, run.force, protected=[base, *(s for s in sources if s is not None)])
    if not patches:
        raise PatchError("no patches given")
    base_ckpt = Checkpoint.open(base, run.storage_options)
    loaded = [load_patch(p, run.storage_options, base=base_ckpt) for p in patches]
    for patch in loaded if check_bases else ():
        patch.check_base(base_ckpt, allow_drift=allow_base_drift)
    plan = composition_plan(loaded)
    check_plan_shapes(
        plan, lambda name: base_ckpt.tensors[name].shape if name in base_ckpt.tensors else None, str(base)
    )

    def patched(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        return patched_value(tensors[0], plan.get(name, []))

    items = [
        StreamItem(OutputTensor(name, info.dtype, info.shape), ((base_ckpt, name),))
        for name, info in base_ckpt.tensors.items()
    ]
    untouched = frozenset(name for name in base_ckpt.tensors if name not in plan)
    return run_stream(
        items,
        Kernel(patched, passes_through=untouched),
        out,
        side_files_from=base_ckpt,
        run=run,
        extras=OutputExtras(metadata, extra_files),
        description="applying patches",
    )
