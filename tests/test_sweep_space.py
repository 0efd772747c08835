"""A sweep's search space (issue 18, first part): marks found at every depth a recipe allows, filled recipes that
merge exactly as the same recipe written by hand, Optuna sampling from the distributions, grids, and one-line
refusals of bad marks before any trial."""

from __future__ import annotations

import itertools

import optuna
import pytest
import torch

import splice
from splice.errors import RecipeError
from splice.workflows.sweep.space import (
    MAX_GRID,
    Choice,
    IntRange,
    LogUniform,
    Uniform,
    check_space,
    fill,
    grid_size,
    search_parameters,
)

from helpers import load_dir


def marked_ties(base: str, first: str, second: str) -> dict:
    return {
        "merge_method": "ties",
        "base_model": base,
        "dtype": "float32",
        "models": [
            {
                "model": first,
                "parameters": {"weight": {"search": "uniform", "low": 0.2, "high": 1.0, "step": 0.4}, "density": 0.5},
            },
            {
                "model": second,
                "parameters": {
                    "weight": [0.3, {"search": "choice", "values": [0.5, 0.7]}],
                    "density": [{"filter": "mlp", "value": {"search": "int", "low": 0, "high": 1}}, {"value": 0.6}],
                },
            },
        ],
        "parameters": {"lambda": {"search": "log_uniform", "low": 0.5, "high": 2.0}},
    }


def test_marks_are_found_at_every_depth_in_document_order():
    recipe = marked_ties("b", "m1", "m2")
    found = search_parameters(recipe)
    assert [p.name for p in found] == [
        "models[0].parameters.weight",
        "models[1].parameters.weight[1]",
        "models[1].parameters.density[0].value",
        "parameters.lambda",
    ]
    assert [type(p.spec) for p in found] == [Uniform, Choice, IntRange, LogUniform]
    assert found[0].grid() == [0.2, 0.6, 1.0]
    assert found[1].grid() == [0.5, 0.7]
    assert found[2].grid() == [0, 1]
    assert found[0].value(0.6000000000000001) == 0.6 and found[0].value(0.2 + 0.4 * 2) == 1.0  # Optuna's rounding
    assert found[3].value(1.2345678) == 1.2345678 and found[1].value(0.7) == 0.7


def test_fill_puts_each_value_where_its_mark_was_and_leaves_the_recipe_alone():
    recipe = marked_ties("b", "m1", "m2")
    parameters = search_parameters(recipe)
    values = {
        "models[0].parameters.weight": 0.6,
        "models[1].parameters.weight[1]": 0.7,
        "models[1].parameters.density[0].value": 1,
        "parameters.lambda": 1.25,
    }
    filled = fill(recipe, values, parameters)
    assert filled["models"][0]["parameters"] == {"weight": 0.6, "density": 0.5}
    assert filled["models"][1]["parameters"] == {
        "weight": [0.3, 0.7],
        "density": [{"filter": "mlp", "value": 1}, {"value": 0.6}],
    }
    assert filled["parameters"] == {"lambda": 1.25}
    assert recipe["parameters"]["lambda"] == {"search": "log_uniform", "low": 0.5, "high": 2.0}  # untouched
    assert search_parameters(filled) == []


def test_a_filled_recipe_merges_exactly_as_the_recipe_written_by_hand(make_models, tmp_path):
    base, first, second = (str(d) for d in make_models("bert", 3))
    recipe = marked_ties(base, first, second)
    parameters, _ = check_space(recipe)
    values = {
        "models[0].parameters.weight": 1.0,
        "models[1].parameters.weight[1]": 0.5,
        "models[1].parameters.density[0].value": 1,
        "parameters.lambda": 0.8,
    }
    by_hand = {
        "merge_method": "ties",
        "base_model": base,
        "dtype": "float32",
        "models": [
            {"model": first, "parameters": {"weight": 1.0, "density": 0.5}},
            {
                "model": second,
                "parameters": {"weight": [0.3, 0.5], "density": [{"filter": "mlp", "value": 1}, {"value": 0.6}]},
            },
        ],
        "parameters": {"lambda": 0.8},
    }
    splice.merge(splice.Recipe.model_validate(fill(recipe, values, parameters)), tmp_path / "filled", device="cpu")
    splice.merge(splice.Recipe.model_validate(by_hand), tmp_path / "by-hand", device="cpu")
    filled, expected = load_dir(tmp_path / "filled"), load_dir(tmp_path / "by-hand")
    assert filled.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(filled[name], tensor), name
    other = fill(recipe, {**values, "models[0].parameters.weight": 0.2}, parameters)  # the values do reach the merge
    splice.merge(splice.Recipe.model_validate(other), tmp_path / "other", device="cpu")
    assert not torch.equal(
        load_dir(tmp_path / "other")["bert.pooler.dense.weight"], expected["bert.pooler.dense.weight"]
    )


def test_optuna_samples_inside_each_distribution_and_a_grid_sampler_visits_the_whole_grid():
    parameters = search_parameters(marked_ties("b", "m1", "m2"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(40):
        trial = study.ask({p.name: p.distribution() for p in parameters})
        weight, choice, density, lam = (p.value(trial.params[p.name]) for p in parameters)
        assert weight in (0.2, 0.6, 1.0) and choice in (0.5, 0.7) and density in (0, 1) and 0.5 <= lam <= 2.0
        study.tell(trial, 0.0)

    gridded = parameters[:3]
    grid = {p.name: p.grid() for p in gridded}
    assert grid_size(gridded) == 3 * 2 * 2
    study = optuna.create_study(sampler=optuna.samplers.GridSampler(grid, seed=0))
    seen = set()

    def objective(trial: optuna.Trial) -> float:
        seen.add(tuple(p.suggest(trial) for p in gridded))
        return 0.0

    study.optimize(objective, n_trials=2 * grid_size(gridded))  # the sampler stops the study when the grid is done
    assert len(study.trials) == grid_size(gridded)
    assert seen == set(itertools.product(*grid.values()))


@pytest.mark.parametrize(
    ("mark", "message"),
    [
        ({"search": "uniform", "low": 0.9, "high": 0.1}, r"parameters\.lambda: .*low \(0\.9\) is above high \(0\.1\)"),
        ({"search": "choice", "values": []}, r"parameters\.lambda: .*values"),
        ({"search": "log_uniform", "low": 0.0, "high": 1.0}, r"parameters\.lambda: .*low"),
        ({"search": "normal", "low": 0.0, "high": 1.0}, r"parameters\.lambda: .*normal"),
        ({"search": "uniform", "low": 0.1, "high": 0.9, "stpe": 0.1}, r"parameters\.lambda: .*stpe"),
        ({"search": "int", "low": 0.5, "high": 3}, r"parameters\.lambda: .*low"),
        ({"search": "uniform", "low": ".nan", "high": 1.0}, r"parameters\.lambda: .*low"),
        ({"search": "choice", "values": [0.5, float("nan")]}, r"parameters\.lambda: .*finite"),
    ],
)
def test_bad_marks_are_one_line_errors_naming_their_path(mark, message):
    recipe = {**marked_ties("b", "m1", "m2"), "parameters": {"lambda": mark}}
    with pytest.raises(RecipeError, match=message) as caught:
        check_space(recipe, "sweep.yml")
    assert "\n" not in str(caught.value) and str(caught.value).startswith("sweep.yml: ")


def test_a_mark_on_a_parameter_the_method_does_not_take_is_refused_before_any_trial():
    recipe = marked_ties("b", "m1", "m2")
    recipe["parameters"] = {"lambda": 1.0, "dnesity": {"search": "uniform", "low": 0.1, "high": 0.9}}
    with pytest.raises(RecipeError, match="dnesity") as caught:
        check_space(recipe, "sweep.yml")
    assert "\n" not in str(caught.value)
    unmarked = {**recipe, "parameters": {"lambda": 1.0}, "models": [{"model": "m1", "parameters": {"weight": 1.0}}]}
    with pytest.raises(RecipeError, match="marks nothing to search"):
        check_space(unmarked, "sweep.yml")


def test_grids_need_countable_values_and_a_bounded_size():
    log = search_parameters({"parameters": {"lambda": {"search": "log_uniform", "low": 0.5, "high": 2.0}}})
    with pytest.raises(RecipeError, match=r"parameters\.lambda: a grid cannot enumerate log_uniform"):
        grid_size(log)
    stepless = search_parameters({"parameters": {"w": {"search": "uniform", "low": 0.0, "high": 1.0}}})
    with pytest.raises(RecipeError, match=r"parameters\.w: a grid over uniform needs `step`"):
        grid_size(stepless)
    huge = search_parameters({"parameters": {f"p{i}": {"search": "int", "low": 0, "high": 9} for i in range(6)}})
    assert MAX_GRID < 10**6
    with pytest.raises(RecipeError, match="the grid has 1,000,000 candidates"):
        grid_size(huge)
