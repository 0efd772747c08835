"""`splice` command line: each command parses, makes one library call, and renders the result."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from splice.cli import render
from splice.cli.deploy import DEPLOYED_COLUMNS, deploy_command
from splice.cli.fuse import fuse_command
from splice.cli.options import (
    Device,
    Dtype,
    Force,
    Out,
    Quiet,
    ShardSize,
    StorageOptions,
    Verbose,
    parse_storage_options,
)
from splice.cli.patch import patch_app
from splice.cli.registry import registry_app
from splice.errors import SpliceError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="splice: merge, fuse, patch and port Hugging Face models, streamed tensor by tensor.")

app.add_typer(patch_app, name="patch")
app.add_typer(registry_app, name="registry")
app.command("deploy")(deploy_command)
app.command("fuse")(fuse_command)

def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr, force=True)
    logging.getLogger("splice").setLevel(logging.DEBUG if verbose else logging.WARNING)


def show(renderable, quiet: bool = False) -> None:
    if not quiet:
        render.console.print(renderable)


@app.command()
def inspect(model: Annotated[str, typer.Argument(help="Model directory or fsspec URL.")],
            storage_options: StorageOptions = None) -> None:
    """Shards, tensor and parameter counts, dtypes and LayerNorm modules of a model."""
    from splice.workflows.inspect import summarize

    summary = summarize(model, parse_storage_options(storage_options))
    show(render.table(f"{summary.location} ({summary.architecture or 'unknown architecture'})",
                      ["tensors", "parameters", "size", "shards"],
                      [[summary.tensors, f"{summary.parameters:,}", render.human_bytes(summary.nbytes),
                        len(summary.shards)]]))
    show(render.table("shards", ["file", "tensors", "size"],
                      [[s.file, s.tensors, render.human_bytes(s.nbytes)] for s in summary.shards]))
    show(render.table("dtypes", ["dtype", "parameters"], [[d, f"{n:,}"] for d, n in summary.dtypes.items()]))
    show(render.table(f"LayerNorm modules ({len(summary.norm_modules)})", ["module", "size", "bias"],
                      [[m.name, m.size, "yes" if m.has_bias else "no"] for m in summary.norm_modules]))
    from splice.workflows.deploy import deployed_summary, read_deployment_record

    record = read_deployment_record(model, parse_storage_options(storage_options))
    if record is not None:
        show(render.table(f"deployed patches (from {record.registry}, {record.deployed_at:%Y-%m-%d %H:%M} UTC)",
                          DEPLOYED_COLUMNS, deployed_summary(record)))


def _parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise SpliceError(f"--weights {text!r}: give comma-separated numbers, e.g. 0.5,0.3,0.2") from None


@app.command()
def soup(
    models: Annotated[list[str], typer.Argument(help="Model directories or fsspec URLs.")],
    out: Out,
    weights: Annotated[str | None, typer.Option(help="Comma-separated weights, one per model.")] = None,
    greedy: Annotated[bool, typer.Option("--greedy", help="Greedy soup (needs --eval).")] = False,
    eval_fn: Annotated[str | None, typer.Option("--eval", help="MODULE:FUNCTION scoring a state dict.")] = None,
    strict: Annotated[bool, typer.Option(help="Greedy: keep an ingredient only if the score rises.")] = False,
    device: Device = "auto",
    dtype: Dtype = None,
    shard_size: ShardSize = "2GB",
    storage_options: StorageOptions = None,
    force: Force = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Uniform, weighted or greedy model soup, streamed tensor by tensor."""
    import splice
    from splice.tensors.writer import parse_size

    setup_logging(verbose)
    progress = render.RichProgress(quiet)
    size = parse_size(shard_size)
    remote = parse_storage_options(storage_options)
    if greedy or eval_fn:
        if not (greedy and eval_fn):
            raise SpliceError("a greedy soup needs both --greedy and --eval MODULE:FUNCTION")
        if weights:
            raise SpliceError("--weights does not apply to a greedy soup")
        report = splice.greedy_soup(models, out, eval_fn, strict=strict, device=device, dtype=dtype,
                                    shard_size=size, force=force, progress=progress, storage_options=remote)
        show(render.table(f"greedy soup -> {report.out}", ["ingredient", "held-out score", "soup score", "kept"],
                          [[s.model, f"{s.score:.4f}", "" if s.soup_score is None else f"{s.soup_score:.4f}",
                            "yes" if s.kept else "no"] for s in report.steps]), quiet)
        show(f"greedy soup kept {len(report.kept)} of {len(report.steps)}; held-out score {report.soup_score:.4f} "
             f"(best ingredient {report.best_ingredient.score:.4f})", quiet)
        return
    report = splice.soup(models, out, weights=_parse_weights(weights), device=device, dtype=dtype,
                         shard_size=size, force=force, progress=progress, storage_options=remote)
    show(render.stream_report_table("soup", report), quiet)


@app.command()
def merge(
    recipe: Annotated[Path, typer.Argument(help="splice recipe or mergekit config (YAML).")],
    out: Out,
    device: Device = "auto",
    shard_size: ShardSize = "2GB",
    seed: Annotated[int | None, typer.Option(help="Seed for random methods (dare_ties, della, ...).")] = None,
    storage_options: StorageOptions = None,
    force: Force = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Merge by a YAML recipe (task_arithmetic, ties, dare_ties, slerp, ... ; mergekit configs work as they are)."""
    import splice
    from splice.tensors.writer import parse_size

    setup_logging(verbose)
    report = splice.merge(recipe, out, device=device, shard_size=parse_size(shard_size), force=force,
                          progress=render.RichProgress(quiet), seed=seed,
                          storage_options=parse_storage_options(storage_options))
    show(render.stream_report_table(f"merge ({recipe})", report), quiet)


@app.command()
def demo(
    keep: Annotated[Path | None, typer.Option(help="Keep the workspace in this directory.")] = None,
) -> None:
    """End to end on tiny models it builds: train ingredients on digits, soup them, compare."""
    from splice.cli.demo import run_demo

    run_demo(keep)


def main() -> None:
    try:
        app(standalone_mode=False)
    except SpliceError as exc:
        render.error_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        render.error_console.print("interrupted; nothing was published")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise
