"""`fuse`: validate the options, plan the models, align each one onto the anchor, average, write.

For each model other than the anchor, the description is walked in data-flow order with one transport map per
space (`align.py`, `maps.py`). The aligned models and the anchor are then averaged with weights 1/N (for N > 2
this is the authors' average of the N-1 pairwise fusions). Models of other widths are aligned into the anchor's
width, so the output always has the anchor's shapes and config.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from splice.errors import SpliceError
from splice.merge.fusion.activations import BATCH_SIZE, Inputs, build_model, collect, load_inputs
from splice.merge.fusion.align import PairAligner
from splice.merge.fusion.architectures import STREAM, Source
from splice.merge.fusion.maps import Pair, Tensors
from splice.merge.fusion.options import RUN_FIELDS, FusionOptions
from splice.merge.fusion.plan import ModelPlan, plan
from splice.merge.fusion.report import FusionReport, MapStat
from splice.merge.fusion.streams import hooked_modules, stream_magnitudes, stream_sources, stream_taps
from splice.merge.fusion.timing import Clock
from splice.options import RunOptions, run_options, split_run_keywords
from splice.progress import Progress
from splice.tensors.device import resolve_device
from splice.tensors.stream import read_floats, refuse_new_non_finite_state
from splice.tensors.writer import copy_side_files, ensure_output_free, staged_output, write_state_dict

EMD_ON_CPU = (
    "exact OT (POT's network simplex) runs on the CPU: costs are built on {device}, copied to the CPU "
    "for each EMD solve and the map copied back"
)


def fuse(
    models: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    options: FusionOptions | None = None,
    *,
    run: RunOptions | None = None,
    **keywords: Any,
) -> FusionReport:
    """Fuse transformers with optimal transport (Imfeld et al., ICLR 2024) into the anchor's shape.

    models: two or more model directories (or fsspec URLs) of one supported architecture and depth
      (ViTModel, ViTForImageClassification, BertModel, BertForSequenceClassification, GPT2Model,
      GPT2LMHeadModel); their widths (hidden size, MLP size, heads) may differ: the output has the anchor's.
    options: a `FusionOptions`; any of its fields may also be given as keywords (`data=..., align="weights"`),
      which override `options`' (an unknown keyword is an error). What they mean is `FusionOptions`' docstring.
    run: a `RunOptions` (or its fields as keywords: device, shard_size, force, progress, storage_options); its
      progress is told when the activations of each model are collected (batches) and when each model's
      transport maps are made (maps).
    The fused model is written with the anchor's config and side files, and `fusion_report.json` beside it;
    the report's `timings` splits the wall time into reading, activations, OT (points, costs, solves),
    transport (aligning and averaging weights) and writing.
    """
    started = time.perf_counter()
    given, keywords = split_run_keywords(keywords, keep=RUN_FIELDS)
    options = FusionOptions.of(options, keywords)
    run = run_options(run, {**given, **options.run_keywords()}, "fuse")
    options.check_models(len(models))
    ensure_output_free(out, run.force, protected=models)
    plans = plan(models, run.storage_options)
    base = plans[options.anchor]
    if options.residual == "identity" and any(p.widths[STREAM] != base.widths[STREAM] for p in plans):
        raise SpliceError("`residual='identity'` needs models of the same hidden size")
    sources = stream_sources(base) if options.weighted else {}
    inputs: Inputs | None = None
    if options.needs_inputs and options.data is not None:  # (FusionOptions refuses needing inputs without data)
        inputs = load_inputs(options.data, options.samples, base.location)
    clock = Clock(resolve_device(run.device))
    with torch.no_grad():
        fused, stats, tokens = _fuse_tensors(plans, sources, inputs, options, clock, run.reporter)
    report = _report(out, plans, options, inputs, tokens, clock.device, stats)
    refuse_new_non_finite_state(fused, [p.checkpoint for p in plans])
    with staged_output(out, run.force) as staging:
        with clock.timed("write"):
            write_state_dict(staging, fused, run.shard_size, {"splice_merge_method": "ot fusion"})
            copy_side_files(base.checkpoint, staging)
        report.seconds = time.perf_counter() - started
        report.timings = clock.rounded(report.seconds)
        report.save(staging)
    return report


def _fuse_tensors(
    plans: list[ModelPlan],
    sources: dict[str, list[Source]],
    inputs: Inputs | None,
    options: FusionOptions,
    clock: Clock,
    progress: Progress,
) -> tuple[Tensors, list[MapStat], int]:
    """(the fused tensors on the CPU in the anchor's dtypes, the maps' statistics, activation rows per neuron)."""
    base = plans[options.anchor]
    modules = hooked_modules(base, options.align, options.residual)  # compared between the models
    streams = {source.name for found in sources.values() for source in found if source.kind == "output"}
    entering = {source.name for found in sources.values() for source in found if source.kind == "input"}
    taps = set(stream_taps(base)) if options.residual == "stream" else set()
    with clock.timed("read"):
        state_a = read_floats(base.checkpoint, clock.device)
    with clock.timed("activations"):
        feats_a = _activations(
            base, state_a, inputs, options.tokens, clock.device, modules | streams, entering | taps, progress
        )
        magnitudes = stream_magnitudes(sources, feats_a or {}, state_a) if options.weighted else {}
    with clock.timed("transport"):
        total = {name: tensor.clone() for name, tensor in state_a.items() if name not in base.copied}
    stats: list[MapStat] = []
    for index, model in enumerate(plans):
        if index == options.anchor:
            continue
        with clock.timed("read"):
            state_m = read_floats(model.checkpoint, clock.device)
        with clock.timed("activations"):
            feats_m = _activations(
                model,
                state_m,
                inputs if options.align == "activations" else None,
                options.tokens,
                clock.device,
                modules,
                taps,
                progress,
            )
        pair = Pair(index, model, base, state_m, state_a, feats_m, feats_a, magnitudes)
        solving = clock.seconds["ot"]
        with clock.timed("transport"):  # the aligner charges its solves to "ot": taken out below
            aligned, model_stats = PairAligner(pair, options, clock).run(progress)
            for name in total:
                total[name] += aligned[name]
        clock.seconds["transport"] -= clock.seconds["ot"] - solving
        stats.extend(model_stats)
        del state_m, feats_m, aligned, pair
    with clock.timed("transport"):
        fused = {
            name: (total[name] / len(plans) if name in total else state_a[name]).to(dtype=info.dtype, device="cpu")
            for name, info in base.checkpoint.tensors.items()
        }
    return fused, stats, max(len(acts) for acts in feats_a.values()) if feats_a else 0


def _activations(
    model: ModelPlan,
    state: Tensors,
    inputs: Inputs | None,
    tokens: int,
    device: torch.device,
    modules: set[str],
    inputs_of: set[str],
    progress: Progress,
) -> Tensors | None:
    if inputs is None or not (modules or inputs_of):
        return None
    live = build_model(model.class_name, model.config, state, device, model.location)
    progress.start(f"activations {model.location}", inputs.batches(BATCH_SIZE), inputs.nbytes(), unit="batches")
    try:
        return collect(live, modules, inputs, tokens, device, inputs_of, progress)
    finally:
        progress.finish()
        del live


def _model_widths(model: ModelPlan) -> dict[str, int]:
    widths = {"hidden": model.widths[STREAM], "heads": model.heads}
    mlp = model.widths.get("layer 0/mlp")
    if mlp is not None:
        widths["intermediate"] = mlp
    return widths


def _report(
    out: str | os.PathLike,
    plans: list[ModelPlan],
    options: FusionOptions,
    inputs: Inputs | None,
    tokens: int,
    device: torch.device,
    stats: list[MapStat],
) -> FusionReport:
    notes = []
    if device.type != "cpu" and options.solver == "emd" and stats:
        notes.append(EMD_ON_CPU.format(device=device))
    return FusionReport(
        out=Path(out),
        architecture=plans[options.anchor].class_name,
        models=[p.location for p in plans],
        anchor=options.anchor,
        align=options.align,
        solver=options.solver,
        reg=options.reg if options.solver == "sinkhorn" else None,
        residual=options.residual,
        qk=options.qk,
        heads=options.heads,
        samples=inputs.count if inputs else 0,
        tokens=tokens,
        widths=[_model_widths(p) for p in plans],
        device=str(device),
        maps=stats,
        notes=notes,
    )
