"""Recipes: what splice does not implement is refused, never ignored; the most specific error comes first;
numbers read as mergekit reads them; ranges and kernel failures are one-line errors before anything is written."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

import splice
from splice.errors import RecipeError, SpliceError
from splice.merge.recipe import load_recipe
from splice.tensors.checkpoint import Checkpoint

from helpers import run_cli


def write(tmp_path: Path, recipe: dict | str) -> Path:
    path = tmp_path / "recipe.yml"
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    return path


def task_arithmetic(dirs: list[Path], **extra) -> dict:
    base, first, second = map(str, dirs)
    return {
        "merge_method": "task_arithmetic",
        "base_model": base,
        **extra,
        "models": [{"model": m, "parameters": {"weight": 0.5}} for m in (first, second)],
    }


def assert_refused(path: Path, out: Path, needles: list[str], absent: list[str] = ()) -> str:
    with pytest.raises(RecipeError) as caught:
        splice.merge(path, out, device="cpu")
    message = str(caught.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message
    for needle in absent:
        assert needle not in message
    assert not out.exists()
    return message


@pytest.mark.parametrize("source", ["union", "base"])
def test_a_tokenizer_source_over_models_without_tokenizers_is_refused(source, make_models, tmp_path):
    dirs = make_models("gpt2", 3)
    path = write(tmp_path, task_arithmetic(dirs, tokenizer_source=source))
    with pytest.raises(SpliceError, match="has no tokenizer; tokenizer_source needs every input's tokenizer"):
        splice.merge(path, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def test_slices_mixed_with_models_say_so_first(make_models, tmp_path):
    base, first, _ = map(str, make_models("llama", 3))
    path = write(
        tmp_path,
        {
            "merge_method": "slerp",
            "base_model": base,
            "parameters": {"t": 0.5},
            "models": [{"model": base}, {"model": first}],
            "slices": [{"sources": [{"model": base, "layer_range": [0, 2]}, {"model": first, "layer_range": [0, 3]}]}],
        },
    )
    message = assert_refused(path, tmp_path / "out", ["models: and slices: cannot be mixed", "exactly one of"])
    assert message.startswith(f"{path}: models: and slices:")


def test_scientific_notation_is_a_number(make_models, tmp_path):
    base, first, second = map(str, make_models("bert", 3))
    path = write(
        tmp_path,
        textwrap.dedent(f"""
        merge_method: della
        base_model: {base}
        models:
          - model: {first}
            parameters: {{weight: 5e-1, density: 0.5, epsilon: 1e-2}}
          - model: {second}
            parameters: {{weight: 0.5, density: 0.5, epsilon: 1.5E-2}}
        parameters: {{lambda: 1e0}}
        name: "1e-5"
    """),
    )
    recipe = load_recipe(path)
    first_parameters, second_parameters = (m.parameters for m in recipe.models)
    assert first_parameters == {"weight": 0.5, "density": 0.5, "epsilon": 0.01}
    assert second_parameters["epsilon"] == 0.015 and recipe.parameters == {"lambda": 1.0}
    assert recipe.name == "1e-5"  # a quoted string stays a string


def test_della_epsilon_range_is_checked_before_any_tensor_is_read(make_models, tmp_path, monkeypatch):
    base, first, second = map(str, make_models("bert", 3))
    path = write(
        tmp_path,
        {
            "merge_method": "della",
            "base_model": base,
            "models": [
                {"model": first, "parameters": {"weight": 0.5, "density": 0.3, "epsilon": 0.1}},
                {"model": second, "parameters": {"weight": 0.5, "density": [0.3, 0.8], "epsilon": 0.25}},
            ],
        },
    )

    def no_reads(*args, **kwargs):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(Checkpoint, "read", no_reads)
    message = assert_refused(path, tmp_path / "out", ["della", "epsilon 0.25", "(0, 1)", "lower epsilon"])
    assert "input 1" in message


def test_a_mergekit_kernel_failure_is_one_line_naming_method_and_tensor(make_models, tmp_path, monkeypatch, capsys):
    base, first, second = map(str, make_models("vit", 3))
    path = write(
        tmp_path,
        {
            "merge_method": "della",
            "base_model": base,
            "models": [
                {"model": m, "parameters": {"weight": 0.5, "density": 0.5, "epsilon": 0.1}} for m in (first, second)
            ],
        },
    )
    out = tmp_path / "out"
    with pytest.raises(SpliceError, match=r"^della failed on tensor vit\.embeddings\.cls_token: "):
        splice.merge(path, out, device="cpu")
    assert not out.exists()
    code, _, err = run_cli(["merge", path, "--out", out, "--device", "cpu", "--quiet"], monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "della failed on tensor" in err


def sliced(method: str, *slices: list[tuple[str, int, int]], **extra) -> dict:
    """A `slices:` recipe: each slice a list of (model, start, end)."""
    pieces = [{"sources": [{"model": m, "layer_range": [a, b]} for m, a, b in sources]} for sources in slices]
    return {"merge_method": method, **extra, "slices": pieces}


SLICE_REFUSALS = {
    "range_past_the_depth": (
        lambda base, first: sliced("passthrough", [(base, 0, 2)], [(first, 1, 3)]),
        ["slices[1].sources[0]: layer_range [1, 3] is outside", "which has 2 layers", "exclusive", "[0, 2] takes"],
    ),
    "empty_range": (
        lambda base, first: sliced("passthrough", [(base, 1, 1)]),
        ["slices[0].sources[0]: layer_range [1, 1] takes no layers", "exclusive end"],
    ),
    "different_lengths": (
        lambda base, first: sliced("linear", [(base, 0, 2), (first, 0, 1)], parameters={"weight": 1.0}),
        ["slices[0]: its sources take different numbers of layers", "[0, 2] (2 layers)", "[0, 1] (1 layer)"],
    ),
    "per_slice_method": (
        lambda base, first: {
            "merge_method": "linear",
            "parameters": {"weight": 1.0},
            "slices": [{"merge_method": "slerp", "sources": [{"model": base, "layer_range": [0, 2]}]}],
        },
        ["slices[0].merge_method", "no per-slice merge method", "top level"],
    ),
    "residual_weight": (
        lambda base, first: {
            "merge_method": "passthrough",
            "slices": [{"residual_weight": 0.5, "sources": [{"model": base, "layer_range": [0, 2]}]}],
        },
        ["slices[0].residual_weight", "never uses it"],
    ),
    "base_not_a_source": (
        lambda base, first: sliced("slerp", [(first, 0, 2)], base_model=base, parameters={"t": 0.5}),
        ["slices[0]: base_model", "is not among its sources"],
    ),
    "two_sources_for_passthrough": (
        lambda base, first: sliced("passthrough", [(base, 0, 2), (first, 0, 2)]),
        ["slices[0]: passthrough takes exactly 1 source per slice, got 2"],
    ),
    "same_model_twice": (
        lambda base, first: sliced("linear", [(base, 0, 1), (base, 1, 2)], parameters={"weight": 1.0}),
        ["slices[0]:", "is a source twice"],
    ),
    "missing_parameter": (
        lambda base, first: sliced("ties", [(base, 0, 2), (first, 0, 2)], base_model=base, parameters={"density": 1}),
        ["slices[0]: ties needs parameter 'weight' for source"],
    ),
    "unknown_parameter": (
        lambda base, first: {
            "merge_method": "linear",
            "slices": [{"sources": [{"model": base, "layer_range": [0, 2], "parameters": {"wieght": 1.0}}]}],
        },
        ["slices[0].sources[0]", "unknown parameter 'wieght'"],
    ),
}


@pytest.mark.parametrize("case", list(SLICE_REFUSALS))
def test_slice_recipes_are_refused_naming_the_slice(case, make_models, tmp_path):
    base, first = map(str, make_models("llama", 2))
    build, needles = SLICE_REFUSALS[case]
    assert_refused(write(tmp_path, build(base, first)), tmp_path / "out", needles)


def test_slices_of_a_model_with_two_stacks_of_layers_are_refused(make_models, tmp_path):
    (t5,) = map(str, make_models("t5", 1))
    path = write(tmp_path, sliced("passthrough", [(t5, 0, 2)]))
    with pytest.raises(SpliceError) as caught:
        splice.merge(path, tmp_path / "out", device="cpu")
    assert "has 2 stacks of layers (decoder.block, encoder.block)" in str(caught.value)
    assert "models:" in str(caught.value) and not (tmp_path / "out").exists()


def test_slice_sources_that_do_not_match_are_refused_before_anything_is_read(make_models, tmp_path, monkeypatch):
    (llama,), (gpt2,) = make_models("llama", 1), make_models("gpt2", 1)
    path = write(tmp_path, sliced("linear", [(str(llama), 0, 2), (str(gpt2), 0, 2)], parameters={"weight": 0.5}))
    monkeypatch.setattr(Checkpoint, "read", lambda *a, **k: pytest.fail("a tensor was read"))
    with pytest.raises(SpliceError) as caught:
        splice.merge(path, tmp_path / "out", device="cpu")
    assert "slices[0]: the sources do not match" in str(caught.value) and "has no counterpart in" in str(caught.value)
    assert not (tmp_path / "out").exists()
