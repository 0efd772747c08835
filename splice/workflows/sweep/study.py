"""The search over a recipe's marked values: an Optuna study driven by ask/tell, kept in Optuna's file journal beside
the results, so a driver that dies (Ctrl-C, SIGKILL, a lost machine) is resumed where it stopped.

- The budget is exact: the study never holds more trials than the budget, so K trials are K evaluations.
- On resume, trials that finished are kept as they are; a trial that was running when the driver died is run again
  with its parameters (once per resume) and told under its own number.
- Reproducible: trial N is sampled by a sampler seeded from (seed, N), so its values depend on the sweep's seed,
  its number and the trials finished before it was asked, not on the sampler's state in a process that may have
  died. Random and grid values depend on nothing else, so they run as slots free up; TPE and CMA-ES learn from
  finished trials, so they are asked a batch of `slots` at a time, each batch after the one before has finished:
  the same seed and worker count give the same trials on any executor, interrupted or not.
- A grid is enumerated here (in the order of the parameters' values; a seeded shuffle of it when the budget is
  smaller than the grid), each point enqueued for its trial: Optuna's GridSampler stops the study on its own once
  exhausted, which ask/tell cannot take.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import optuna
from optuna.samplers import BaseSampler, CmaEsSampler, RandomSampler, TPESampler
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from splice.errors import SpliceError, parameter
from splice.progress import Progress
from splice.workflows.sweep.candidate import MergeCandidate, Outcome, Value
from splice.workflows.sweep.executors import Executor
from splice.workflows.sweep.file import Sweep
from splice.workflows.sweep.space import fill

JOURNAL = "sweep.journal"
STUDY_NAME = "splice-sweep"
POLL_SECONDS = 5.0  # how often a wait for a candidate wakes up (to notice a timeout)

# what trials keep beside their value
# (each journal entry is a write and an fsync: a trial's outcome is one entry besides its value)
VALUES_ATTR, OUTCOME_ATTR = "splice_values", "splice_outcome"
FINGERPRINT_ATTR = "splice_sweep"


@dataclass(frozen=True)
class TrialRecord:
    """A finished trial as the results report it."""

    number: int
    values: dict[str, Value]
    score: float | None
    error: str | None
    merge_seconds: float
    eval_seconds: float
    worker: str

    @property
    def failed(self) -> bool:
        return self.score is None

    @staticmethod
    def of(trial: FrozenTrial) -> TrialRecord:
        attrs = trial.user_attrs
        outcome = attrs.get(OUTCOME_ATTR) or {}
        return TrialRecord(
            trial.number,
            dict(attrs.get(VALUES_ATTR, {})),
            trial.value if trial.state == TrialState.COMPLETE else None,
            outcome.get("error"),
            float(outcome.get("merge_seconds", 0.0)),
            float(outcome.get("eval_seconds", 0.0)),
            str(outcome.get("worker", "")),
        )


OnTrial = Callable[[TrialRecord], None]
Direction = Literal["maximize", "minimize"]


def open_study(journal: Path, direction: Direction, fingerprint: dict[str, Any], resume: bool) -> optuna.Study:
    """The study in `journal`: created (resume False), or loaded and checked to be this sweep's (resume True)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(journal)))
    if not resume:
        study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction=direction)
        study.set_user_attr(FINGERPRINT_ATTR, fingerprint)
        return study
    study = optuna.load_study(storage=storage, study_name=STUDY_NAME)
    started = study.user_attrs.get(FINGERPRINT_ATTR)
    if started != fingerprint:
        changed = sorted(k for k in fingerprint if (started or {}).get(k) != fingerprint[k])
        raise SpliceError(
            f"{journal} was started by a different sweep (changed: {', '.join(changed) or 'all'}); resume with "
            f"the sweep file it was started with, or pass {parameter('force', True)} to start over"
        )
    return study


def sampler_for(method: str, seed: int, number: int) -> BaseSampler:
    """Trial `number`'s sampler, seeded from the sweep's seed and the number alone."""
    trial_seed = (seed * 1_000_003 + number) % (2**32)
    if method == "tpe":
        return TPESampler(seed=trial_seed)
    if method == "cmaes":
        return CmaEsSampler(seed=trial_seed, warn_independent_sampling=False)
    return RandomSampler(seed=trial_seed)  # random, and grid (whose values are enqueued)


def grid_points(sweep: Sweep) -> list[dict[str, Value]]:
    """The grid's candidates in the order trials take them (a seeded shuffle when the budget is smaller)."""
    names = [p.name for p in sweep.parameters]
    points = [dict(zip(names, values)) for values in itertools.product(*(p.grid() for p in sweep.parameters))]
    if sweep.trials < len(points):
        random.Random(sweep.file.search.seed).shuffle(points)
    return points[: sweep.trials]


class StudyDriver:
    """Asks the study for candidates, runs them on an executor, tells the study what they scored."""

    def __init__(
        self,
        sweep: Sweep,
        study: optuna.Study,
        executor: Executor,
        candidate_of: Callable[[int, dict[str, Value], dict[str, Any]], MergeCandidate],
        budget: int,
    ):
        self.sweep = sweep
        self.study = study
        self.executor = executor
        self.candidate_of = candidate_of
        self.budget = budget
        self.distributions = {p.name: p.distribution() for p in sweep.parameters}
        self.grid = grid_points(sweep) if sweep.method == "grid" else []
        self.batched = sweep.method in ("tpe", "cmaes")
        self.by_name = {p.name: p for p in sweep.parameters}
        self.running: dict[int, int] = {}  # trial number -> the storage's trial id, until the trial is told

    def run(self, on_trial: OnTrial, progress: Progress) -> None:
        trials = self.study.get_trials(deepcopy=False)
        finished = [t for t in trials if t.state.is_finished()]
        progress.start("sweep", self.budget, 0, unit="trials")
        progress.advance(len(finished), 0)
        try:
            for trial in trials:  # running when the driver died: run again, under the same number
                if trial.state == TrialState.RUNNING:
                    values = trial.user_attrs.get(VALUES_ATTR) or self._asked_again(trial)
                    self._submit(trial.number, trial._trial_id, dict(values))
            asked = sum(1 for t in trials if t.state != TrialState.WAITING)
            while self.running or asked < self.budget:
                while asked < self.budget and len(self.running) < self.executor.slots:
                    if self.batched and self.running and asked % self.executor.slots == 0:
                        break  # the next batch learns from this one: it waits until this one has finished
                    self._ask()
                    asked += 1
                outcome = self.executor.next_outcome(POLL_SECONDS)
                if outcome is not None:
                    on_trial(self._tell(outcome))
                    progress.advance(1, 0)
        finally:
            progress.finish()

    def _values(self, params: dict[str, Any]) -> dict[str, Value]:
        return {name: self.by_name[name].value(value) for name, value in params.items()}

    def _ask(self) -> None:
        trials = self.study.get_trials(deepcopy=False)
        number = len(trials)
        if self.grid and not any(t.state == TrialState.WAITING for t in trials):
            self.study.enqueue_trial(self.grid[number])
        self.study.sampler = sampler_for(self.sweep.method, self.sweep.file.search.seed, number)
        trial = self.study.ask(self.distributions)
        values = self._values(trial.params)
        trial.set_user_attr(VALUES_ATTR, values)
        self._submit(trial.number, trial._trial_id, values)

    def _asked_again(self, trial: FrozenTrial) -> dict[str, Value]:
        """The values of a trial the driver died while asking (it never reached a worker): the parameters it had not
        written yet are asked of its own seeded sampler, and the values recorded as `_ask` records them."""
        self.study.sampler = sampler_for(self.sweep.method, self.sweep.file.search.seed, trial.number)
        live = optuna.trial.Trial(self.study, trial._trial_id)
        values = {p.name: p.suggest(live) for p in self.sweep.parameters}  # a parameter written already stays
        live.set_user_attr(VALUES_ATTR, values)
        return values

    def _submit(self, number: int, trial_id: int, values: dict[str, Value]) -> None:
        recipe = fill(self.sweep.recipe, values, self.sweep.parameters)
        self.executor.submit(self.candidate_of(number, values, recipe))
        self.running[number] = trial_id

    def _tell(self, outcome: Outcome) -> TrialRecord:
        live = optuna.trial.Trial(self.study, self.running.pop(outcome.number))
        recorded = {
            "merge_seconds": round(outcome.merge_seconds, 6),
            "eval_seconds": round(outcome.eval_seconds, 6),
            "worker": outcome.worker,
            "error": outcome.error,
        }
        live.set_user_attr(OUTCOME_ATTR, recorded)
        if outcome.failed:
            frozen = self.study.tell(outcome.number, state=TrialState.FAIL)
        else:
            frozen = self.study.tell(outcome.number, outcome.score)
        return TrialRecord.of(frozen)


def finished_records(study: optuna.Study) -> list[TrialRecord]:
    return [TrialRecord.of(t) for t in study.get_trials(deepcopy=False) if t.state.is_finished()]


def ranked(records: Iterable[TrialRecord], direction: str) -> list[TrialRecord]:
    """Scored trials best first (among equal scores, the lower number first), then the failed ones by number."""
    sign = -1.0 if direction == "maximize" else 1.0
    records = list(records)
    scored = sorted((r for r in records if not r.failed), key=lambda r: (sign * (r.score or 0.0), r.number))
    return scored + sorted((r for r in records if r.failed), key=lambda r: r.number)


def best_record(records: list[TrialRecord], direction: str) -> TrialRecord | None:
    """The best scored trial (the lowest-numbered among equals), or None when every trial failed."""
    first = ranked(records, direction)[:1]
    return first[0] if first and not first[0].failed else None


def fingerprint(sweep: Sweep) -> dict[str, Any]:
    """What a resumed journal must have been started with (the budget may grow; anything else changes the study)."""
    search = sweep.file.search
    return {
        "method": search.method,
        "seed": search.seed,
        "direction": sweep.file.evaluate.direction,
        "recipe": json.loads(json.dumps(sweep.recipe, sort_keys=True, default=str)),
        "ingredients": list(sweep.ingredients),
    }
