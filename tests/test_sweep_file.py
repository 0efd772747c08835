"""The sweep file (issue 18): read and checked before any trial — the recipe (a path or inline) with its marks, the
exact budget, the hook imported and its arguments kept, paths relative to the file; every bad file one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from splice.errors import SpliceError
from splice.workflows.sweep.file import load_sweep

RECIPE = {
    "merge_method": "ties",
    "base_model": "base",
    "models": [
        {"model": "m1", "parameters": {"weight": 1.0, "density": {"search": "choice", "values": [0.3, 0.6, 0.9]}}},
        {
            "model": "m2",
            "parameters": {"weight": {"search": "uniform", "low": 0.5, "high": 1.0, "step": 0.25}, "density": 0.5},
        },
    ],
}
HOOK = "def score(state, split='test'):\n    return 0.0\n"


def write(directory: Path, sweep: dict, name: str = "sweep.yml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    (tmp_path / "evals.py").write_text(HOOK)
    (tmp_path / "ties.yml").write_text(yaml.safe_dump(RECIPE))
    return tmp_path


def test_a_grid_sweep_from_a_recipe_file_with_paths_beside_the_sweep_file(sweep_dir, monkeypatch, tmp_path_factory):
    path = write(
        sweep_dir,
        {
            "recipe": "ties.yml",
            "search": {"method": "grid"},
            "evaluate": {"hook": "evals.py:score", "args": {"split": "val", "k": [1, 2]}},
            "out": "results",
        },
    )
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))  # relative to the sweep file, not to where it runs
    sweep = load_sweep(path)
    assert sweep.recipe == RECIPE
    assert [p.name for p in sweep.parameters] == ["models[0].parameters.density", "models[1].parameters.weight"]
    assert sweep.trials == 3 * 3  # the whole grid by default
    assert sweep.hook == f"{sweep_dir.resolve() / 'evals.py'}:score"
    assert sweep.out == str(sweep_dir.resolve() / "results")
    assert sweep.file.evaluate.args == {"split": "val", "k": [1, 2]}
    assert sweep.file.evaluate.direction == "maximize" and sweep.file.keep == "best"
    assert sweep.example.models[0].parameters["density"] == 0.3  # a filled recipe validated

    fewer = write(
        sweep_dir,
        {"recipe": "ties.yml", "search": {"method": "grid", "trials": 4}, "evaluate": {"hook": "evals.py:score"}},
        "fewer.yml",
    )
    assert load_sweep(fewer).trials == 4


def test_an_inline_recipe_and_a_tpe_search_with_its_budget(sweep_dir):
    path = write(
        sweep_dir,
        {
            "recipe": RECIPE,
            "search": {"method": "tpe", "seed": 7, "trials": 25},
            "evaluate": {"hook": "evals.py:score", "direction": "minimize"},
            "keep": "all",
        },
    )
    sweep = load_sweep(path)
    assert sweep.trials == 25 and sweep.file.search.seed == 7 and sweep.file.search.method == "tpe"
    assert sweep.file.evaluate.direction == "minimize" and sweep.file.keep == "all" and sweep.out is None


def _bad(recipe: object = "ties.yml", **changes: object) -> dict:
    sweep = {"recipe": recipe, "search": {"method": "grid"}, "evaluate": {"hook": "evals.py:score"}}
    return {**sweep, **changes}


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ({**_bad(), "serach": {"method": "grid"}}, r"sweep\.yml:\d+: unknown key 'serach' \(did you mean 'search'\?\)"),
        (
            _bad(search={"method": "bayes"}),
            r"sweep\.yml: search\.method: .*'grid', 'random', 'tpe', 'cmaes' or 'greedy_soup'",
        ),
        (_bad(search={"method": "tpe"}), r"sweep\.yml: search\.trials: say how many candidates a tpe search"),
        (_bad(search={"method": "random", "trials": 0}), r"sweep\.yml: search\.trials: .*greater than 0"),
        (_bad(search={"method": "grid", "trials": 10}), r"search\.trials 10 is more than the grid's 9 candidates"),
        (
            _bad(recipe={**RECIPE, "parameters": {"lambda": {"search": "log_uniform", "low": 0.5, "high": 2}}}),
            r"parameters\.lambda: a grid cannot enumerate log_uniform",
        ),
        (_bad(recipe={**RECIPE, "parameters": {"lamda": {"search": "uniform", "low": 0.5, "high": 2}}}), "lamda"),
        (
            _bad(
                recipe={
                    **RECIPE,
                    "models": [{"model": "m1", "parameters": {"weight": {"search": "uniform", "low": 2, "high": 1}}}],
                }
            ),
            r"models\[0\]\.parameters\.weight: .*low \(2\.0\) is above high \(1\.0\)",
        ),
        (_bad(recipe="missing.yml"), r"recipe not found: .*missing\.yml"),
        (_bad(evaluate={"hook": "evals.py:nothing"}), r"evaluate\.hook .*nothing"),
        (_bad(evaluate={"hook": "no_such_module_here:score"}), r"evaluate\.hook .*no_such_module_here"),
        (_bad(evaluate={"hook": "evals.py:score", "args": {"x": float("nan")}}), r"evaluate\.args.*finite"),
        (_bad(evaluate={"hook": "evals.py:score", "direction": "up"}), r"evaluate\.direction"),
        (_bad(keep="some"), r"sweep\.yml: keep: .*'best', 'all' or 'none'"),
    ],
)
def test_every_bad_sweep_file_is_one_line_before_any_trial(sweep_dir, sweep, message):
    with pytest.raises(SpliceError, match=message) as caught:
        load_sweep(write(sweep_dir, sweep))
    assert "\n" not in str(caught.value)


def test_a_missing_file_and_a_document_that_is_not_a_mapping(sweep_dir):
    with pytest.raises(SpliceError, match=r"nothing\.yml: no such sweep file"):
        load_sweep(sweep_dir / "nothing.yml")
    (sweep_dir / "list.yml").write_text("- recipe\n")
    with pytest.raises(SpliceError, match=r"list\.yml: a sweep is a mapping"):
        load_sweep(sweep_dir / "list.yml")
