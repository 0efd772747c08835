"""`splice continual run|predict`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from splice.cli import render
from splice.cli.options import Json, Quiet, RegistryURL, Shared, StorageOptions, parse_storage_options, shared_options

continual_app = typer.Typer(help="Continual learning with task-keyed LayerNorm banks (De Min et al. 2023).")


@continual_app.command("run")
def run(
    pipeline: Annotated[Path, typer.Argument(help="The pipeline file (YAML): base, name, tasks, training settings.")],
    resume: Annotated[bool, typer.Option("--resume", help="Continue after the tasks already in the registry.")] = False,
    report: Annotated[
        Path | None,
        typer.Option(
            "--report", help="Directory for continual_report.json and the PNG plots (default: continual-NAME)."
        ),
    ] = None,
    registry: Annotated[
        str | None,
        typer.Option(
            "--registry",
            help="The registry (default: the pipeline file's registry:, else $SPLICE_REGISTRY, else "
            "~/.cache/splice/registry).",
        ),
    ] = None,
    storage_options: StorageOptions = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace the report's files in --report if they exist.")
    ] = False,
    quiet: Quiet = False,
    as_json: Json = False,
) -> None:
    """Per task: its key, its LayerNorm slot trained, the head rectified, every seen task evaluated, pushed as a
    new version with alias task-<i> (task-1 is the first). A rerun with --resume continues after the last task in
    the registry."""
    from splice.errors import Interrupted
    from splice.workflows.continual.pipeline import load_pipeline
    from splice.workflows.continual.run import run_pipeline

    loaded = load_pipeline(pipeline)
    try:
        result = run_pipeline(
            loaded,
            resume=resume,
            registry=registry,
            report_dir=report or f"continual-{loaded.name}",
            progress=render.RichProgress(quiet),
            storage_options=parse_storage_options(storage_options),
            force=force,
        )
    except Interrupted as exc:  # not "nothing was published": say what the registry keeps
        render.interrupted(str(exc))
    if as_json:
        render.print_json(result)
    elif not quiet:
        for table in render.continual_tables(result):
            render.console.print(table)
        render.console.print(f"report -> {report or f'continual-{loaded.name}'}", highlight=False)


@continual_app.command("predict")
@shared_options(shard_size=False)
def predict(
    bank: Annotated[
        str,
        typer.Option(
            "--bank",
            help="A task version of a pipeline (name@task-3: tasks 1 to 3; "
            "name: the latest); its bank holds every task up to it.",
        ),
    ],
    base: Annotated[str, typer.Option("--base", help="The pipeline's base model.")],
    data: Annotated[
        str, typer.Option("--data", help="MODULE:FUNCTION returning a batch (dict of tensors; labels optional).")
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Write each input's class and task slot "
            "(and the accuracy, with labels) as JSON; never an "
            "input or the registry.",
        ),
    ] = None,
    registry: RegistryURL = None,
    *,
    shared: Shared,
) -> None:
    """Predict with routing: each input's LayerNorm slot is chosen by its key."""
    from splice.workflows.continual.predict import predict_into

    loaded, result = predict_into(bank, base, data, out, registry=registry, run=shared.run)
    if shared.as_json:
        render.print_json({"bank": loaded.refs, **result.as_dict()})
    elif not shared.quiet:
        render.console.print(render.prediction_table(result, loaded))
