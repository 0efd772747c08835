"""`merge_method: regmean_plusplus` as a recipe runs it: each model's `data` hook loaded (at most `samples` inputs),
the block walk (`walk.regmean_plusplus`) run, and its parts written through the output rule in walk order (or held
in memory for a sweep), every float output refused if it holds NaN/Inf where its inputs held none."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch

from splice.merge.fusion.activations import load_inputs
from splice.merge.stats.datamerge import DataMergeReport, LayerSolve
from splice.merge.stats.walk import Partition, regmean_plusplus
from splice.options import RunOptions
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.safetensors import OutputTensor
from splice.tensors.stream import (
    OutputExtras,
    StreamReport,
    WriteBehind,
    publish_model,
    read_where_held,
    refuse_new_non_finite,
)

METHOD = "regmean_plusplus"


@dataclass(frozen=True)
class WalkRequest:
    """What a regmean_plusplus recipe asks: its models, each model's `data` hook and weight, the shrinkage and how
    many inputs each hook gives at most."""

    checkpoints: Sequence[Checkpoint]
    data: Sequence[str]
    weights: Sequence[float]
    alpha: float
    samples: int


def write_regmean_plusplus(
    request: WalkRequest,
    out: str | os.PathLike,
    *,
    side_files_from: Checkpoint,
    run: RunOptions,
    out_dtype: torch.dtype | None,
    extras: OutputExtras,
) -> StreamReport:
    """The merge written to `out` (its side files those of `side_files_from`), with its report."""
    outputs = _outputs(request.checkpoints, out_dtype)
    solves: list[LayerSolve] = []
    averaged: list[str] = []

    def produce(behind: WriteBehind) -> None:
        for name, tensor in _tensors(request, outputs, run, solves, averaged):
            behind.submit(name, tensor)

    reads = sum(c.total_bytes for c in request.checkpoints)
    written = publish_model(
        outputs,
        produce,
        out,
        side_files_from=side_files_from,
        run=run,
        out_dtype=out_dtype,
        extras=extras,
        bytes_read=reads,
    )
    return replace(written, method_report=_report(solves, averaged))


def regmean_plusplus_state(
    request: WalkRequest, run: RunOptions, out_dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """The merge `write_regmean_plusplus` would write, held in memory."""
    outputs = _outputs(request.checkpoints, out_dtype)
    return dict(_tensors(request, outputs, run, [], []))


def _outputs(checkpoints: Sequence[Checkpoint], out_dtype: torch.dtype | None) -> list[OutputTensor]:
    """The output tensors in walk order (before the blocks, block by block, after them)."""
    first = checkpoints[0]
    partition = Partition.of(list(first.tensors), first.location)
    order = [*partition.before, *(name for block in partition.blocks for name in block), *partition.after]
    outputs = []
    for name in order:
        info = first.tensors[name]
        floating = info.dtype.is_floating_point
        outputs.append(OutputTensor(name, out_dtype if out_dtype is not None and floating else info.dtype, info.shape))
    return outputs


def _tensors(
    request: WalkRequest,
    outputs: Sequence[OutputTensor],
    run: RunOptions,
    solves: list[LayerSolve],
    averaged: list[str],
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, merged tensor in its output dtype), in `outputs`' order, as the walk makes them."""
    inputs = [
        load_inputs(data, request.samples, checkpoint.location)
        for data, checkpoint in zip(request.data, request.checkpoints)
    ]
    parts = regmean_plusplus(request.checkpoints, inputs, request.alpha, request.weights, run.device, run.progress)
    position = 0
    for part in parts:
        for output in outputs[position : position + len(part.tensors)]:
            tensor = part.tensors[output.name].to(output.dtype)
            if tensor.is_floating_point():
                refuse_new_non_finite(output.name, tensor, partial(read_where_held, output.name, request.checkpoints))
            yield output.name, tensor
        position += len(part.tensors)
        solves.extend(part.solved)
        averaged.extend(part.averaged)


def _report(solves: Sequence[LayerSolve], averaged: Sequence[str]) -> DataMergeReport:
    return DataMergeReport(METHOD, {"regmean": len(solves), "fallback": len(averaged)}, tuple(solves))
