"""`splice.sweep`: read a sweep file, check everything before any trial, search (an Optuna study, or a speculative
greedy soup) on the chosen executor, and leave the results, the best candidate's recipe and model in `out`.

`out` holds, beside the live journal (`sweep.journal`, what --resume reads): sweep_results.json and .csv, the PNG
plots, best_recipe.yaml, the best model in best/ (unless `keep: none`) and every candidate in candidates/ (`keep:
all`). Each file is published whole (the output rule); the journal is Optuna's own append-only log."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from splice.errors import OutputExistsError, SpliceError, parameter
from splice.hooks import hook_file
from splice.merge.recipe import merge, parse_recipe
from splice.merge.soup import soup_of, write_soup
from splice.options import RunOptions
from splice.progress import Progress
from splice.tensors.device import resolve_device
from splice.tensors.stream import check_same_tensors, open_all
from splice.tensors.writer import check_report_dir, refuse_overlap, write_report_files
from splice.workflows.sweep.candidate import Evaluator, MergeCandidate, Outcome, SoupCandidate, Value
from splice.workflows.sweep.executors import (
    Executor,
    InlineExecutor,
    PoolExecutor,
    RayExecutor,
    TaskResources,
    local_workers,
)
from splice.workflows.sweep.file import Sweep, load_sweep
from splice.workflows.sweep.greedy import GreedyDriver
from splice.workflows.sweep.results import (
    BEST_MODEL,
    CANDIDATES,
    RESULT_FILES,
    SweepReport,
    result_files,
)
from splice.workflows.sweep.space import fill, grid_size
from splice.workflows.sweep.study import (
    JOURNAL,
    OnTrial,
    StudyDriver,
    TrialRecord,
    best_record,
    fingerprint,
    finished_records,
    open_study,
)

ExecutorName = Literal["local", "ray"]
WORKER_BASELINE_BYTES = 1 << 30  # a worker process with torch imported, before it holds a model


def sweep(
    sweep_file: str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    executor: ExecutorName = "local",
    address: str | None = None,
    workers: int | None = None,
    resume: bool = False,
    max_trials: int | None = None,
    on_trial: OnTrial | None = None,
    run: RunOptions | None = None,
) -> SweepReport:
    """Run (or `resume`) the sweep in `sweep_file`; returns its report, also written to `out` (default: the file's
    `out:`). `executor`: "local" (a process pool of `workers`, default one per core; one worker runs candidates in
    this process) or "ray" (tasks on the cluster at `address`, or one started here). `max_trials` replaces the file's
    budget (a resumed sweep can be given more). `on_trial(record)` hears of each trial as it finishes. `run`: the
    device candidates merge on, storage options for remote inputs, `force` to start over in an `out` that holds an
    earlier sweep, and the progress of trials."""
    started = time.perf_counter()
    run = run or RunOptions()
    loaded = load_sweep(sweep_file)
    where = _output(loaded, out, resume, run.force)
    budget = _budget(loaded, max_trials)
    seed = loaded.file.search.seed  # the random merge methods' (dare_ties, della, ...): every candidate alike
    evaluator = Evaluator(loaded.hook, dict(loaded.file.evaluate.args), run.device, run.storage_options, seed)
    if executor not in ("local", "ray"):
        raise SpliceError(f"{parameter('executor')} must be local or ray, got {executor!r}")
    if executor == "local" and address is not None:
        raise SpliceError(f"{parameter('address')} is for the ray executor: add `executor='ray'` (--executor ray)")
    runner = _executor(loaded, evaluator, executor, address, workers)
    listener = on_trial or (lambda record: None)
    progress = run.reporter
    try:
        if loaded.method == "greedy_soup":
            report = _greedy(loaded, runner, where, listener, progress)
        else:
            report = _search(loaded, runner, where, budget, resume, listener, progress)
    finally:
        runner.close()
    report.executor, report.workers = executor, runner.slots
    report.seconds = time.perf_counter() - started
    _finish(loaded, report, where, evaluator, run)
    return report


def _output(loaded: Sweep, out: str | os.PathLike | None, resume: bool, force: bool) -> Path:
    """`out`, checked before any trial: not an input, the hook or the sweep file; holding no earlier sweep unless
    resuming it (or `force`, which removes the earlier sweep's files)."""
    if out is None and loaded.out is None:
        raise SpliceError(f"{loaded.source}: say where the results go: `out:` in the file, or {parameter('out')}")
    where = Path(out if out is not None else str(loaded.out))
    hook = hook_file(loaded.hook_function)
    protected = [*loaded.inputs, loaded.source, *([hook] if hook else [])]
    refuse_overlap(where, protected)
    journal = where / JOURNAL
    if resume:
        if loaded.method == "greedy_soup":
            raise SpliceError("a greedy_soup sweep cannot be resumed: run it again (its evaluations are not journaled)")
        if not journal.is_file():
            raise SpliceError(f"nothing to resume: {journal} does not exist (run the sweep without resume first)")
        return where
    if (journal.exists() or any((where / name).exists() for name in (BEST_MODEL, CANDIDATES))) and not force:
        raise OutputExistsError(
            f"{where} holds an earlier sweep: resume it ({parameter('resume')}), or pass `force=True` (--force) to "
            f"start over"
        )
    if force:
        for name in (JOURNAL, BEST_MODEL, CANDIDATES, *RESULT_FILES):
            path = where / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    check_report_dir(where, protected, RESULT_FILES)
    where.mkdir(parents=True, exist_ok=True)
    return where


def _budget(loaded: Sweep, max_trials: int | None) -> int:
    if max_trials is None:
        return loaded.trials
    if max_trials < 1:
        raise SpliceError(f"{parameter('max_trials')} must be at least 1, got {max_trials}")
    if loaded.method == "greedy_soup":
        raise SpliceError(f"{parameter('max_trials')} does not apply to a greedy soup (its ingredients set its work)")
    if loaded.method == "grid" and max_trials > grid_size(loaded.parameters):
        raise SpliceError(
            f"{parameter('max_trials')} {max_trials} is more than the grid's {grid_size(loaded.parameters)} candidates"
        )
    return max_trials


def _executor(
    loaded: Sweep, evaluator: Evaluator, name: ExecutorName, address: str | None, workers: int | None
) -> Executor:
    timeout = loaded.file.evaluate.timeout
    if name == "ray":
        if workers is not None:
            local_workers(workers)
        return RayExecutor(evaluator, address, workers, _resources_for(loaded, evaluator), timeout)
    count = local_workers(workers)
    return InlineExecutor(evaluator) if count == 1 else PoolExecutor(evaluator, count, timeout)


def _resources_for(loaded: Sweep, evaluator: Evaluator) -> Callable[[dict[str, float]], TaskResources]:
    """A candidate's Ray resources once the cluster's are known: a core, a GPU when the cluster has them and the
    merge may use one, and memory for the merged model in memory twice over (the merge's result and what an
    evaluation makes of it) and a worker's own, refused up front when no node could ever hold it."""
    checkpoints = open_all(loaded.inputs, evaluator.storage_options)
    model_bytes = max(c.total_bytes for c in checkpoints) * 2  # float32 working copies of half-precision inputs
    memory = 2 * model_bytes + WORKER_BASELINE_BYTES

    def resources(cluster: dict[str, float]) -> TaskResources:
        gpus = 1.0 if cluster.get("GPU", 0) >= 1 and evaluator.device != "cpu" else 0.0
        if cluster.get("memory", memory) < memory:
            raise SpliceError(
                f"a candidate needs about {memory / 2**30:.1f} GiB (the merged model held twice and a worker), "
                f"more than the Ray cluster's {cluster.get('memory', 0) / 2**30:.1f} GiB"
            )
        return TaskResources(1.0, gpus, memory)

    return resources


def _search(
    loaded: Sweep, runner: Executor, where: Path, budget: int, resume: bool, listener: OnTrial, progress: Progress
) -> SweepReport:
    study = open_study(where / JOURNAL, loaded.file.evaluate.direction, fingerprint(loaded), resume)
    before = study.get_trials(deepcopy=False)
    held = len(before)
    if held > budget:
        raise SpliceError(f"the journal holds {held} trials already, more than the budget of {budget}")
    keep_all = loaded.file.keep == "all"

    def candidate_of(number: int, values: dict[str, Value], recipe: dict[str, Any]) -> MergeCandidate:
        keep_dir = str((where / CANDIDATES / f"trial-{number:04d}").absolute()) if keep_all else None
        return MergeCandidate(number, values, recipe, keep_dir)

    driver = StudyDriver(_with_absolute_inputs(loaded), study, runner, candidate_of, budget)
    driver.run(listener, progress)
    records = finished_records(study)
    direction = loaded.file.evaluate.direction
    return SweepReport(
        loaded.source,
        loaded.method,
        direction,
        budget,
        "",
        0,
        0.0,
        records,
        [p.name for p in loaded.parameters],
        best_record(records, direction),
        where,
        rerun=sum(1 for t in before if not t.state.is_finished()),
        skipped=sum(1 for t in before if t.state.is_finished()),
    )


def _with_absolute_inputs(loaded: Sweep) -> Sweep:
    """The sweep with local model paths in its recipe made absolute: a worker (a Ray task above all) may run in
    another directory, and best_recipe.yaml then runs from anywhere."""
    import dataclasses

    recipe = dict(loaded.recipe)

    def absolute(location: Any) -> Any:
        if not isinstance(location, str) or "://" in location or os.path.isabs(location):
            return location
        return os.path.abspath(location)

    if isinstance(recipe.get("models"), list):
        recipe["models"] = [
            {**entry, "model": absolute(entry.get("model"))} if isinstance(entry, dict) else entry
            for entry in recipe["models"]
        ]
    if "base_model" in recipe:
        recipe["base_model"] = absolute(recipe["base_model"])
    return dataclasses.replace(loaded, recipe=recipe)


def _greedy(loaded: Sweep, runner: Executor, where: Path, listener: OnTrial, progress: Progress) -> SweepReport:
    checkpoints = open_all(loaded.ingredients, None)
    check_same_tensors(checkpoints)
    search = loaded.file.search
    records: list[TrialRecord] = []

    def heard(candidate: SoupCandidate, outcome: Outcome) -> None:
        joined = candidate.ingredient or candidate.kept[0]
        values: dict[str, Value] = {"ingredient": joined, "soup": len(candidate.kept) if candidate.ingredient else 0}
        record = TrialRecord(
            outcome.number,
            values,
            outcome.score,
            outcome.error,
            outcome.merge_seconds,
            outcome.eval_seconds,
            outcome.worker,
        )
        records.append(record)
        listener(record)

    absolute = [os.path.abspath(p) if "://" not in p else p for p in loaded.ingredients]
    outcome = GreedyDriver(absolute, runner, search.speculate, search.strict).run(heard, progress)
    direction = loaded.file.evaluate.direction
    best = TrialRecord(-1, {"kept": len(outcome.kept)}, outcome.soup_score, None, 0.0, 0.0, "")
    return SweepReport(
        loaded.source,
        loaded.method,
        direction,
        len(records),
        "",
        0,
        0.0,
        records,
        ["ingredient", "soup"],
        best,
        where,
        greedy=outcome,
    )


def _finish(loaded: Sweep, report: SweepReport, where: Path, evaluator: Evaluator, run: RunOptions) -> None:
    """The best model (unless `keep: none`), then the results files, each published whole."""
    best_recipe = None
    if report.greedy is not None:
        if loaded.file.keep != "none":
            kept = open_all(report.greedy.kept, None)
            state = soup_of(kept, resolve_device(run.device))
            write_soup(state, kept[0], kept, where / BEST_MODEL, None, RunOptions(force=True))
            report.best_model = str(where / BEST_MODEL)
    elif report.best is not None:
        best_recipe = fill(_with_absolute_inputs(loaded).recipe, report.best.values, loaded.parameters)
        if loaded.file.keep != "none":
            merge(parse_recipe(best_recipe, "best recipe"), where / BEST_MODEL, seed=evaluator.seed, run=_quiet(run))
            report.best_model = str(where / BEST_MODEL)
    files = result_files(report, best_recipe, evaluator.seed)
    report.files = [str(p) for p in write_report_files(where, files, force=True)]


def _quiet(run: RunOptions) -> RunOptions:
    return run.replace(force=True, progress=None)
