"""Apply patches to a base model, streamed: each base tensor is read, patched and written in turn."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
from typing_extensions import Unpack

from splice.adapters.compose import base_steps, patched_value
from splice.adapters.patch import PatchError
from splice.adapters.sources import PatchSource, load_patch, patch_location
from splice.options import RunKeywords, RunOptions, run_options
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.stream import Kernel, OutputExtras, StreamItem, StreamReport, run_stream, stream_to_memory
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
    items, kernel = patched_plan(patches, base_ckpt, allow_base_drift, check_bases, run.storage_options)
    return run_stream(
        items,
        kernel,
        out,
        side_files_from=base_ckpt,
        run=run,
        extras=OutputExtras(metadata, extra_files),
        description="applying patches",
    )


def patched_plan(
    patches: Sequence[PatchSource],
    base: Checkpoint,
    allow_base_drift: bool = False,
    check_bases: bool = True,
    storage_options: dict | None = None,
) -> tuple[list[StreamItem], Kernel]:
    """The plan and kernel of `base` with `patches` applied: every patch's base fingerprint checked (unless
    `check_bases` is False) and every overlap resolved before a tensor is read."""
    loaded = [load_patch(p, storage_options, base=base) for p in patches]
    for patch in loaded if check_bases else ():
        patch.check_base(base, allow_drift=allow_base_drift)
    plan = base_steps(loaded, base)

    def patched(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        return patched_value(tensors[0], plan.get(name, []))

    items = [
        StreamItem(OutputTensor(name, info.dtype, info.shape), ((base, name),)) for name, info in base.tensors.items()
    ]
    untouched = frozenset(name for name in base.tensors if name not in plan)
    return items, Kernel(patched, passes_through=untouched)


def patched_state(
    patches: Sequence[PatchSource], base: str | os.PathLike, *, check_bases: bool = True, run: RunOptions | None = None
) -> dict[str, torch.Tensor]:
    """The model `apply_patches(patches, base, ...)` would write, tensor for tensor, held in memory instead."""
    run = run or RunOptions()
    items, kernel = patched_plan(
        patches, Checkpoint.open(base, run.storage_options), False, check_bases, run.storage_options
    )
    return stream_to_memory(items, kernel, run=run, description="applying patches")
