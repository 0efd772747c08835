"""`splice merge` against mergekit: mergekit-yaml itself on Llama; its per-tensor API on BERT and ViT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from mergekit.merge_methods.api import merge_tensors

import splice
from splice.merge.recipe import ParameterResolver, parse_recipe

from conftest import model_class
from helpers import load_dir, run_mergekit


def recipe_for(method: str, dirs: list[Path]) -> dict:
    base, first, second = (str(d.absolute()) for d in dirs)
    if method == "linear":
        return {
            "merge_method": "linear",
            "dtype": "float32",
            "models": [
                {"model": base, "parameters": {"weight": 0.2}},
                {"model": first, "parameters": {"weight": [0.3, 0.6]}},  # a gradient across layers
                {"model": second, "parameters": {"weight": [{"filter": "mlp", "value": 0.9}, {"value": 0.4}]}},
            ],
        }
    return {
        "merge_method": method,
        "base_model": base,
        "dtype": "float32",
        "models": [
            {"model": first, "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": second, "parameters": {"weight": [0.2, 0.5], "density": [0.3, 0.8]}},
        ],
        "parameters": {"lambda": 0.9},
    }


def write_recipe(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
def test_equals_mergekit_yaml_on_llama(method, make_models, tmp_path):
    dirs = make_models("llama", 3, sharded=True)
    recipe = write_recipe(tmp_path, recipe_for(method, dirs))
    run_mergekit(recipe, tmp_path / "mergekit")
    splice.merge(recipe, tmp_path / "splice", device="cpu")
    theirs, ours = load_dir(tmp_path / "mergekit"), load_dir(tmp_path / "splice")
    assert set(ours) == set(theirs)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6, msg=name)
    base = load_dir(dirs[0])
    assert any(not torch.equal(ours[n], base[n]) for n in base)  # the merge did something


def per_tensor_reference(recipe_data: dict, dirs: list[Path]) -> dict[str, torch.Tensor]:
    """mergekit's own per-tensor API over every tensor, with splice's parameter resolution."""
    recipe = parse_recipe(recipe_data)
    locations, base_index = recipe.inputs()
    states = [load_dir(Path(p)) for p in locations]
    resolver = ParameterResolver(recipe, list(states[0]))
    return {
        name: merge_tensors(
            [s[name] for s in states],
            recipe.merge_method,
            parameters=resolver(name),
            ids=list(range(len(states))),
            base_index=base_index,
            name=name,
        )
        for name in states[0]
    }


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
@pytest.mark.parametrize("arch", ["bert", "vit"])
def test_same_recipes_on_bert_and_vit(arch, method, make_models, tmp_path):
    dirs = make_models(arch, 3)
    data = recipe_for(method, dirs)
    splice.merge(write_recipe(tmp_path, data), tmp_path / "splice", device="cpu")
    ours = load_dir(tmp_path / "splice")
    expected = per_tensor_reference(data, dirs)
    assert list(ours) == list(load_dir(dirs[0]))  # nothing dropped (mergekit keeps 8 of a ViT's 40)
    for name, tensor in expected.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=1e-6, msg=name)
    _, info = model_class(arch).from_pretrained(tmp_path / "splice", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


@pytest.mark.parametrize(
    "method,extra",
    [
        ("slerp", {"parameters": {"t": [0.1, 0.7]}}),
        ("breadcrumbs", {"parameters": {"lambda": 1.0}}),
        ("model_stock", {}),
    ],
)
def test_methods_run_through_mergekit_kernels(method, extra, make_models, tmp_path):
    count = 3 if method != "slerp" else 2
    dirs = make_models("bert", 4 if method == "model_stock" else count)
    base = str(dirs[0].absolute())
    models = [{"model": str(d.absolute()), "parameters": {"weight": 0.5, "density": 0.7}} for d in dirs[1:]]
    if method in ("slerp", "model_stock"):
        models = [{"model": str(d.absolute())} for d in dirs]
    data = {"merge_method": method, "base_model": base, "models": models, **extra}
    splice.merge(write_recipe(tmp_path, data), tmp_path / "out", device="cpu")
    ours = load_dir(tmp_path / "out")
    for name, tensor in per_tensor_reference(data, dirs).items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_own_ties_kernel_equals_mergekit_kernel(make_models, tmp_path):
    dirs = make_models("llama", 3)
    path = write_recipe(tmp_path, recipe_for("ties", dirs))
    splice.merge(path, tmp_path / "own", device="cpu")
    splice.merge(path, tmp_path / "mk", device="cpu", prefer_own_kernels=False)
    own, theirs = load_dir(tmp_path / "own"), load_dir(tmp_path / "mk")
    for name in theirs:
        torch.testing.assert_close(own[name], theirs[name], rtol=0, atol=1e-6, msg=name)


def test_random_methods_are_reproducible_with_a_seed(make_models, tmp_path):
    dirs = make_models("bert", 3)
    data = recipe_for("ties", dirs) | {"merge_method": "dare_ties"}
    path = write_recipe(tmp_path, data)
    splice.merge(path, tmp_path / "a", device="cpu", seed=11)
    splice.merge(path, tmp_path / "b", device="cpu", seed=11)
    first, second = load_dir(tmp_path / "a"), load_dir(tmp_path / "b")
    assert all(torch.equal(first[n], second[n]) for n in first)
    torch.manual_seed(11)  # mergekit's kernel called tensor by tensor in storage order draws the same masks
    expected = per_tensor_reference(data, dirs)
    for name, tensor in expected.items():
        torch.testing.assert_close(first[name], tensor, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
def test_row_blocks_do_not_change_results(method, make_models, tmp_path):
    """linear and task_arithmetic run in row blocks when tensors are large; ties needs whole tensors."""
    dirs = make_models("llama", 3)
    path = write_recipe(tmp_path, recipe_for(method, dirs))
    splice.merge(path, tmp_path / "whole", device="cpu")
    splice.merge(path, tmp_path / "blocks", device="cpu", chunk_bytes=128)
    whole, blocks = load_dir(tmp_path / "whole"), load_dir(tmp_path / "blocks")
    assert all(torch.equal(whole[n], blocks[n]) for n in whole)


@pytest.mark.parametrize("options", [{"rescale": True}, {"normalize": False, "lambda": 1.3}, {"int8_mask": True}])
@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_own_kernels_match_mergekit_across_options(method, options, make_models, tmp_path):
    dirs = make_models("llama", 4)
    base, *tuned = (str(d.absolute()) for d in dirs)
    data = {
        "merge_method": method,
        "base_model": base,
        "parameters": options,
        "models": [
            {"model": m, "parameters": {"weight": w, "density": d}}
            for m, w, d in zip(tuned, [0.7, 0.4, 1.1], [0.2, 0.55, 0.9])
        ],
    }
    path = write_recipe(tmp_path, data)
    splice.merge(path, tmp_path / "own", device="cpu")
    splice.merge(path, tmp_path / "mk", device="cpu", prefer_own_kernels=False)
    own, theirs = load_dir(tmp_path / "own"), load_dir(tmp_path / "mk")
    for name in theirs:
        torch.testing.assert_close(own[name], theirs[name], rtol=0, atol=1e-6, msg=name)


def test_quoted_numbers_are_read_as_mergekit_reads_them(make_models, tmp_path):
    """A config that quotes its numbers (`"5e-1"`, a gradient's `["0.3", "8e-1"]`, `normalize: "true"`) merges as
    mergekit-yaml merges it, and as the same config with plain numbers: each scalar is read as its parameter's type
    before a gradient interpolates."""
    dirs = make_models("llama", 3, sharded=False)
    base, first, second = (str(d.absolute()) for d in dirs)

    def recipe(quoted: bool) -> dict:
        q = (lambda v: str(v)) if quoted else (lambda v: v)
        return {
            "merge_method": "ties",
            "base_model": base,
            "dtype": "float32",
            "models": [
                {"model": first, "parameters": {"weight": q("6e-1") if quoted else 0.6, "density": q(0.5)}},
                {"model": second, "parameters": {"weight": [q(0.2), q(0.5)], "density": [q(0.3), q("8e-1")]}},
            ],
            "parameters": {"lambda": q(0.9), "normalize": "true" if quoted else True},
        }

    quoted_dir, plain_dir = tmp_path / "quoted", tmp_path / "plain"
    quoted_dir.mkdir()
    plain_dir.mkdir()
    quoted = write_recipe(quoted_dir, recipe(True))
    read = yaml.safe_load(quoted.read_text())  # strings as YAML reads them (unquoted `8e-1` too: YAML 1.1 wants a dot)
    assert (
        read["models"][0]["parameters"]["weight"] == "6e-1" and read["models"][1]["parameters"]["density"][1] == "8e-1"
    )
    run_mergekit(quoted, tmp_path / "mergekit")
    splice.merge(quoted, tmp_path / "splice", device="cpu")
    splice.merge(write_recipe(plain_dir, recipe(False)), tmp_path / "splice-plain", device="cpu")
    theirs, ours, plain = (load_dir(tmp_path / d) for d in ("mergekit", "splice", "splice-plain"))
    assert set(ours) == set(theirs) == set(plain)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6, msg=name)
        assert torch.equal(ours[name], plain[name]), name


def test_a_quoted_value_that_is_no_number_is_one_line(make_models, tmp_path):
    dirs = make_models("llama", 3, sharded=False)
    data = recipe_for("ties", dirs)
    data["models"][0]["parameters"]["density"] = ["0.3", "half"]
    with pytest.raises(splice.RecipeError, match=r"ties: parameter 'density' must be float, got 'half'$"):
        splice.merge(write_recipe(tmp_path, data), tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()
