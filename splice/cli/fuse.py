"""`splice fuse MODEL_A MODEL_B [MODEL_C...] --out DIR --data MODULE:FUNCTION`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from splice.cli import render
from splice.cli.options import Out, Shared, shared_options

if TYPE_CHECKING:
    from splice.merge.fusion import FusionReport

LAYER_COLUMNS = [
    "model",
    "layer",
    "maps",
    "mean transport cost",
    "min permutation closeness",
    "cross-head mass",
    "head-split mass",
]


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def layer_rows(report: FusionReport) -> list[list[object]]:
    return [
        [
            report.models[layer.model],
            layer.layer,
            layer.maps,
            _number(layer.cost),
            _number(layer.permutation_closeness),
            _number(layer.cross_head_mass),
            _number(layer.head_split_mass),
        ]
        for layer in report.layers
    ]


@shared_options()
def fuse_command(
    models: Annotated[
        list[str],
        typer.Argument(
            help="Two or more model directories or fsspec URLs of one architecture and depth (widths may differ)."
        ),
    ],
    out: Out,
    data: Annotated[
        str | None,
        typer.Option(
            help="MODULE:FUNCTION or file.py:FUNCTION returning a batch of model inputs (dict of tensors) for "
            "activation alignment; a function taking an argument gets the anchor's directory."
        ),
    ] = None,
    align: Annotated[str, typer.Option(help="activations or weights: what neurons are compared by.")] = "activations",
    solver: Annotated[str, typer.Option(help="emd (exact, hard maps) or sinkhorn (soft, with --reg).")] = "emd",
    reg: Annotated[float, typer.Option(help="Sinkhorn entropic regularisation on max-normalised costs.")] = 0.08,
    anchor: Annotated[int, typer.Option(help="Index of the model whose width, order and config are kept.")] = 0,
    samples: Annotated[int, typer.Option(help="Inputs from --data used for activations.")] = 200,
    tokens: Annotated[int, typer.Option(help="Token positions sampled per neuron (bounds memory and time).")] = 4096,
    residual: Annotated[
        str,
        typer.Option(
            help="Maps at residual adds: average, skip, branch, identity, or weighted by the anchor's mean "
            "|activation| of each stream: weighted_scalar (per stream) or weighted_matrix (per stream and neuron; "
            "both need --data), or stream: one map for the whole residual stream from its activations (beyond the "
            "paper)."
        ),
    ] = "average",
    qk: Annotated[
        str,
        typer.Option(
            help="Queries and keys: separate maps, one shared map from both, or joint ([W_Q; W_K] fused as one layer)."
        ),
    ] = "separate",
    heads: Annotated[
        str,
        typer.Option(
            help="mixed: neurons may move between attention heads (the paper); whole: heads are matched as units "
            "(beyond the paper; with --residual stream --qk shared --solver emd the aligned model keeps its "
            "function exactly)."
        ),
    ] = "mixed",
    *,
    shared: Shared,
) -> None:
    """Fuse transformers with optimal transport (Imfeld et al., ICLR 2024) into the anchor's shape; the
    per-layer report is printed and saved as fusion_report.json beside the model."""
    import splice
    from splice.merge.fusion import FusionOptions

    options = FusionOptions(
        data=data,
        align=align,
        solver=solver,
        reg=reg,
        anchor=anchor,
        samples=samples,
        tokens=tokens,
        residual=residual,
        qk=qk,
        heads=heads,
    )
    report = splice.fuse(models, out, options, run=shared.run)
    if shared.as_json:
        render.print_json(report)
    elif not shared.quiet:
        _print_report(report)


def _print_report(report: FusionReport) -> None:
    from splice.merge.fusion import REPORT_FILE

    method = f"{report.align}, {report.solver}" + (f" reg {report.reg:g}" if report.reg is not None else "")
    render.console.print(
        render.table(
            f"fusion maps per layer ({method}, residual {report.residual}, Q/K {report.qk}, heads {report.heads})",
            LAYER_COLUMNS,
            layer_rows(report),
        )
    )
    widths = report.widths[report.anchor]
    phases = report.timing_summary()
    render.console.print(
        f"fused {len(report.models)} models into {report.models[report.anchor]} ({report.architecture}, hidden "
        f"{widths['hidden']}, {widths['heads']} heads) -> {report.out} in {report.seconds:.1f}s on {report.device}"
        f"{f' ({phases})' if phases else ''}; report: {report.out / REPORT_FILE}",
        highlight=False,
        soft_wrap=True,
    )
    render.notes(report.notes)
