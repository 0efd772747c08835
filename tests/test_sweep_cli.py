"""`splice sweep` through the command line (issue 18): best_recipe.yaml run by `splice merge` gives the best candidate
bit for bit; a driver killed with SIGKILL mid-candidate (in its own process, or with its pool) resumes without
running a finished trial again and ends where an uninterrupted sweep ends; Ctrl-C exits 130 and says how to go on;
every bad sweep is one line, exit 2, before any trial."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from test_sweep_run import CPU, DENSITY_CHOICE, WEIGHT_STEPS, Bench, journal_trials, make_bench, outcomes, point

import splice
from splice.merge.recipe import load_recipe, merged_state

from helpers import load_dir, run_cli, wait_for_marker

SPLICE = [sys.executable, "-m", "splice"]
ENV = {**os.environ, "PYTHONPATH": str(Path(splice.__file__).parents[1]), "COLUMNS": "200", "OMP_NUM_THREADS": "1"}


@pytest.fixture
def bench(make_models, tmp_path) -> Bench:
    return make_bench(make_models, tmp_path)


def splice_cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([*SPLICE, *map(str, args)], capture_output=True, text=True, timeout=180, env=ENV)


def start(*args: object) -> subprocess.Popen:
    """`splice ARGS` in a session of its own (a pool's processes share its process group)."""
    return subprocess.Popen(
        [*SPLICE, *map(str, args)],
        env=ENV,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def stop(process: subprocess.Popen, sig: signal.Signals) -> tuple[str, str]:
    """Signal the process (SIGKILL: its whole process group) and collect what it wrote."""
    try:
        if sig == signal.SIGKILL:
            os.killpg(process.pid, sig)
        else:
            process.send_signal(sig)
        return process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def test_best_recipe_through_splice_merge_is_the_best_candidate_bit_for_bit(bench, tmp_path):
    """dare_ties drops at random: the merge reproduces the best only with the seed best_recipe.yaml names."""
    out = tmp_path / "out"
    path = bench.sweep_file("dare", bench.continuous("dare_ties"), {"method": "random", "seed": 5, "trials": 3})
    result = splice_cli("sweep", path, "--out", out, "--workers", "1", "--device", "cpu", "--quiet")
    assert result.returncode == 0, result.stderr

    text = (out / "best_recipe.yaml").read_text()
    header = re.search(
        r"^# .*trial (\d+), score (\S+)\.\n# `splice merge best_recipe.yaml --out DIR --seed (\d+)`", text
    )
    assert header is not None, text
    number, seed = int(header[1]), int(header[3])
    best = [t for t in outcomes(out) if t[0] == number]
    assert seed == 5 and len(best) == 1 and float(header[2]) == best[0][2]
    assert max(t[2] for t in outcomes(out)) == best[0][2]
    assert yaml.safe_load(text) == bench.ties(*point(best[0][1]), method="dare_ties")

    merged = tmp_path / "merged"
    result = splice_cli(
        "merge", out / "best_recipe.yaml", "--out", merged, "--seed", seed, "--device", "cpu", "--quiet"
    )
    assert result.returncode == 0, result.stderr
    again, kept = load_dir(merged), load_dir(out / "best")
    in_memory = merged_state(load_recipe(out / "best_recipe.yaml"), seed=seed, run=CPU)
    assert again.keys() == kept.keys() == in_memory.keys()
    assert all(torch.equal(again[k], kept[k]) and torch.equal(again[k], in_memory[k]) for k in kept)
    assert bench.scorer(again, load_dir(bench.target)) == best[0][2]

    other_seed = merged_state(load_recipe(out / "best_recipe.yaml"), seed=seed + 1, run=CPU)
    assert any(not torch.equal(other_seed[k], kept[k]) for k in kept)  # without the seed it is another model


TPE_TRIALS, BLOCK_AT = 12, 11  # TPE's model picks trials 10 and 11; the 11th evaluation blocks


@pytest.mark.parametrize("workers", [1, 2], ids=["in_the_driver", "pool"])
def test_a_killed_sweep_resumes_and_ends_as_an_uninterrupted_one(bench, tmp_path, workers):
    search = {"method": "tpe", "seed": 2, "trials": TPE_TRIALS}
    marker = tmp_path / "blocked"
    path = bench.sweep_file("killed", bench.continuous(), search, keep="all", block_at=BLOCK_AT, marker=str(marker))
    out = tmp_path / "out"
    process = start("sweep", path, "--out", out, "--workers", workers, "--device", "cpu", "--quiet")
    started = time.monotonic()
    try:
        wait_for_marker(process, marker)
        # on the pool, the blocked trial's batch partner goes on: kill once it is told, not while the driver writes
        # the journal (a lock left behind holds a resume up for Optuna's grace period of 30 s)
        while workers > 1 and sum(t.state.is_finished() for t in journal_trials(out)) < BLOCK_AT:
            assert process.poll() is None and time.monotonic() - started < 90, "the partner was never told"
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        stop(process, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    before = bench.calls_of("killed")
    at_kill = journal_trials(out)
    finished = {t.number: t.value for t in at_kill if t.state.is_finished()}
    unfinished = {t.number for t in at_kill} - set(finished)
    # it died in the trial of the BLOCK_AT-th evaluation, after every trial before it (on the pool: the last batch's
    # other trial, trial BLOCK_AT - 1 or BLOCK_AT, was told too)
    assert len(at_kill) == len(before) == BLOCK_AT + (workers - 1)
    assert set(finished) | unfinished == set(range(len(at_kill))) and len(unfinished) == 1
    assert (unfinished == {BLOCK_AT - 1}) if workers == 1 else (unfinished < {BLOCK_AT - 1, BLOCK_AT})
    (blocked,) = unfinished

    resumed = splice_cli("sweep", path, "--out", out, "--resume", "--workers", workers, "--device", "cpu")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed: {len(finished)} trials kept from the journal, {len(unfinished)} run again" in resumed.stdout
    final = outcomes(out)
    after = bench.calls_of("killed")[len(before) :]
    # the resumed run evaluated exactly what had not finished, each once: the trials running at the kill again, and
    # the ones never asked
    assert Counter(c["score"] for c in after) == Counter(t[2] for t in final if t[0] not in finished)
    assert {t[0]: t[2] for t in final if t[0] in finished} == finished
    assert Counter(c["score"] for c in before) == Counter([*finished.values(), final[blocked][2]])
    # keep: all: every trial's candidate, a re-run one's written again over what the killed run had left
    candidates = out / "candidates"
    assert sorted(p.name for p in candidates.iterdir()) == [f"trial-{n:04d}" for n in range(TPE_TRIALS)]
    for number, values, score, _ in final:
        if number in unfinished:
            by_hand = tmp_path / f"by-hand-{number}"
            assert bench.merged_score(bench.ties(*point(values)), by_hand) == score
            kept, expected = load_dir(candidates / f"trial-{number:04d}"), load_dir(by_hand)
            assert kept.keys() == expected.keys() and all(torch.equal(kept[k], expected[k]) for k in expected)

    reference = bench.sweep_file("reference", bench.continuous(), search)
    splice.sweep(reference, out=tmp_path / "reference", workers=workers, run=CPU)
    assert final == outcomes(tmp_path / "reference")
    assert [t[0] for t in final] == list(range(TPE_TRIALS)) and all(t[3] is None for t in final)


def test_ctrl_c_exits_130_says_how_to_go_on_and_resume_finishes(bench, tmp_path):
    marker = tmp_path / "blocked"
    search = {"method": "random", "seed": 8, "trials": 3}
    path = bench.sweep_file("ctrl-c", bench.continuous(), search, out="ctrl-c-out", block_at=2, marker=str(marker))
    out = tmp_path / "ctrl-c-out"  # the sweep file's `out:`, beside it
    process = start("sweep", path, "--workers", "1", "--device", "cpu", "--quiet")
    try:
        wait_for_marker(process, marker)
    finally:
        _, stderr = stop(process, signal.SIGINT)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == (
        f"interrupted; the trials finished so far are in {out}/sweep.journal: --resume continues the sweep"
    )
    assert "Traceback" not in stderr
    assert [t.state.name for t in journal_trials(out)] == ["COMPLETE", "RUNNING"]

    resumed = splice_cli("sweep", path, "--resume", "--max-trials", "4", "--workers", "1", "--device", "cpu", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    calls = [c["score"] for c in bench.calls_of("ctrl-c")]
    final = outcomes(out)
    assert [t[0] for t in final] == [0, 1, 2, 3] and all(t[3] is None for t in final)
    assert calls == [final[0][2], final[1][2], final[1][2], final[2][2], final[3][2]]  # trial 1 ran again, once
    reference = bench.sweep_file("reference", bench.continuous(), search)
    splice.sweep(reference, out=tmp_path / "reference", workers=1, max_trials=4, run=CPU)
    assert final == outcomes(tmp_path / "reference")


def _recipe_with(bench: Bench, parameters: dict) -> dict:
    recipe = bench.ties(DENSITY_CHOICE, WEIGHT_STEPS)
    recipe["models"][0]["parameters"].update(parameters)
    return recipe


BAD_SWEEPS = {
    "unknown_parameter": (
        lambda b: {"recipe": _recipe_with(b, {"lamda": {"search": "uniform", "low": 0.1, "high": 0.9}})},
        [],
        r"lamda",
    ),
    "empty_grid": (
        lambda b: {"recipe": _recipe_with(b, {"density": {"search": "choice", "values": []}})},
        [],
        r"models\[0\]\.parameters\.density: .*at least 1 item",
    ),
    "grid_over_uniform_without_step": (
        lambda b: {"recipe": _recipe_with(b, {"density": {"search": "uniform", "low": 0.1, "high": 0.9}})},
        [],
        r"models\[0\]\.parameters\.density: a grid over uniform needs `step`",
    ),
    "low_above_high": (
        lambda b: {"recipe": _recipe_with(b, {"density": {"search": "uniform", "low": 0.9, "high": 0.1, "step": 0.1}})},
        [],
        r"low \(0\.9\) is above high \(0\.1\)",
    ),
    "hook_that_does_not_import": (lambda b: {"hook": "no_such_module_here:score"}, [], r"cannot import no_such_module"),
    "hook_without_the_function": (lambda b: {"hook": f"{b.hook}:nothing"}, [], r"evals\.py has no function nothing$"),
    "greedy_soup_with_a_recipe": (
        lambda b: {"search": {"method": "greedy_soup", "ingredients": [str(b.first), str(b.second)]}},
        [],
        r"a greedy_soup search soups its `search.ingredients`; drop `recipe`",
    ),
    "an_earlier_sweep": (
        lambda b: {},
        ["EARLIER"],
        r"holds an earlier sweep: resume it \(--resume\), or pass --force to start over$",
    ),
    "resume_with_nothing_to_resume": (
        lambda b: {},
        ["--resume"],
        r"nothing to resume: .*sweep\.journal does not exist",
    ),
    "address_with_the_local_executor": (
        lambda b: {},
        ["--address", "127.0.0.1:6379"],
        r"--address is for the ray executor: add --executor ray$",
    ),
    "force_with_an_address": (lambda b: {}, ["EARLIER", "--force", "--address", "auto"], r"--address is for the ray"),
    "force_with_no_trials": (
        lambda b: {},
        ["EARLIER", "--force", "--max-trials", "0"],
        r"--max-trials must be at least 1",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SWEEPS))
def test_every_bad_sweep_is_one_line_exit_2_and_no_trial(bench, tmp_path, monkeypatch, capsys, case):
    change, args, message = BAD_SWEEPS[case]
    changes = change(bench)
    out = tmp_path / "out"
    earlier = None
    if "EARLIER" in args:  # a finished sweep in out, from a file of its own
        args = [a for a in args if a != "EARLIER"]
        setup = bench.sweep_file("earlier", bench.ties(DENSITY_CHOICE, WEIGHT_STEPS), {"method": "grid", "trials": 1})
        splice.sweep(setup, out=out, workers=1, run=CPU)
        earlier = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    path = bench.sweep_file(
        "bad",
        changes.get("recipe", bench.ties(DENSITY_CHOICE, WEIGHT_STEPS)),
        changes.get("search", {"method": "grid"}),
    )
    if "hook" in changes:
        sweep = yaml.safe_load(path.read_text())
        sweep["evaluate"]["hook"] = changes["hook"]
        path.write_text(yaml.safe_dump(sweep))

    code, stdout, stderr = run_cli(
        ["sweep", path, "--out", out, "--workers", "1", "--quiet", *args], monkeypatch, capsys
    )
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert re.search(message, lines[0]), lines[0]
    assert stdout == ""
    assert not bench.calls("bad").exists()  # no trial ran
    if earlier is None:
        assert not out.exists()
    else:  # the earlier sweep is as it was
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == earlier
        assert (out / "best" / "config.json").is_file()
