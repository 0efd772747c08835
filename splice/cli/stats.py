"""`splice stats collect MODEL --data MODULE:FUNCTION --kind gram|fisher (--out DIR | --push NAME)`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from splice.cli import render
from splice.cli.options import RegistryURL, Shared, shared_options

stats_app = typer.Typer(help="Collect a model's statistics on data, for RegMean and Fisher merges.")


@stats_app.command("collect")
@shared_options(shard_size=False)
def collect(
    model: Annotated[str, typer.Argument(help="The model directory or fsspec URL (a transformers model).")],
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="MODULE:FUNCTION or file.py:FUNCTION returning a batch of model inputs (a dict of tensors); a "
            "function taking an argument gets the model's directory.",
        ),
    ],
    kind: Annotated[
        str, typer.Option("--kind", help="gram (input Gram matrices, for regmean) or fisher (diagonal Fisher).")
    ],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the statistics directory here.")] = None,
    push: Annotated[
        str | None, typer.Option("--push", help="Push the statistics as the next version of this registry name.")
    ] = None,
    alias: Annotated[str | None, typer.Option("--alias", help="With --push: point this alias at it.")] = None,
    message: Annotated[str, typer.Option("--message", "-m", help="With --push: the version's message.")] = "",
    samples: Annotated[
        int | None, typer.Option(help="Use at most this many inputs from --data (default: all it returns).")
    ] = None,
    labels: Annotated[
        str,
        typer.Option(
            help="fisher: 'sample' labels from the model's own predictions (the Fisher proper; default) or take "
            "the batch's 'labels' ('batch')."
        ),
    ] = "sample",
    loss: Annotated[
        str | None,
        typer.Option(help="fisher: MODULE:FUNCTION (outputs, labels) -> scalar loss, instead of cross-entropy."),
    ] = None,
    seed: Annotated[int, typer.Option(help="fisher: seed for the sampled labels.")] = 0,
    registry: RegistryURL = None,
    *,
    shared: Shared,
) -> None:
    """Collect a model's statistics in one pass over the --data batches: the input Gram matrix of every linear
    layer (--kind gram, for merge_method: regmean) or the diagonal Fisher of every parameter from per-example
    gradients (--kind fisher, for merge_method: fisher). They are kept fingerprinted against the model, so a merge
    refuses them for any other model."""
    from splice.adapters.kinds.stats import data_tokens
    from splice.workflows.stats import collect_stats

    outcome = collect_stats(
        model,
        data,
        kind=kind,  # type: ignore[arg-type]  # checked by collect_stats
        out=out,
        push=push,
        alias=alias,
        message=message,
        registry=registry,
        samples=samples,
        loss=loss,
        labels=labels,  # type: ignore[arg-type]  # checked by collect_stats
        seed=seed,
        run=shared.run,
    )
    if shared.as_json:
        render.print_json(outcome)
        return
    where = [str(out) if out else "", outcome.pushed.ref if outcome.pushed else ""]
    settings = outcome.patch.meta.settings
    render.show(
        render.table(
            f"{kind} statistics -> {', '.join(w for w in where if w)}",
            ["tensors", "size", "samples", "tokens", "seconds", "model fingerprint"],
            [
                [
                    len(outcome.patch.tensors),
                    render.human_bytes(outcome.nbytes),
                    settings["samples"],
                    data_tokens(settings) or "",
                    f"{outcome.seconds:.2f}",
                    outcome.patch.meta.base.digest[:19] if outcome.patch.meta.base else "",
                ]
            ],
        ),
        shared.quiet,
    )
