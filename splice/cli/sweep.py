"""`splice sweep`: the search over merges, with a live table of the best trials above a progress bar of trials."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from rich.console import Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from splice.cli import render
from splice.cli.options import Shared, shared_options

if TYPE_CHECKING:
    from splice.workflows.sweep.study import TrialRecord

LIVE_ROWS = 8  # best trials the live table shows


class SweepView:
    """One rich Live on stderr: the best trials so far, and a bar of trials done (a Progress for the library call,
    and its `on_trial` listener)."""

    def __init__(self, quiet: bool, direction: str = "maximize"):
        self.quiet = quiet
        self.direction = direction
        self.parameters: list[str] = []
        self.records: list[TrialRecord] = []
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("trials"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=render.error_console,
        )
        self.task = self.bar.add_task("sweep", total=1)
        self.live: Live | None = None

    def start(self, description: str, total_items: int, total_bytes: int, unit: str = "tensors") -> None:
        if self.quiet:
            return
        self.bar.update(self.task, description=description, total=max(total_items, 1), completed=0)
        self.live = Live(self._view(), console=render.error_console, refresh_per_second=4, transient=True)
        self.live.start()

    def advance(self, items: int, nbytes: int) -> None:
        self.bar.update(self.task, advance=items)
        self._refresh()

    def finish(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    def heard(self, record: TrialRecord) -> None:
        self.records.append(record)
        for name in record.values:
            if name not in self.parameters:
                self.parameters.append(name)
        self._refresh()

    def _refresh(self) -> None:
        if self.live is not None:
            self.live.update(self._view())

    def _view(self) -> Group:
        from splice.workflows.sweep.study import ranked

        scored = [r for r in ranked(self.records, self.direction) if not r.failed]
        failed = sum(1 for r in self.records if r.score is None)
        title = f"best of {len(self.records)} trials so far" + (f" ({failed} failed)" if failed else "")
        return Group(render.sweep_rows_table(title, self.parameters, scored[:LIVE_ROWS]), self.bar)


@shared_options(shard_size=False)
def sweep_command(
    sweep_file: Annotated[Path, typer.Argument(help="The sweep file (YAML): recipe with marks, search, evaluate.")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Results directory (default: the sweep file's out:).")
    ] = None,
    executor: Annotated[
        str, typer.Option(help="local: a process pool on this machine; ray: tasks on a Ray cluster.")
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(help="The Ray cluster (HOST:PORT, ray://HOST:PORT or auto; default: one started here)."),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="Candidates evaluated at once (default: local, one per core; ray, what the cluster fits)."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the sweep in --out: finished trials are not run again.")
    ] = False,
    max_trials: Annotated[
        int | None, typer.Option("--max-trials", help="The budget, replacing the file's search.trials.")
    ] = None,
    *,
    shared: Shared,
) -> None:
    """Search for the best merge: an Optuna study (grid, random, TPE, CMA-ES) over a recipe's marked values, or a
    speculative greedy soup; exact budget, resumable; candidates evaluated in memory on a local pool or on Ray."""
    from splice.workflows.sweep.file import load_sweep
    from splice.workflows.sweep.run import sweep

    loaded = load_sweep(sweep_file)
    view = SweepView(shared.quiet or shared.as_json, loaded.file.evaluate.direction)
    chosen: Literal["local", "ray"] = "ray" if executor == "ray" else "local"
    if executor not in ("local", "ray"):
        raise typer.BadParameter(f"--executor must be local or ray, got {executor!r}")
    try:
        report = sweep(
            sweep_file,
            out=out,
            executor=chosen,
            address=address,
            workers=workers,
            resume=resume,
            max_trials=max_trials,
            on_trial=view.heard,
            run=shared.run.replace(progress=view),
        )
    except KeyboardInterrupt:
        view.finish()
        from splice.progress import published

        where = out or loaded.out
        done = published()  # a Ctrl-C after the best model (or the pushed version) was published says so
        said = f"{', '.join(done)} {'was' if len(done) == 1 else 'were'} published; " if done else ""
        journal = f"{where}/sweep.journal"
        render.interrupted(f"{said}the trials finished so far are in {journal}: --resume continues the sweep")
    if shared.as_json:
        render.print_json(report.as_json())
        return
    render.show(render.sweep_table(report), shared.quiet)
    notes = []
    if report.skipped or report.rerun:
        notes.append(f"resumed: {report.skipped} trials kept from the journal, {report.rerun} run again")
    if report.greedy is not None:
        count = report.greedy.speculation
        notes.append(
            f"greedy soup kept {len(report.greedy.kept)} of {len(report.greedy.steps)}, held-out score "
            f"{report.greedy.soup_score:.6g}; speculation ({count.speculate} at once): {count.evaluations} "
            f"evaluations in {count.rounds} rounds (sequential: {count.sequential_rounds} in "
            f"{count.sequential_rounds}), {count.wasted} thrown away"
        )
    render.notes(notes, shared.quiet)
    if report.pushed:
        render.show(f"pushed the best as {report.pushed}", shared.quiet)
    if report.greedy is None:
        best = report.best
        render.show(
            f"best: trial {best.number}, score {best.score:.6g} -> {report.out}"
            if best
            else f"every trial failed; results -> {report.out}",
            shared.quiet,
        )
    else:
        render.show(f"results -> {report.out}", shared.quiet)
