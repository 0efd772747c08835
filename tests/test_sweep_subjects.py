"""Sweeps over what is not a merge recipe (issue 18): a port's scale (`recipe: {port: ...}`), each candidate the model
`splice.port_patch` writes at that scale, and a soup's weights (`recipe: {soup: ...}`), each candidate the linear
recipe `splice.merge` merges; the best written as those write it, and what `best_port.yaml` / `best_recipe.yaml`
say to run reproducing it bit for bit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

import splice
from splice.adapters.extract import extract_patch_to
from splice.adapters.port import port_patch
from splice.errors import SpliceError

from conftest import perturbed, save, tiny_model
from helpers import load_dir

HOOK = """
import math


def score(state, model_dir):
    # distance to 0.9 x the first fine-tune's norm: a scale below 1 scores best, so the argmax is not an end point
    total = sum(float((t.double() ** 2).sum()) for t in state.values() if t.is_floating_point())
    return -abs(math.sqrt(total) - TARGET)


TARGET = float(open(__file__.replace("hook.py", "target.txt")).read())
"""
CPU = splice.RunOptions(device="cpu")


def _norm(state: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in state.values() if t.is_floating_point()))


def _score(state: dict[str, torch.Tensor], target: float) -> float:
    return -abs(_norm(state) - target)


@pytest.fixture
def bench(tmp_path: Path) -> dict[str, Path]:
    base = tiny_model("llama", 0)
    paths = {
        "base": tmp_path / "base",
        "tuned": tmp_path / "tuned",
        "new": tmp_path / "new",
        "other": tmp_path / "other",
    }
    save(base, paths["base"], False)
    save(perturbed(base, 1, 0.05), paths["tuned"], False)
    save(perturbed(base, 2, 0.01), paths["new"], False)
    save(perturbed(base, 3, 0.05), paths["other"], False)
    extract_patch_to(tmp_path / "patch", paths["base"], paths["tuned"], "delta")
    paths["patch"] = tmp_path / "patch"
    target = 0.999 * _norm(load_dir(paths["tuned"]))
    (tmp_path / "target.txt").write_text(repr(target))
    (tmp_path / "hook.py").write_text(HOOK)
    paths["target"] = tmp_path / "target.txt"
    return paths


def _write(tmp_path: Path, name: str, sweep: dict) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


SCALES = [0.5, 0.75, 1.0, 1.25]


def test_a_port_sweep_scores_each_scale_as_port_writes_it_and_best_port_yaml_reproduces_the_best(
    bench: dict[str, Path], tmp_path: Path
) -> None:
    sweep = {
        "recipe": {
            "port": {
                "patch": str(bench["patch"]),
                "to": str(bench["new"]),
                "from": str(bench["base"]),
                "scale": {"search": "uniform", "low": 0.5, "high": 1.25, "step": 0.25},
            }
        },
        "search": {"method": "grid"},
        "evaluate": {"hook": "hook.py:score"},
        "out": "out",
    }
    report = splice.sweep(_write(tmp_path, "port.yml", sweep), workers=2, run=CPU)
    target = float(bench["target"].read_text())
    expected = {}
    for scale in SCALES:  # each candidate written by port_patch itself, then scored here
        port_patch(bench["patch"], bench["new"], out=tmp_path / f"p{scale}", old_base=bench["base"], scale=scale)
        expected[scale] = _score(load_dir(tmp_path / f"p{scale}"), target)
    got = {t.values["port.scale"]: t.score for t in report.trials}
    assert got == pytest.approx(expected, rel=0, abs=1e-9)
    best_scale = max(expected, key=lambda s: expected[s])
    assert report.best is not None and report.best.values == {"port.scale": best_scale}
    assert best_scale not in (SCALES[0], SCALES[-1])  # the search had something to find

    best = load_dir(tmp_path / "out" / "best")
    by_port = load_dir(tmp_path / f"p{best_scale}")
    assert best.keys() == by_port.keys() and all(torch.equal(best[k], by_port[k]) for k in best)
    written = (tmp_path / "out" / "best_port.yaml").read_text()
    assert f"--scale {best_scale!r} --out DIR" in written.splitlines()[1]
    assert yaml.safe_load(written)["port"]["scale"] == best_scale
    assert not (tmp_path / "out" / "best_recipe.yaml").exists()


def test_a_soup_sweep_is_its_linear_recipe_and_best_recipe_yaml_merges_the_best(
    bench: dict[str, Path], tmp_path: Path
) -> None:
    models = [str(bench["tuned"]), str(bench["other"]), str(bench["base"])]
    sweep = {
        "recipe": {"soup": {"models": models, "weights": [1.0, {"search": "choice", "values": [0.0, 0.5, 1.0]}, 0.5]}},
        "search": {"method": "grid"},
        "evaluate": {"hook": "hook.py:score"},
        "out": "out",
    }
    report = splice.sweep(_write(tmp_path, "soup.yml", sweep), workers=1, run=CPU)
    target = float(bench["target"].read_text())
    for trial in report.trials:
        weight = trial.values["models[1].parameters.weight"]
        recipe = {
            "merge_method": "linear",
            "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(models, [1.0, weight, 0.5])],
        }
        merged = tmp_path / f"m{weight}"
        splice.merge(splice.Recipe.model_validate(recipe), merged, run=CPU)
        assert trial.score == pytest.approx(_score(load_dir(merged), target), rel=0, abs=1e-9)
        soup = tmp_path / f"s{weight}"  # the same weighted soup, as `splice soup --weights` computes it
        splice.soup(models, soup, weights=[1.0, weight, 0.5], run=CPU)
        torch.testing.assert_close(load_dir(soup), load_dir(merged))
    assert report.best is not None
    best_recipe = yaml.safe_load((tmp_path / "out" / "best_recipe.yaml").read_text())
    assert best_recipe["merge_method"] == "linear"
    splice.merge(tmp_path / "out" / "best_recipe.yaml", tmp_path / "again", seed=0, run=CPU)
    again, best = load_dir(tmp_path / "again"), load_dir(tmp_path / "out" / "best")
    assert all(torch.equal(again[k], best[k]) for k in best)
    assert json.loads((tmp_path / "out" / "sweep_results.json").read_text())["parameters"] == [
        "models[1].parameters.weight"
    ]


@pytest.mark.parametrize(
    ("port", "message"),
    [
        ({"patch": "missing", "to": "new"}, r"missing"),
        ({"patch": "patch", "to": "new", "scale": {"search": "choice", "values": ["big"]}}, r"port: scale"),
        ({"patch": {"search": "choice", "values": ["a"]}, "to": "new"}, r"not found: a$"),
        ({"patch": "patch", "to": "new", "sclae": {"search": "uniform", "low": 0, "high": 1}}, r"port: .*sclae"),
    ],
)
def test_a_bad_port_sweep_is_one_line_before_any_trial(
    bench: dict[str, Path], tmp_path: Path, port: dict, message: str
) -> None:
    located = {k: (str(tmp_path / v) if isinstance(v, str) and k in ("patch", "to") else v) for k, v in port.items()}
    if "scale" not in located and "sclae" not in located:
        located["scale"] = {"search": "uniform", "low": 0.5, "high": 1.0}
    sweep = {
        "recipe": {"port": located},
        "search": {"method": "random", "trials": 2},
        "evaluate": {"hook": "hook.py:score"},
        "out": "out",
    }
    with pytest.raises(SpliceError, match=message) as caught:
        splice.sweep(_write(tmp_path, "bad.yml", sweep), workers=1, run=CPU)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()
