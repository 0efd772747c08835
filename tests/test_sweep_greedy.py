"""The speculative greedy soup of `splice sweep` (issue 18) keeps exactly what `splice soup --greedy` keeps, in the
same order, with the same score and the same tensors, whatever the speculation window and the worker count; its
speculation counts (evaluations, thrown-away ones, rounds) follow from the accept/reject sequence alone; `strict`
is --strict; an ingredient whose own evaluation fails is reported and left out; a greedy sweep is not resumable.

The ingredients are seeded perturbations of a base model and the hook scores the distance to the base, so averaging
independent noise helps: sorted by their own scores they are g1, a bit-identical copy of g1 (kept on a tie,
refused by strict), x (g1's own noise again: no help, rejected), g2 and g3 (independent noise: accepted), and two
far ones (rejected). With 4 candidates at once, g2's acceptance comes second in its window."""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import splice
from splice.options import RunOptions

from conftest import perturbed, save, tiny_model
from helpers import load_dir, run_cli

# name: (noise seed, noise scale); listed in this order, which is not the order of their scores
INGREDIENTS = {
    "b1": (5, 0.05),
    "g3": (3, 0.012),
    "x": (1, 0.0105),
    "g1": (1, 0.010),
    "g2": (2, 0.011),
    "b2": (6, 0.08),
    "g1copy": (1, 0.010),
}
POISON = 123.0  # the hook refuses a state holding this value: the poisoned ingredient's own evaluation fails

HOOK = textwrap.dedent("""
    from safetensors.torch import load_file

    BASE = load_file({base!r})


    def score(state):
        if any(bool((t == {poison!r}).any()) for t in state.values() if t.is_floating_point()):
            raise RuntimeError("a poisoned ingredient")
        return -sum(float(((state[k].double() - BASE[k].double()) ** 2).sum()) for k in BASE)
""")


class Models:
    def __init__(self, where: Path):
        base = tiny_model("llama", 0)
        save(base, where / "base", sharded=False)
        self.paths = {
            name: str(save(perturbed(base, seed, scale), where / name, sharded=False))
            for name, (seed, scale) in INGREDIENTS.items()
        }
        poisoned = perturbed(base, 7, 0.0115)
        with torch.no_grad():
            poisoned.model.norm.weight[0] = POISON
        self.poisoned = str(save(poisoned, where / "poisoned", sharded=False))
        self.hook = where / "distance.py"
        self.hook.write_text(HOOK.format(base=str(where / "base" / "model.safetensors"), poison=POISON))
        self.ingredients = list(self.paths.values())
        self.reference = splice.greedy_soup(self.ingredients, where / "greedy", f"{self.hook}:score", device="cpu")

    def name(self, path: str) -> str:
        return Path(path).name


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Models:
    return Models(tmp_path_factory.mktemp("greedy-models"))


def write_sweep(directory: Path, models: Models, ingredients: list[str], **search) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "sweep.yaml"
    sweep = {
        "search": {"method": "greedy_soup", "ingredients": ingredients, **search},
        "evaluate": {"hook": f"{models.hook}:score"},
        "out": str(directory / "out"),
    }
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def speculation(decisions: list[bool], speculate: int) -> tuple[int, int, int]:
    """(evaluations, thrown away, rounds) of an accept/reject pass that evaluates the next `speculate` decisions at
    once against the current soup and keeps those up to the window's first acceptance."""
    evaluations = wasted = rounds = position = 0
    while position < len(decisions):
        window = decisions[position : position + speculate]
        used = window.index(True) + 1 if True in window else len(window)
        rounds += 1
        evaluations += len(window)
        wasted += len(window) - used
        position += used
    return evaluations, wasted, rounds


def steps(report) -> list[tuple]:
    return [(s.model, s.score, s.soup_score, s.kept, s.tie) for s in report.steps]


def same_tensors(one: Path, other: Path) -> None:
    a, b = load_dir(one), load_dir(other)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_the_ingredients_exercise_every_decision(models):
    """What the tests below rely on: the sequential greedy soup over these ingredients keeps g1, its copy on a tie,
    g2 and g3; rejects x and the far ones; and 4 candidates at once throw away evaluations mid-window."""
    reference = models.reference
    assert [models.name(s.model) for s in reference.steps] == ["g1", "g1copy", "x", "g2", "g3", "b1", "b2"]
    assert [models.name(m) for m in reference.kept] == ["g1", "g1copy", "g2", "g3"]
    decisions = [s.kept for s in reference.steps[1:]]
    assert decisions == [True, False, True, True, False, False]
    assert [s.tie for s in reference.steps] == [False, True, False, False, False, False, False]
    assert speculation(decisions, 1) == (6, 0, 6)
    assert speculation(decisions, 2) == (8, 2, 4)
    assert speculation(decisions, 4) == (13, 7, 4)  # g2 is accepted second in the window [x, g2, g3, b1]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("speculate", [1, 2, 4])
def test_a_speculative_greedy_sweep_keeps_what_the_greedy_soup_keeps(models, tmp_path, speculate, workers):
    path = write_sweep(tmp_path, models, models.ingredients, speculate=speculate)
    report = splice.sweep(path, workers=workers)
    reference = models.reference
    greedy = report.greedy

    assert greedy.kept == reference.kept  # the same ingredients, in the same order
    assert greedy.soup_score == reference.soup_score
    assert [(s.model, s.score, s.soup_score, s.kept, s.tie) for s in greedy.steps] == steps(reference)
    assert greedy.scores == {s.model: s.score for s in reference.steps} and greedy.failed == {}
    same_tensors(tmp_path / "out" / "best", reference.out)

    decisions = [s.kept for s in reference.steps[1:]]
    evaluations, wasted, rounds = speculation(decisions, speculate)
    count = greedy.speculation
    assert (count.speculate, count.evaluations, count.wasted, count.rounds) == (speculate, evaluations, wasted, rounds)
    assert (count.sequential_rounds, count.saved_rounds) == (len(decisions), len(decisions) - rounds)
    assert len(report.trials) == len(models.ingredients) + evaluations  # each own score, then the pass
    assert sorted(t.number for t in report.trials) == list(range(len(report.trials)))
    assert report.workers == workers
    if workers == 2:
        assert os.getpid() not in {int(t.worker.split(":")[1]) for t in report.trials}

    written = json.loads((tmp_path / "out" / "sweep_results.json").read_text())["greedy_soup"]
    assert written["kept"] == reference.kept and written["soup_score"] == reference.soup_score
    assert written["speculation"] == {
        "speculate": speculate,
        "evaluations": evaluations,
        "wasted": wasted,
        "rounds": rounds,
        "sequential_rounds": len(decisions),
        "saved_rounds": len(decisions) - rounds,
    }
    assert (tmp_path / "out" / "greedy_soup.png").is_file()


def test_strict_is_splice_soup_greedy_strict_and_a_greedy_sweep_is_not_resumable(models, tmp_path, monkeypatch, capsys):
    path = write_sweep(tmp_path, models, models.ingredients, speculate=4, strict=True)
    code, out, err = run_cli(["sweep", path, "--workers", "1", "--json"], monkeypatch, capsys)
    assert code == 0, err
    swept = json.loads(out)["greedy_soup"]
    code, out, err = run_cli(
        ["soup", *models.ingredients, "--out", tmp_path / "soup", "--greedy", "--strict"]
        + ["--eval", f"{models.hook}:score", "--device", "cpu", "--json"],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    souped = json.loads(out)
    kept = [s["model"] for s in souped["steps"] if s["kept"]]
    assert [Path(m).name for m in kept] == ["g1", "g2", "g3"]  # the copy's tie is refused
    assert swept["kept"] == kept and swept["soup_score"] == souped["soup_score"]
    assert [s["kept"] for s in swept["steps"]] == [s["kept"] for s in souped["steps"]]
    assert [s["tie"] for s in swept["steps"]] == [False] * len(models.ingredients)
    same_tensors(tmp_path / "out" / "best", tmp_path / "soup")
    decisions = [s["kept"] for s in souped["steps"][1:]]
    assert decisions == [False, False, True, True, False, False]
    evaluations, wasted, rounds = speculation(decisions, 4)
    assert (evaluations, wasted, rounds) == (9, 3, 3)  # g2 is accepted third in the window [copy, x, g2, g3]
    assert {k: swept["speculation"][k] for k in ("evaluations", "wasted", "rounds")} == {
        "evaluations": evaluations,
        "wasted": wasted,
        "rounds": rounds,
    }

    # --resume: one line, exit 2, in the finished sweep's out and in a fresh one alike; nothing is touched
    results = tmp_path / "out" / "sweep_results.json"
    before = results.read_bytes(), results.stat().st_mtime_ns
    for out_dir in (tmp_path / "out", tmp_path / "fresh"):
        code, out, err = run_cli(["sweep", path, "--out", out_dir, "--resume"], monkeypatch, capsys)
        assert code == 2 and out == ""
        assert err.splitlines() == [
            "error: a greedy_soup sweep cannot be resumed: run it again (its evaluations are not journaled)"
        ]
    assert (results.read_bytes(), results.stat().st_mtime_ns) == before
    assert not (tmp_path / "fresh").exists()


def test_an_ingredient_whose_own_evaluation_fails_is_reported_and_left_out(models, tmp_path):
    ingredients = [*models.ingredients[:3], models.poisoned, *models.ingredients[3:]]
    path = write_sweep(tmp_path, models, ingredients, speculate=2)
    report = splice.sweep(path, workers=2)
    reference = models.reference
    greedy = report.greedy

    assert list(greedy.failed) == [models.poisoned]
    assert "a poisoned ingredient" in greedy.failed[models.poisoned] and "\n" not in greedy.failed[models.poisoned]
    failed = [t for t in report.trials if t.failed]
    assert [(t.values["ingredient"], t.error) for t in failed] == [(models.poisoned, greedy.failed[models.poisoned])]
    assert models.poisoned not in greedy.scores and models.poisoned not in {s.model for s in greedy.steps}
    assert greedy.kept == reference.kept and greedy.soup_score == reference.soup_score
    assert [(s.model, s.score, s.soup_score, s.kept, s.tie) for s in greedy.steps] == steps(reference)
    same_tensors(tmp_path / "out" / "best", reference.out)
    evaluations, wasted, rounds = speculation([s.kept for s in reference.steps[1:]], 2)
    count = greedy.speculation
    assert (count.evaluations, count.wasted, count.rounds) == (evaluations, wasted, rounds)
    assert len(report.trials) == len(ingredients) + evaluations
    written = json.loads((tmp_path / "out" / "sweep_results.json").read_text())["greedy_soup"]
    assert written["failed_ingredients"] == greedy.failed


def test_a_second_greedy_sweep_in_this_process_reads_the_ingredients_as_they_are_now(models, tmp_path):
    """One worker soups in this process: the soup it held for the first sweep must not stand in for an ingredient
    rewritten before the second."""
    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(models.paths["g1"], first)
    shutil.copytree(models.paths["g2"], second)
    path = write_sweep(tmp_path / "sweep", models, [str(first), str(second)], speculate=1)
    splice.sweep(path, workers=1)
    shutil.rmtree(first)
    shutil.copytree(models.paths["b1"], first)  # the same path, another model

    report = splice.sweep(path, workers=1, run=RunOptions(force=True))
    reference = splice.greedy_soup([first, second], tmp_path / "greedy", f"{models.hook}:score", device="cpu")
    assert report.greedy.scores == {s.model: s.score for s in reference.steps}
    assert report.greedy.kept == reference.kept and report.greedy.soup_score == reference.soup_score
    same_tensors(tmp_path / "sweep" / "out" / "best", reference.out)
