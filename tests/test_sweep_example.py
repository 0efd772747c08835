"""examples/sweep_digits.py --quick, run in-process (real sweeps on a local pool of 2 workers): the grid holds every
point once and TPE its budget; the score a sweep reports for a candidate is the held-out accuracy of a TIES merge of
that candidate's values computed here in plain torch; the best model written is the best trial; and the greedy
soup through the sweep keeps what a greedy pass computed here keeps, with the speculation accounting that pass
implies."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import sweep_digits
import torch
from safetensors.torch import load_file

from splice.demo import digits

SETTINGS = sweep_digits.QUICK


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[dict, Path, Path]:
    out = tmp_path_factory.mktemp("sweep-digits")
    work = out / "work"
    results = sweep_digits.main(["--out", str(out), "--workdir", str(work), "--quick"])
    return results, out, work


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def val_accuracy(state: dict[str, torch.Tensor], model_dir: Path) -> float:
    splits = digits.load_digits_splits(0)
    return digits.accuracy(digits.load_state(digits.load_model(model_dir), state), *splits.val)


def ties(base: dict, models: list[dict], weights: list[float], densities: list[float], lam: float) -> dict:
    """TIES (Yadav et al.) as mergekit defines it: each task vector keeps its top `density` fraction by magnitude,
    weighted; the sign with the larger weighted sum is elected per entry; entries agreeing with it are summed and
    divided by the sum of their weights (normalize), scaled by `lam` and added to the base."""
    merged = {}
    for name, theta in base.items():
        kept = []
        for model, density in zip(models, densities):
            delta = (model[name] - theta).flatten()
            mask = torch.zeros_like(delta)
            mask[torch.argsort(delta.abs(), descending=True)[: int(density * delta.numel())]] = 1
            kept.append(delta * mask)
        weighted = torch.stack(kept) * torch.tensor(weights)[:, None]
        elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
        agree = (weighted.sign() == elected).float()
        divisor = (torch.tensor(weights)[:, None] * agree).sum(0)
        divisor[divisor == 0] = 1
        merged[name] = theta + lam * ((weighted * agree).sum(0) / divisor).view_as(theta)
    return merged


def grid_values(bounds: tuple[float, float, float]) -> list[float]:
    low, high, step = bounds
    return [round(low + i * step, 10) for i in range(round((high - low) / step) + 1)]


def test_the_grid_holds_every_point_once_and_tpe_its_budget(study):
    results, _, _ = study
    grid, tpe = results["search"]["grid"], results["search"]["tpe"]
    axes = {
        "parameters.lambda": grid_values(SETTINGS.lam),
        "models[0].parameters.weight": grid_values(SETTINGS.weight),
        "models[0].parameters.density": grid_values(SETTINGS.density),
        "models[1].parameters.weight": grid_values(SETTINGS.weight),
        "models[1].parameters.density": grid_values(SETTINGS.density),
    }
    expected = {tuple(point) for point in itertools.product(*axes.values())}
    seen = [tuple(round(t["values"][name], 10) for name in axes) for t in grid["results"]]
    assert len(seen) == len(expected) == grid["trials"] == 27 and set(seen) == expected
    assert tpe["trials"] == grid["trials"] and grid["failed"] == tpe["failed"] == 0
    for trial in tpe["results"]:
        for name, (low, high, _) in zip(axes, (SETTINGS.lam, *[SETTINGS.weight, SETTINGS.density] * 2)):
            assert low <= trial["values"][name] <= high
    for found in (grid, tpe):  # the best: the highest score, the lowest number among equals; out/best scores it
        top = max(t["score"] for t in found["results"])
        assert found["best_trial_score"] == top
        assert found["best_trial"] == min(t["number"] for t in found["results"] if t["score"] == top)
        assert found["val"] == found["best_trial_score"]
        assert 0.0 <= found["test"] <= 1.0


def test_a_trial_scores_the_merge_of_its_values(study):
    results, _, work = study
    tasks = work / "tasks"
    base, models = tensors(tasks / "base"), [tensors(tasks / f"task-{name}") for name in sweep_digits.TASKS]
    grid = results["search"]["grid"]
    default = {name: 1.0 if "weight" in name or "lambda" in name else 0.5 for name in grid["best_values"]}
    best = grid["best_values"]
    assert default != best  # two different candidates
    for values in (default, best):
        merged = ties(
            base,
            models,
            [values["models[0].parameters.weight"], values["models[1].parameters.weight"]],
            [values["models[0].parameters.density"], values["models[1].parameters.density"]],
            values["parameters.lambda"],
        )
        (trial,) = [t for t in grid["results"] if t["values"] == values]
        assert trial["score"] == val_accuracy(merged, tasks / "base")
    written = tensors(work / "default-merge")
    for name, tensor in ties(base, models, [1.0, 1.0], [0.5, 0.5], 1.0).items():
        torch.testing.assert_close(written[name], tensor, rtol=0, atol=1e-6)
    assert results["search"]["default"]["val"] == [t for t in grid["results"] if t["values"] == default][0]["score"]


def speculation(decisions: list[bool], speculate: int) -> dict[str, int]:
    """Rounds of `speculate` candidates against the current soup: the decisions up to a round's first acceptance
    stand, what follows it is wasted and tried again."""
    evaluations = wasted = rounds = position = 0
    while position < len(decisions):
        window = decisions[position : position + speculate]
        rounds += 1
        evaluations += len(window)
        used = window.index(True) + 1 if True in window else len(window)
        wasted += len(window) - used
        position += used
    return {"evaluations": evaluations, "wasted": wasted, "rounds": rounds, "sequential_rounds": len(decisions)}


def test_the_greedy_sweep_keeps_what_a_greedy_pass_keeps(study):
    results, _, work = study
    soup_dir = work / "soup"
    paths = sorted(soup_dir.glob("ingredient-*"))
    states = {p.name: tensors(p) for p in paths}
    own = {name: val_accuracy(state, soup_dir / "base") for name, state in states.items()}
    order = sorted(own, key=lambda name: -own[name])  # stable: equal scores keep the listed order
    kept, best, decisions = [order[0]], own[order[0]], []
    for name in order[1:]:
        candidate = {t: torch.stack([states[k][t] for k in [*kept, name]]).mean(0) for t in states[name]}
        score = val_accuracy(candidate, soup_dir / "base")
        decisions.append(score >= best)
        if score >= best:
            kept, best = [*kept, name], score
    assert 1 < len(kept) < len(paths), "the quick soup should keep some ingredients and reject others"
    greedy = results["greedy_soup"]
    assert greedy["library"]["kept"] == kept and greedy["library"]["soup_score"] == best
    soup = {t: torch.stack([states[k][t] for k in kept]).mean(0) for t in states[kept[0]]}
    for speculate in SETTINGS.speculate:
        found = greedy["sweeps"][str(speculate)]
        assert found["kept"] == kept and found["soup_score"] == best
        assert found["same_as_library"] and found["same_tensors_as_library"]
        assert {k: found["speculation"][k] for k in ("evaluations", "wasted", "rounds", "sequential_rounds")} == (
            speculation(decisions, speculate)
        )
        assert found["evaluations"] == len(paths) + found["speculation"]["evaluations"]
        sweep_best = tensors(work / f"sweep-greedy-{speculate}-out" / "best")
        for name, tensor in soup.items():
            torch.testing.assert_close(sweep_best[name], tensor, rtol=0, atol=1e-6)


def test_the_json_and_the_plots_are_written(study):
    results, out, _ = study
    assert json.loads((out / sweep_digits.JSON_NAME).read_text()) == json.loads(json.dumps(results))
    plots = [f"grid-{name}" for name in sweep_digits.PLOTS[:2]] + [f"tpe-{name}" for name in sweep_digits.PLOTS[:2]]
    plots += [f"greedy-speculate{s}-greedy_soup.png" for s in SETTINGS.speculate]
    for name in plots:
        assert (out / f"sweep_digits-{name}").read_bytes().startswith(b"\x89PNG"), name
