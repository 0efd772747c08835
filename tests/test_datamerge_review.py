"""Review of issue 20's data-dependent merges: inputs that were silently mis-merged or mis-reported. Tiny GPT-2
models (Conv1D layers) fine-tuned from one base, their statistics collected once for the module."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
import yaml

import splice
from splice.errors import SpliceError
from splice.merge.recipe import parse_recipe
from splice.workflows.stats import collect_stats

from conftest import perturbed, save, tiny_model
from helpers import load_dir


def _batch(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(8, 10, dtype=torch.long)
    mask[1, 6:] = 0
    mask[5, 3:] = 0  # 80 positions, 69 real tokens
    return {"input_ids": torch.randint(0, 64, (8, 10), generator=generator), "attention_mask": mask}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """(root, [task model dirs], [their Gram statistics], a second Gram of task 0 on other data)."""
    root = tmp_path_factory.mktemp("datamerge-review")
    base = tiny_model("gpt2", 0)
    models = [save(perturbed(base, i + 1, 0.05), root / f"task{i}", False) for i in range(2)]
    grams = [collect_stats(m, _batch(i), kind="gram", out=root / f"task{i}.gram").out for i, m in enumerate(models)]
    other = collect_stats(models[0], _batch(7), kind="gram", out=root / "task0.other.gram").out
    return root, models, grams, other


def _regmean(models, grams, **extra) -> dict:
    return {
        "merge_method": "regmean",
        "models": [{"model": str(m), "stats": str(g)} for m, g in zip(models, grams)],
    } | extra


def test_a_model_listed_twice_with_two_statistics_is_refused(tasks, tmp_path):
    """Both entries name the same model, each with statistics of it on other data: the stream merges each model once,
    so one of the two statistics would be dropped (the card still lists both)."""
    _, models, grams, other = tasks
    recipe = _regmean([models[0], models[0], models[1]], [grams[0], other, grams[1]])
    with pytest.raises(SpliceError, match="listed twice") as caught:
        splice.merge(parse_recipe(recipe), tmp_path / "out")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,value", [("alpha", 0.0), ("epsilon", 1.0), ("fallback", "base")])
def test_a_shared_parameter_given_per_model_is_refused(tasks, name, value):
    """regmean's alpha (fisher's epsilon, the fallback) is one value for the merge: set on a model, it was ignored and
    the default used."""
    _, models, grams, _ = tasks
    recipe = _regmean(models, grams)
    if name == "epsilon":
        recipe["merge_method"] = "fisher"
    recipe["models"][0]["parameters"] = {name: value}
    with pytest.raises(SpliceError, match=f"{name}") as caught:
        parse_recipe(recipe)
    assert "\n" not in str(caught.value) and "parameters:" in str(caught.value)


def test_a_regmean_plusplus_value_given_per_model_is_refused(tasks):
    """RegMean++'s alpha and samples: one value for the walk; a model's was ignored."""
    _, models, _, _ = tasks
    entries = [{"model": str(m), "data": "tasks.py:task", "parameters": {"samples": 4}} for m in models]
    with pytest.raises(SpliceError, match="samples is one value for the whole regmean_plusplus merge"):
        parse_recipe({"merge_method": "regmean_plusplus", "models": entries})


def test_an_output_inside_the_registry_the_statistics_come_from_is_refused(tasks, tmp_path, monkeypatch):
    _, models, grams, _ = tasks
    registry = splice.Registry.init(tmp_path / "registry")
    monkeypatch.setenv("SPLICE_REGISTRY", str(tmp_path / "registry"))
    for i, gram in enumerate(grams):
        registry.push(f"grams-{i}", gram)
    recipe = _regmean(models, ["grams-0@1", "grams-1@1"])
    inside = tmp_path / "registry" / "merged"
    with pytest.raises(SpliceError, match="registry") as caught:
        splice.merge(parse_recipe(recipe), inside)
    assert "\n" not in str(caught.value)
    assert not inside.exists()


def test_a_stage_inside_the_registry_the_statistics_come_from_is_refused(tasks, tmp_path, monkeypatch):
    _, models, grams, _ = tasks
    registry = splice.Registry.init(tmp_path / "registry")
    monkeypatch.setenv("SPLICE_REGISTRY", str(tmp_path / "registry"))
    registry.push("grams-1", grams[1])
    linear = {"name": "first", "merge_method": "linear", "models": [{"model": str(m)} for m in models]}
    linear["parameters"] = {"weight": 1.0}
    final = _regmean(models, [grams[0], "grams-1"])
    (tmp_path / "stages.yml").write_text(yaml.safe_dump_all([linear, final]))
    inside = tmp_path / "registry" / "merged"
    with pytest.raises(SpliceError, match=r"is inside an input.* \(.*registry\)"):
        splice.merge(tmp_path / "stages.yml", inside)
    assert not inside.exists()


def test_the_reported_token_count_is_the_datas(tasks):
    """69 real tokens went through the model; every one of its 8 linear layers saw them all."""
    from splice.workflows.inspect import summarize_patch

    _, _, grams, _ = tasks
    summary = summarize_patch(grams[0])
    assert {t.tokens for t in summary.tensors} == {69}
    assert "over 8 samples, 69 tokens" in summary.settings


def test_the_recipe_as_run_names_the_statistics_it_read_from_any_directory(tasks, tmp_path, monkeypatch):
    """Relative `stats:` paths: splice_recipe.yml (and the card) make the models absolute; the statistics too, so
    `splice merge splice_recipe.yml` reruns the same merge from another directory."""
    root, models, grams, _ = tasks
    monkeypatch.chdir(root)
    recipe = _regmean([Path(m).name for m in models], [Path(g).name for g in grams])
    splice.merge(parse_recipe(recipe), tmp_path / "first")
    recorded = yaml.safe_load((tmp_path / "first" / "splice_recipe.yml").read_text())
    assert [entry["stats"] for entry in recorded["models"]] == [str(Path(g).resolve()) for g in grams]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    splice.merge(tmp_path / "first" / "splice_recipe.yml", tmp_path / "again")
    first, again = load_dir(tmp_path / "first"), load_dir(tmp_path / "again")
    assert set(first) == set(again) and all(torch.equal(first[name], again[name]) for name in first)


def test_the_recipe_as_run_makes_a_data_hook_file_absolute(tmp_path, monkeypatch):
    from splice.workflows.card import recorded_recipe

    (tmp_path / "tasks.py").write_text("def task():\n    return {}\n")
    monkeypatch.chdir(tmp_path)
    entries = [{"model": f"m{i}", "data": hook} for i, hook in enumerate(["tasks.py:task", "some.module:task"])]
    recipe = recorded_recipe(parse_recipe({"merge_method": "regmean_plusplus", "models": entries}))
    assert [entry.data for entry in recipe.models] == [f"{tmp_path.resolve() / 'tasks.py'}:task", "some.module:task"]


@pytest.mark.parametrize("labels", ["bogus", "batch"])
def test_fisher_labels_are_refused_before_the_model_is_loaded(tasks, tmp_path, monkeypatch, labels):
    import splice.workflows.stats as stats

    _, models, _, _ = tasks

    def loaded(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the labels were checked")

    monkeypatch.setattr(stats, "live_model", loaded)
    with pytest.raises(SpliceError, match="`labels"):
        collect_stats(models[0], _batch(0), kind="fisher", labels=labels, out=tmp_path / "fisher")  # type: ignore[arg-type]
    assert not (tmp_path / "fisher").exists()


@pytest.mark.parametrize(
    "method,parameters,needle",
    [("regmean", {"alpha": 1.5}, "alpha must be in [0, 1]"), ("fisher", {"epsilon": -1}, "epsilon must be >= 0")],
)
def test_a_value_out_of_range_is_refused_before_the_merge_starts(
    tasks, tmp_path, monkeypatch, method, parameters, needle
):
    """alpha and epsilon were refused by the kernel, mid-merge (after the tensors before the first solved one)."""
    recipes = importlib.import_module("splice.merge.recipe")  # `splice.merge` is also the function
    _, models, grams, _ = tasks
    fishers = [collect_stats(m, _batch(i), kind="fisher", out=tmp_path / f"f{i}").out for i, m in enumerate(models)]

    def started(*_args, **_kwargs):
        raise AssertionError("the merge started before the parameters were checked")

    monkeypatch.setattr(recipes, "run_stream", started)
    recipe = _regmean(models, grams if method == "regmean" else fishers, merge_method=method, parameters=parameters)
    with pytest.raises(SpliceError) as caught:
        splice.merge(parse_recipe(recipe), tmp_path / "out")
    assert needle in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_a_regmean_plusplus_alpha_out_of_range_is_refused_before_the_walk(tasks, tmp_path, monkeypatch):
    plusplus = importlib.import_module("splice.merge.stats.plusplus")
    _, models, _, _ = tasks

    def started(*_args, **_kwargs):
        raise AssertionError("the walk started before alpha was checked")

    monkeypatch.setattr(plusplus, "publish_model", started)
    entries = [{"model": str(m), "data": "tasks.py:task"} for m in models]
    recipe = {"merge_method": "regmean_plusplus", "models": entries, "parameters": {"alpha": 1.5}}
    with pytest.raises(SpliceError, match=r"alpha must be in \[0, 1\]"):
        splice.merge(parse_recipe(recipe), tmp_path / "out")


HOOK = """
import torch

def task(seed={seed}):
    generator = torch.Generator().manual_seed(seed)
    return {{"input_ids": torch.randint(0, 64, (4, 10), generator=generator)}}

def other():
    return task({seed} + 1)
"""


def test_a_regmean_plusplus_stage_is_run_again_when_its_data_may_have_changed(tasks, tmp_path):
    """A stage's key covers its recipe and its input files, not what a `data:` hook returns: a RegMean++ stage reused
    from the cache after its data changed is a stale merge."""
    _, models, _, _ = tasks
    hook = tmp_path / "hook.py"
    hook.write_text(HOOK.format(seed=0))
    walk = {"name": "walked", "merge_method": "regmean_plusplus"}
    walk["models"] = [
        {"model": str(models[0]), "data": f"{hook}:task"},
        {"model": str(models[1]), "data": f"{hook}:other"},
    ]
    final = {
        "merge_method": "linear",
        "parameters": {"weight": 1.0},
        "models": [{"model": "walked"}, {"model": str(models[1])}],
    }
    (tmp_path / "stages.yml").write_text(yaml.safe_dump_all([walk, final]))
    splice.merge(tmp_path / "stages.yml", tmp_path / "out", intermediate_dir=tmp_path / "cache", device="cpu")
    hook.write_text(HOOK.format(seed=50))
    report = splice.merge(
        tmp_path / "stages.yml", tmp_path / "again", intermediate_dir=tmp_path / "cache", device="cpu"
    )
    assert [run.status for run in report.stages] == ["ran", "ran"]
    splice.merge(tmp_path / "stages.yml", tmp_path / "fresh", intermediate_dir=tmp_path / "fresh-cache", device="cpu")
    again, fresh = load_dir(tmp_path / "again"), load_dir(tmp_path / "fresh")
    assert all(torch.equal(again[name], fresh[name]) for name in fresh)
