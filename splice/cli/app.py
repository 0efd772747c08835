"""`splice` command line: each command parses, makes one library call, and renders the result."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer._click.exceptions import ClickException, UsageError
from typer.core import TyperGroup

from splice.cli import render
from splice.cli.continual import continual_app
from splice.cli.deploy import deploy_command
from splice.cli.flags import with_flags
from splice.cli.fuse import fuse_command
from splice.cli.options import (
    INTERRUPTED,
    Dtype,
    Json,
    Out,
    Shared,
    StorageOptions,
    parse_storage_options,
    parse_weights,
    shared_options,
)
from splice.cli.patch import patch_app
from splice.cli.port import port_command
from splice.cli.registry import registry_app
from splice.cli.stats import stats_app
from splice.cli.sweep import sweep_command
from splice.errors import HookError, SpliceError, hook_traceback
from splice.progress import forget_published, published
from splice.tensors.allocator import keep_freed_buffers

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="splice: merge, fuse, patch and port Hugging Face models, streamed tensor by tensor.",
)


def _print_version(value: bool) -> None:
    if value:
        from splice.version import __version__

        print(f"splice {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=_print_version, help="Print splice's version and exit.")
    ] = False,
) -> None:
    """splice: merge, fuse, patch and port Hugging Face models, streamed tensor by tensor."""


app.add_typer(patch_app, name="patch")
app.add_typer(registry_app, name="registry")
app.add_typer(continual_app, name="continual")
app.add_typer(stats_app, name="stats")
app.command("deploy")(deploy_command)
app.command("fuse")(fuse_command)
app.command("port")(port_command)
app.command("sweep")(sweep_command)


@app.command()
def inspect(
    model: Annotated[str, typer.Argument(help="Model directory, patch or statistics directory, or fsspec URL.")],
    plot: Annotated[
        Path | None,
        typer.Option(help="A mask patch: write the heat map of where its entries lie (layers x module types) here."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the --plot file if it exists.")] = False,
    storage_options: StorageOptions = None,
    as_json: Json = False,
) -> None:
    """Shards, tensor and parameter counts, dtypes and LayerNorm modules of a model, and the patch versions
    it carries if splice deploy wrote it; of a patch or statistics directory, what it holds and for which model;
    of a mask patch, where its entries lie per layer and module type (--plot FILE.png draws it)."""
    from splice.workflows.inspect import (
        ModelSummary,
        PatchSummary,
        is_patch_directory,
        plot_placement,
        summarize,
        summarize_patch,
    )

    options = parse_storage_options(storage_options)
    summary: PatchSummary | ModelSummary
    if plot is not None:
        summary = plot_placement(model, plot, force, options)
    else:
        summary = summarize_patch(model, options) if is_patch_directory(model, options) else summarize(model, options)
    if as_json:
        render.print_json(summary)
        return
    for renderable in render.summary_tables(summary):
        render.show(renderable)
    if plot is not None:
        render.show(f"heat map of where the mask's entries lie: {plot}")


@app.command()
@shared_options(verbose=True, placed={"dtype": "device"})
def soup(
    models: Annotated[list[str], typer.Argument(help="Model directories or fsspec URLs.")],
    out: Out,
    weights: Annotated[
        str | None, typer.Option(help="Comma-separated weights, one per model (normalised to sum to 1).")
    ] = None,
    greedy: Annotated[bool, typer.Option("--greedy", help="Greedy soup (needs --eval).")] = False,
    eval_fn: Annotated[str | None, typer.Option("--eval", help="MODULE:FUNCTION scoring a state dict.")] = None,
    strict: Annotated[bool, typer.Option(help="Greedy: keep an ingredient only if the score rises.")] = False,
    dtype: Dtype = None,
    *,
    shared: Shared,
) -> None:
    """Uniform, weighted or greedy model soup, streamed tensor by tensor."""
    from splice.merge.soup import GreedySoupReport, soup_or_greedy

    quiet = shared.quiet
    report = soup_or_greedy(
        models,
        out,
        weights=parse_weights(weights),
        greedy=greedy,
        evaluate=eval_fn,
        strict=strict,
        dtype=dtype,
        run=shared.run,
    )
    if shared.as_json:
        render.print_json(report)
        return
    if isinstance(report, GreedySoupReport):
        render.show(render.greedy_soup_table(report), quiet)
        render.notes(report.notes, quiet)
        render.show(
            f"greedy soup kept {len(report.kept)} of {len(report.steps)}; held-out score "
            f"{report.soup_score:.4f} (best ingredient {report.best_ingredient.score:.4f})",
            quiet,
        )
    else:
        render.show(render.stream_report_table("soup", report), quiet)


@app.command()
@shared_options(verbose=True, placed={"seed": "shard_size"})
def merge(
    recipe: Annotated[
        Path, typer.Argument(help="splice recipe or mergekit config (YAML); several '---' documents: stages.")
    ],
    out: Out,
    stage: Annotated[
        str | None, typer.Option(help="Multi-stage recipe: write this stage to --out, running only what it needs.")
    ] = None,
    intermediate_dir: Annotated[
        Path | None,
        typer.Option(
            "--intermediate-dir",
            "-I",
            help="Multi-stage recipe: where the stages before the last are kept and reused (default: OUT.stages).",
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for random methods (dare_ties, della, ...).")] = None,
    *,
    shared: Shared,
) -> None:
    """Merge by a YAML recipe (task_arithmetic, ties, dare_ties, slerp, ... ; mergekit configs work as they are). A file
    of several '---' documents is a multi-stage recipe (as mergekit-multi runs): later stages merge earlier ones by
    name, the document without a name (else the last) goes to --out, and stages are kept in --intermediate-dir and
    reused while their recipe and inputs are unchanged. The output carries a model card (README.md, with each
    input's digest), the recipe as run (splice_recipe.yml) and, where mergekit can run it, mergekit_config.yml."""
    import splice
    from splice.workflows.stages import StagesReport

    report = splice.merge(recipe, out, stage=stage, intermediate_dir=intermediate_dir, seed=seed, run=shared.run)
    if shared.as_json:
        render.print_json(report)
        return
    if isinstance(report, StagesReport):
        render.show(render.stages_report_table(f"merge ({recipe})", report), shared.quiet)
        return
    render.show(render.stream_report_table(f"merge ({recipe})", report), shared.quiet)
    if report.method_report is not None:
        for view in render.method_report_views(report.method_report):
            render.show(view, shared.quiet)


@app.command()
def demo(
    keep: Annotated[Path | None, typer.Option(help="Keep the workspace in this directory.")] = None,
) -> None:
    """End to end on tiny models it builds: train ingredients on digits, soup them, compare."""
    from splice.cli.demo import show_demo

    show_demo(keep)


def _usage_error_line(exc: UsageError) -> str:
    """click's message (with its "did you mean"), and where the command's help is, on one line."""
    message = " ".join(exc.format_message().split())
    context = exc.ctx
    if message == "Missing command." and context is not None and isinstance(context.command, TyperGroup):
        message = f"missing command: give one of {', '.join(context.command.list_commands(context))}"
    where = context.command_path if context is not None else "splice"
    return f"{message} (see '{where} --help')"


def _print_error(message: str) -> None:
    """One `error:` line; the library's parameters in it named by their flags."""
    render.stop_progress()
    render.error_console.print(
        f"[red]error:[/red] {render.plain(with_flags(message))}", highlight=False, soft_wrap=True
    )


def main() -> None:
    """The `splice` entry point: usage errors and splice's own errors are one line on stderr with exit 2 (a user's
    hook that raised: its traceback first, then that line), Ctrl-C says what was published (nothing, unless it
    came after an output or a version was published) and exits 130,
    anything else is a bug and keeps its traceback."""
    forget_published()
    keep_freed_buffers()
    try:
        code = app(standalone_mode=False)
        if code != INTERRUPTED:  # done and published: a Ctrl-C while the interpreter shuts down changes nothing
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    except HookError as exc:
        render.stop_progress()
        sys.stderr.write(hook_traceback(exc))
        sys.stderr.flush()
        _print_error(str(exc))
        sys.exit(2)
    except SpliceError as exc:
        _print_error(str(exc))
        sys.exit(2)
    except UsageError as exc:
        _print_error(_usage_error_line(exc))
        sys.exit(exc.exit_code)
    except ClickException as exc:
        _print_error(" ".join(exc.format_message().split()))
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        code = INTERRUPTED
    if code == INTERRUPTED:  # typer turns a KeyboardInterrupt into this exit code instead of raising
        render.stop_progress()
        done = published()
        said = (
            f"interrupted after {', '.join(done)} {'was' if len(done) == 1 else 'were'} published"
            if done
            else "interrupted; nothing was published"
        )
        render.error_console.print(said, highlight=False, markup=False, soft_wrap=True)
    sys.exit(code if isinstance(code, int) else 0)
