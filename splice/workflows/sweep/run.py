"""`splice.sweep`: read a sweep file, check everything before any trial, search (an Optuna study, or a speculative
greedy soup) on the chosen executor, and leave the results, the best candidate's recipe and model in `out`.

`out` holds, beside the live journal (`sweep.journal`, what --resume reads): sweep_results.json and .csv, the PNG
plots, best_recipe.yaml, the best model in best/ (unless `keep: none`) and every candidate in candidates/ (`keep:
all`). Each file is published whole (the output rule); the journal is Optuna's own append-only log."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from splice.adapters.port import port_patch
from splice.adapters.sources import load_patch
from splice.errors import OutputExistsError, SpliceError, parameter
from splice.hooks import hook_file
from splice.merge.recipe import parse_recipe
from splice.merge.reference_syntax import reference_text
from splice.merge.soup import soup_of, write_soup
from splice.options import RunOptions
from splice.progress import Progress
from splice.registry.store import Registry
from splice.tensors.checkpoint import Checkpoint, recorded_location
from splice.tensors.device import resolve_device
from splice.tensors.stream import check_same_tensors, open_all
from splice.tensors.writer import check_report_dir, refuse_overlap, write_report_files
from splice.workflows.merge import merge
from splice.workflows.references import (
    open_model_references,
    recorded_hook,
    recorded_reference,
    recorded_statistics,
    reference_locations,
    resolve_reference,
)
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
from splice.workflows.sweep.greedy import GreedyDriver, GreedyOutcome
from splice.workflows.sweep.push import push_best, ready_registry
from splice.workflows.sweep.results import (
    BEST_MODEL,
    CANDIDATES,
    RESULT_FILES,
    SweepReport,
    result_files,
)
from splice.workflows.sweep.space import SEARCH_KEY, fill, grid_size
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
from splice.workflows.sweep.subjects import PORT_KEY, PORT_LOCATIONS, port_spec

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
    _refuse_in_a_worker_import()
    run = run or RunOptions()
    loaded = load_sweep(sweep_file)
    if executor not in ("local", "ray"):
        raise SpliceError(f"{parameter('executor')} must be local or ray, got {executor!r}")
    if executor == "local" and address is not None:
        raise SpliceError(f"{parameter('address')} is for the ray executor: add {parameter('executor', repr('ray'))}")
    if workers is not None:
        local_workers(workers)
    budget = _budget(loaded, max_trials)
    _check_inputs(loaded, run.storage_options)
    registry = _registry(loaded, run)
    seed = loaded.file.search.seed  # the random merge methods' (dare_ties, della, ...): every candidate alike
    evaluator = Evaluator(loaded.hook, dict(loaded.file.evaluate.args), run.device, run.storage_options, seed)
    runner = _executor(loaded, evaluator, executor, address, workers)  # a cluster that cannot be reached: here
    listener = on_trial or (lambda record: None)
    try:
        # every argument checked first: `force` removes an earlier sweep
        where = _output(loaded, out, resume, run.force, [registry.url] if registry is not None else [])
        if loaded.method == "greedy_soup":
            searched = _greedy(loaded, runner, listener, run)
        else:
            searched = _search(loaded, runner, where, budget, resume, listener, run.reporter)
    finally:
        runner.close()
    best_model = _write_best(loaded, searched, where, evaluator, run)
    pushed = _push(loaded, registry, searched, best_model, run)
    report = SweepReport(
        loaded.source,
        loaded.method,
        loaded.file.evaluate.direction,
        searched.budget,
        executor,
        runner.slots,
        time.perf_counter() - started,
        searched.trials,
        searched.parameters,
        searched.best,
        where,
        best_model,
        pushed,
        searched.rerun,
        searched.skipped,
        searched.greedy,
    )
    write_report_files(where, result_files(report, searched.best_recipe, evaluator.seed), force=True)
    return report


@dataclass(frozen=True)
class _Searched:
    """What a search found, before the best is written and the results are."""

    trials: list[TrialRecord]
    parameters: list[str]
    budget: int
    best: TrialRecord | None
    best_recipe: dict[str, Any] | None = None
    greedy: GreedyOutcome | None = None
    rerun: int = 0
    skipped: int = 0


def _refuse_in_a_worker_import() -> None:
    """A local pool's worker imports the script that started the sweep (as `__mp_main__`): a sweep called at its
    top level would start again in every worker, two studies writing one journal."""
    importing = sys.modules.get("__mp_main__")  # there while the worker runs the script, until it becomes __main__
    if importing is not None and importing is not sys.modules.get("__main__"):
        raise SpliceError(
            "splice.sweep was called while a worker process imported the script that started the sweep: call it "
            'under `if __name__ == "__main__":` in that script'
        )


def _check_inputs(loaded: Sweep, storage_options: dict | None) -> None:
    """Every input opened (headers only) before any trial: a model or patch that is not there is one error now,
    not every trial failing."""
    if loaded.port is not None:
        load_patch(loaded.port.patch, storage_options)
    checkpoints = _open_models(loaded, storage_options)
    if loaded.method == "greedy_soup":  # ingredients soup tensor by tensor: the same names, shapes and dtypes
        check_same_tensors(checkpoints)
    for checkpoint in checkpoints:
        checkpoint.close()


def _open_models(loaded: Sweep, storage_options: dict | None) -> list[Checkpoint]:
    """The models a candidate reads: a port's bases, or the recipe's (or greedy soup's) model references."""
    if loaded.port is not None:
        return open_all([m for m in (loaded.port.to, loaded.port.old_base) if m is not None], storage_options)
    return open_model_references(loaded.inputs, storage_options)


def _input_locations(loaded: Sweep) -> list[str]:
    """Every location the sweep reads: what its output must not overlap."""
    return loaded.inputs if loaded.port is not None else reference_locations(loaded.inputs)


def _push_base(loaded: Sweep) -> str | None:
    """The stored model a pushed patch is made against (a repo id resolved in the Hugging Face cache)."""
    if loaded.push_base is None:
        return None
    resolved = resolve_reference(loaded.push_base)
    if resolved.adapter is not None:
        raise SpliceError(
            f"{loaded.source}: push.base: {loaded.push_base} is a model with an adapter applied on the fly; a pushed "
            "patch is made against a stored model: set push.base to one"
        )
    return resolved.model


def _registry(loaded: Sweep, run: RunOptions) -> Registry | None:
    """Where `push:` sends the best, checked before any trial."""
    if loaded.file.push is None:
        return None
    if _push_base(loaded) is None:
        raise SpliceError(
            f"{loaded.source}: push.base: say which base the pushed patch is made against (the recipe has no "
            "base_model)"
        )
    return ready_registry(loaded.file.push, run.storage_options)


def _output(loaded: Sweep, out: str | os.PathLike | None, resume: bool, force: bool, registries: list[str]) -> Path:
    """`out`, checked before any trial: not an input, the hook or the sweep file; holding no earlier sweep unless
    resuming it (or `force`, which removes the earlier sweep's files)."""
    if out is None and loaded.out is None:
        raise SpliceError(f"{loaded.source}: say where the results go: `out:` in the file, or {parameter('out')}")
    where = Path(out if out is not None else str(loaded.out))
    hook = hook_file(loaded.hook_function)
    protected = [*_input_locations(loaded), loaded.source, *([hook] if hook else []), *registries]
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
            f"{where} holds an earlier sweep: resume it ({parameter('resume', True)}), or pass "
            f"{parameter('force', True)} to start over"
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
    checkpoints = _open_models(loaded, evaluator.storage_options)
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
) -> _Searched:
    study = open_study(where / JOURNAL, loaded.file.evaluate.direction, fingerprint(loaded), resume)
    before = study.get_trials(deepcopy=False)
    held = len(before)
    if held > budget:
        raise SpliceError(f"the journal holds {held} trials already, more than the budget of {budget}")
    keep_all = loaded.file.keep == "all"

    def candidate_of(number: int, values: dict[str, Value], recipe: dict[str, Any]) -> MergeCandidate:
        keep_dir = str((where / CANDIDATES / f"trial-{number:04d}").absolute()) if keep_all else None
        return MergeCandidate(number, values, recipe, keep_dir)

    searched = _with_absolute_inputs(loaded)
    StudyDriver(searched, study, runner, candidate_of, budget).run(listener, progress)
    records = finished_records(study)
    best = best_record(records, loaded.file.evaluate.direction)
    return _Searched(
        records,
        [p.name for p in loaded.parameters],
        budget,
        best,
        best_recipe=fill(searched.recipe, best.values, loaded.parameters) if best is not None else None,
        rerun=sum(1 for t in before if not t.state.is_finished()),
        skipped=sum(1 for t in before if t.state.is_finished()),
    )


def _with_absolute_inputs(loaded: Sweep) -> Sweep:
    """The sweep with local model paths (and statistics directories, data-hook files) in its recipe made absolute: a
    worker (a Ray task above all) may run in another directory, and best_recipe.yaml then runs from anywhere."""
    recipe = dict(loaded.recipe)

    def absolute(location: Any) -> Any:
        return recorded_location(location) if isinstance(location, str) else location

    def absolute_reference(reference: Any) -> Any:  # a model reference (mergekit's mapping read as its string)
        if isinstance(reference, dict) and SEARCH_KEY not in reference:
            reference = reference_text(reference)
        return recorded_reference(reference) if isinstance(reference, str) else reference

    def absolute_entry(entry: dict) -> dict:
        entry = {**entry, "model": absolute_reference(entry.get("model"))}
        for key, recorded in (("stats", recorded_statistics), ("mask", recorded_statistics), ("data", recorded_hook)):
            if isinstance(entry.get(key), str):
                entry[key] = recorded(entry[key])
        return entry

    if isinstance(recipe.get("models"), list):
        recipe["models"] = [absolute_entry(entry) if isinstance(entry, dict) else entry for entry in recipe["models"]]
    if "base_model" in recipe:
        recipe["base_model"] = absolute_reference(recipe["base_model"])
    if isinstance(recipe.get(PORT_KEY), dict):
        port = recipe[PORT_KEY]
        recipe[PORT_KEY] = {key: absolute(port[key]) if key in PORT_LOCATIONS else port[key] for key in port}
    return dataclasses.replace(loaded, recipe=recipe)


def _greedy(loaded: Sweep, runner: Executor, listener: OnTrial, run: RunOptions) -> _Searched:
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

    ingredients = [recorded_reference(path) for path in loaded.ingredients]
    outcome = GreedyDriver(ingredients, runner, search.speculate, search.strict).run(heard, run.reporter)
    return _Searched(records, ["ingredient", "soup"], len(records), None, greedy=outcome)


def _write_best(loaded: Sweep, searched: _Searched, where: Path, evaluator: Evaluator, run: RunOptions) -> str | None:
    """The best candidate's model in `where`/best (unless `keep: none`): the greedy soup as `splice soup --greedy`
    writes it, the best port as `splice port --scale` writes it, or the best recipe merged as `splice merge` merges
    it."""
    if loaded.file.keep == "none":
        return None
    out = where / BEST_MODEL
    writing = run.replace(force=True, progress=None)  # best/ is this sweep's: `_output` refused an earlier one
    if searched.greedy is not None:
        kept = open_model_references(searched.greedy.kept, run.storage_options)
        write_soup(soup_of(kept, resolve_device(run.device)), kept[0], kept, out, None, writing)
        return str(out)
    if searched.best_recipe is None:
        return None
    if loaded.kind == "port":
        spec = port_spec(searched.best_recipe, "best port")
        port_patch(spec.patch, spec.to, out=out, old_base=spec.old_base, scale=spec.scale, run=writing)
        return str(out)
    merge(parse_recipe(searched.best_recipe, "best recipe"), out, seed=evaluator.seed, run=writing)
    return str(out)


def _push(
    loaded: Sweep, registry: Registry | None, searched: _Searched, best_model: str | None, run: RunOptions
) -> str | None:
    """`push:` — the best model as the next version of the name, when there is one; its ref."""
    push, base = loaded.file.push, _push_base(loaded)
    if registry is None or push is None or base is None or best_model is None:
        return None
    if searched.greedy is not None:
        what = f"the greedy soup of {len(searched.greedy.kept)} ingredients, score {searched.greedy.soup_score!r}"
    else:
        assert searched.best is not None
        what = f"trial {searched.best.number}, score {searched.best.score!r}"
    message = f"the best of sweep {loaded.source}: {what}"
    return push_best(registry, push, base, best_model, message, run.storage_options).manifest.ref
