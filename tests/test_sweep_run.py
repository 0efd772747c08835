"""`splice.sweep` on the local executor (issue 18), checked against work done in the test itself: the grid's trials
against the same recipes merged to disk with `splice.merge` and scored by the same function (the best against an
exhaustive loop), the exact budget counted in the evaluation hook's own calls, failed candidates recorded and passed
over, the output rule and what `keep` keeps, and seeded searches that repeat, in this process and on a pool.

tests/test_sweep_cli.py drives the same sweeps through `splice sweep` (kill and resume, Ctrl-C, bad sweep files)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml

import splice
from splice.errors import OutputExistsError, SpliceError

from conftest import perturbed, save, tiny_model
from helpers import load_dir

# The evaluation hook: minus the L2 distance of the candidate to a target model (loaded from the path in `args`).
# Each call appends one line (its score, the `extra` argument as it arrived, the model directory it was given, its
# process) to the `calls` file: the tests count evaluations there. `block_at`: the call with that number touches
# `marker` and sleeps (a driver killed there dies mid-candidate). A score listed in `raise_for` raises instead, one
# in `nan_for` comes back NaN.
HOOK = """
import fcntl, json, math, os, time
from pathlib import Path

from safetensors.torch import load_file


def distance_score(state, target):
    assert state.keys() == target.keys(), sorted(state.keys() ^ target.keys())
    return -math.sqrt(sum(float(((state[k].double() - target[k].double()) ** 2).sum()) for k in sorted(target)))


def score(state, model_dir, *, target, calls, extra=None, block_at=0, marker=None, raise_for=(), nan_for=()):
    value = distance_score(state, load_file(target))
    with open(calls, "a+") as log:
        fcntl.flock(log, fcntl.LOCK_EX)  # pool workers append at once: the lines are numbered under the lock
        log.seek(0)
        number = len(log.read().splitlines()) + 1
        log.write(json.dumps({"score": value, "extra": extra, "model_dir": model_dir, "pid": os.getpid()}) + "\\n")
    if number == block_at:
        Path(marker).touch()
        time.sleep(600)
    if value in raise_for:
        raise ValueError(f"no good at {value}\\nsecond line")
    return float("nan") if value in nan_for else value
"""

DENSITY, WEIGHT = "models[0].parameters.density", "models[1].parameters.weight"
GRID = [(density, weight) for density in (0.5, 0.9) for weight in (0.5, 0.75, 1.0)]  # the grid, written out
DENSITY_CHOICE = {"search": "choice", "values": [0.5, 0.9]}
WEIGHT_STEPS = {"search": "uniform", "low": 0.5, "high": 1.0, "step": 0.25}
CPU = splice.RunOptions(device="cpu")


@dataclass(frozen=True)
class Bench:
    """A base model, two fine-tunes of it, a target the hook measures distance to, and the hook file."""

    root: Path
    base: Path
    first: Path
    second: Path
    target: Path
    hook: Path

    def ties(self, density: Any, weight: Any, method: str = "ties") -> dict:
        """The recipe searched here, with `density` (first model) and `weight` (second model) as values or marks."""
        return {
            "merge_method": method,
            "base_model": str(self.base),
            "models": [
                {"model": str(self.first), "parameters": {"weight": 1.0, "density": density}},
                {"model": str(self.second), "parameters": {"weight": weight, "density": 0.7}},
            ],
        }

    def continuous(self, method: str = "ties") -> dict:
        return self.ties(
            {"search": "uniform", "low": 0.3, "high": 0.9}, {"search": "uniform", "low": 0.5, "high": 1.0}, method
        )

    def sweep_file(
        self, name: str, recipe: dict, search: dict, *, keep: str = "best", out: str | None = None, **args: Any
    ) -> Path:
        """NAME.yml scoring with the hook; its calls are counted in NAME.calls; `args` go to the hook as they are."""
        hook_args = {"target": str(self.target / "model.safetensors"), "calls": str(self.calls(name)), **args}
        sweep: dict[str, Any] = {
            "recipe": recipe,
            "search": search,
            "evaluate": {"hook": f"{self.hook}:score", "args": hook_args},
            "keep": keep,
        }
        if out is not None:
            sweep["out"] = out
        path = self.root / f"{name}.yml"
        path.write_text(yaml.safe_dump(sweep, sort_keys=False))
        return path

    def calls(self, name: str) -> Path:
        return self.root / f"{name}.calls"

    def calls_of(self, name: str) -> list[dict]:
        """The hook's calls for sweep file NAME, in order (none when the hook never ran)."""
        path = self.calls(name)
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def merged_score(self, recipe: dict, out: Path, seed: int | None = None) -> float:
        """`recipe` merged to disk by `splice.merge` and scored by the hook's own distance, away from any sweep."""
        path = out.with_suffix(".yml")
        path.write_text(yaml.safe_dump(recipe))
        splice.merge(path, out, seed=seed, device="cpu")
        return self.scorer(load_dir(out), load_dir(self.target))

    @property
    def scorer(self) -> Callable[[dict, dict], float]:
        spec = importlib.util.spec_from_file_location("sweep_test_scoring", self.hook)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.distance_score


def make_bench(make_models, root: Path) -> Bench:
    base, first, second = make_models("llama", 3)
    target = save(perturbed(tiny_model("llama", 0), 9, scale=0.05), root / "target", False)
    hook = root / "evals.py"
    hook.write_text(HOOK)
    return Bench(root, base, first, second, target, hook)


@pytest.fixture
def bench(make_models, tmp_path) -> Bench:
    return make_bench(make_models, tmp_path)


def point(values: dict) -> tuple:
    return values[DENSITY], values[WEIGHT]


def outcomes(out: Path) -> list[tuple]:
    """Every trial in OUT/sweep_results.json as (number, values, score, error), by number."""
    trials = json.loads((out / "sweep_results.json").read_text())["trials"]
    return [(t["number"], t["values"], t["score"], t["error"]) for t in trials]


def journal_study(out: Path) -> optuna.Study:
    """The study in OUT's journal, read with Optuna itself."""
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / "sweep.journal")))
    (study,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=study.study_name, storage=storage)


def journal_trials(out: Path) -> list[optuna.trial.FrozenTrial]:
    return journal_study(out).get_trials(deepcopy=False)


def grid_scores(bench: Bench, where: Path) -> dict[tuple, float]:
    """Each point of the grid merged to disk on its own and scored: the exhaustive loop a sweep must agree with."""
    where.mkdir()
    return {
        (density, weight): bench.merged_score(bench.ties(density, weight), where / f"d{density}-w{weight}")
        for density, weight in GRID
    }


def test_a_grid_sweep_finds_the_best_of_an_exhaustive_loop_of_merges(bench, tmp_path):
    extra = {"split": "val", "k": [1, 2], "nested": {"x": 0.5, "flag": True}}
    path = bench.sweep_file("grid", bench.ties(DENSITY_CHOICE, WEIGHT_STEPS), {"method": "grid"}, extra=extra)
    report = splice.sweep(path, out=tmp_path / "out", workers=1, run=CPU)

    expected = grid_scores(bench, tmp_path / "by-hand")
    assert len(set(expected.values())) == len(GRID)  # the points score apart: one of them is the best
    assert sorted(t.number for t in report.trials) == list(range(len(GRID)))
    assert {point(t.values): t.score for t in report.trials} == expected  # every point once, scored as its merge
    best = max(expected, key=lambda p: expected[p])
    assert report.best is not None and (point(report.best.values), report.best.score) == (best, expected[best])

    written = json.loads((tmp_path / "out" / "sweep_results.json").read_text())
    assert written["best"]["number"] == report.best.number and written["best"]["score"] == expected[best]
    assert outcomes(tmp_path / "out") == [(t.number, t.values, t.score, None) for t in report.trials]
    calls = bench.calls_of("grid")
    assert sorted(c["score"] for c in calls) == sorted(expected.values())  # one evaluation a candidate
    assert all(c["extra"] == extra for c in calls)  # `args` reach the hook unchanged
    assert {c["pid"] for c in calls} == {os.getpid()}  # one worker: candidates run in this process


@pytest.mark.parametrize("method", ["random", "tpe", "cmaes"])
def test_the_budget_is_exact_and_max_trials_replaces_it(bench, tmp_path, method):
    path = bench.sweep_file(method, bench.continuous(), {"method": method, "seed": 1, "trials": 3})
    report = splice.sweep(path, out=tmp_path / "out", workers=1, run=CPU)
    first = outcomes(tmp_path / "out")
    assert [t[0] for t in first] == [0, 1, 2] and all(t[3] is None for t in first)
    assert sorted(c["score"] for c in bench.calls_of(method)) == sorted(t.score for t in report.trials)

    fewer = splice.sweep(path, out=tmp_path / "fewer", workers=1, max_trials=2, run=CPU)
    assert len(fewer.trials) == 2 and len(bench.calls_of(method)) == 3 + 2
    assert outcomes(tmp_path / "fewer") == first[:2]  # trial N's values depend on the seed and N alone

    more = splice.sweep(path, out=tmp_path / "out", workers=1, resume=True, max_trials=5, run=CPU)
    assert (more.skipped, more.rerun) == (3, 0)
    assert len(bench.calls_of(method)) == 5 + 2  # only the two extra trials ran
    grown = outcomes(tmp_path / "out")
    assert [t[0] for t in grown] == [0, 1, 2, 3, 4] and grown[:3] == first
    assert [c["score"] for c in bench.calls_of(method)[5:]] == [t[2] for t in grown[3:]]

    with pytest.raises(SpliceError, match="the journal holds 5 trials already, more than the budget of 3"):
        splice.sweep(path, out=tmp_path / "out", workers=1, resume=True, run=CPU)
    assert len(bench.calls_of(method)) == 7


def test_a_trial_the_driver_died_asking_is_asked_the_rest_and_run_on_resume(bench, tmp_path):
    """A driver killed between Optuna's ask and the write of a trial's last parameter leaves it running with part of
    its values, never handed to a worker: a resume asks it the rest and runs it once."""
    path = bench.sweep_file("asked", bench.continuous(), {"method": "random", "seed": 6, "trials": 3})
    out = tmp_path / "out"
    splice.sweep(path, out=out, workers=1, max_trials=2, run=CPU)
    half = journal_study(out).ask({DENSITY: optuna.distributions.FloatDistribution(0.3, 0.9)})  # weight not written

    resumed = splice.sweep(path, out=out, workers=1, resume=True, run=CPU)
    assert (resumed.skipped, resumed.rerun) == (2, 1)
    third = next(t for t in resumed.trials if t.number == half.number == 2)
    assert third.values[DENSITY] == half.params[DENSITY] and 0.5 <= third.values[WEIGHT] <= 1.0
    assert third.score == bench.merged_score(bench.ties(*point(third.values)), tmp_path / "by-hand")
    assert [c["score"] for c in bench.calls_of("asked")][2:] == [third.score]
    assert outcomes(out)[2] == (2, third.values, third.score, None)


def test_a_failing_candidate_is_recorded_and_the_sweep_goes_on(bench, tmp_path):
    expected = grid_scores(bench, tmp_path / "by-hand")
    raising, returning_nan, *others = sorted(expected, key=lambda p: expected[p], reverse=True)  # the two best fail
    path = bench.sweep_file(
        "failing",
        bench.ties(DENSITY_CHOICE, WEIGHT_STEPS),
        {"method": "grid"},
        raise_for=[expected[raising]],
        nan_for=[expected[returning_nan]],
    )
    out = tmp_path / "out"
    report = splice.sweep(path, out=out, workers=1, run=CPU)

    assert len(report.trials) == len(GRID) and len(bench.calls_of("failing")) == len(GRID)
    failed = {point(t.values): t.error for t in report.trials if t.failed}
    assert set(failed) == {raising, returning_nan}
    assert failed[raising].startswith(f"`evaluate.hook` {bench.hook}:score raised ValueError: no good at")
    assert "second line" not in failed[raising]
    assert "returned nan" in failed[returning_nan] and "a score must be a finite number" in failed[returning_nan]
    assert all("\n" not in error for error in failed.values())
    assert {point(t.values): t.score for t in report.trials if not t.failed} == {p: expected[p] for p in others}
    assert report.best is not None and point(report.best.values) == others[0]

    by_number = {t.number: t for t in report.trials}
    assert outcomes(out) == [(n, t.values, t.score, t.error) for n, t in sorted(by_number.items())]
    with (out / "sweep_results.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert [int(row["trial"]) for row in rows] == sorted(by_number)
    for row in rows:
        trial = by_number[int(row["trial"])]
        assert (float(row[DENSITY]), float(row[WEIGHT])) == point(trial.values)
        assert row["state"] == ("failed" if trial.failed else "complete")
        assert row["score"] == ("" if trial.failed else repr(trial.score)) and row["error"] == (trial.error or "")
    best_recipe = yaml.safe_load((out / "best_recipe.yaml").read_text())
    assert best_recipe == bench.ties(*others[0])


def test_an_output_overlapping_an_input_is_refused_before_any_trial(bench):
    path = bench.sweep_file("overlap", bench.ties(DENSITY_CHOICE, WEIGHT_STEPS), {"method": "grid"})
    for out, relation in ((bench.base, "is"), (bench.first / "inside", "is inside"), (bench.root, "contains")):
        with pytest.raises(SpliceError, match=f"`out` {out} {relation} an input .*writing there would destroy it"):
            splice.sweep(path, out=out, workers=1, run=CPU)
    assert not bench.calls("overlap").exists()
    assert not (bench.first / "inside").exists() and (bench.base / "config.json").is_file()


def test_the_files_a_sweep_leaves_keep_all_keep_none_and_force(bench, tmp_path):
    out = tmp_path / "out"
    path = bench.sweep_file(
        "kept", bench.ties(DENSITY_CHOICE, WEIGHT_STEPS), {"method": "grid", "trials": 4}, keep="all"
    )
    report = splice.sweep(path, out=out, workers=1, run=CPU)
    assert report.best is not None
    names = {p.name for p in out.iterdir()}
    assert {"sweep.journal", "sweep_results.json", "sweep_results.csv", "best_recipe.yaml", "best"} <= names
    for png in ("score_by_parameter.png", "score_over_trials.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "best" / "config.json").is_file()

    candidates = out / "candidates"
    assert sorted(p.name for p in candidates.iterdir()) == [f"trial-{n:04d}" for n in range(4)]
    for trial in report.trials:  # each kept candidate is that trial's merge, and is what the hook was given
        kept = load_dir(candidates / f"trial-{trial.number:04d}")
        by_hand = tmp_path / f"by-hand-{trial.number}"
        assert bench.merged_score(bench.ties(*point(trial.values)), by_hand) == trial.score
        expected = load_dir(by_hand)
        assert kept.keys() == expected.keys() and all(torch.equal(kept[k], expected[k]) for k in expected)
    assert sorted(Path(c["model_dir"]) for c in bench.calls_of("kept")) == sorted(candidates.iterdir())
    best, best_candidate = load_dir(out / "best"), load_dir(candidates / f"trial-{report.best.number:04d}")
    assert all(torch.equal(best[k], best_candidate[k]) for k in best_candidate)

    with pytest.raises(OutputExistsError, match="holds an earlier sweep"):
        splice.sweep(path, out=out, workers=1, max_trials=2, run=CPU)
    assert len(bench.calls_of("kept")) == 4
    splice.sweep(path, out=out, workers=1, max_trials=2, run=CPU.replace(force=True))  # starts over
    assert sorted(p.name for p in candidates.iterdir()) == ["trial-0000", "trial-0001"]  # the old ones are gone
    assert [t.number for t in journal_trials(out)] == [0, 1]  # a new journal
    assert [t[0] for t in outcomes(out)] == [0, 1] and len(bench.calls_of("kept")) == 4 + 2

    nothing = tmp_path / "nothing"
    path = bench.sweep_file(
        "none", bench.ties(DENSITY_CHOICE, WEIGHT_STEPS), {"method": "grid", "trials": 2}, keep="none"
    )
    report = splice.sweep(path, out=nothing, workers=1, run=CPU)
    assert report.best_model is None
    assert sorted(p.name for p in nothing.iterdir()) == sorted(
        ["sweep.journal", "sweep_results.json", "sweep_results.csv", "best_recipe.yaml"]
        + ["score_by_parameter.png", "score_over_trials.png"]
    )


def test_a_seeded_tpe_sweep_repeats_in_this_process_and_on_a_pool(bench, tmp_path):
    """12 trials: TPE's first 10 are its random start, the last two come from its model of the ones before (on a
    pool, asked in batches of two)."""
    search = {"method": "tpe", "seed": 4, "trials": 12}
    path = bench.sweep_file("tpe", bench.continuous(), search)
    runs = {
        workers: [
            outcomes(splice.sweep(path, out=tmp_path / f"w{workers}-{i}", workers=workers, run=CPU).out) for i in (0, 1)
        ]
        for workers in (1, 2)
    }
    for first, second in runs.values():
        assert first == second
        assert [t[0] for t in first] == list(range(12)) and all(t[3] is None for t in first)
        assert len({point(t[1]) for t in first}) == 12
    pool_calls = bench.calls_of("tpe")[24:]
    assert len(pool_calls) == 24 and os.getpid() not in {c["pid"] for c in pool_calls}  # the pool ran them

    other = bench.sweep_file("tpe-seed-5", bench.continuous(), {**search, "seed": 5})
    reseeded = outcomes(splice.sweep(other, out=tmp_path / "seed-5", workers=1, run=CPU).out)
    assert [point(t[1]) for t in reseeded] != [point(t[1]) for t in runs[1][0]]
