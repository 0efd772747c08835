"""Bad values that would become bad models (issue 10 item 8): every number splice reads is finite and of the
type it means, nesting is bounded, and no output holds NaN/Inf its inputs did not. Each case goes through the
real entry point (the CLI, `splice.merge`, `apply_patches`, `load_patch`): a one-line error, nothing written."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_peft_interop import peft_lora

from splice.adapters.apply import apply_patches
from splice.adapters.sources import load_patch
from splice.errors import NonFiniteOutputError, PatchError, RecipeError
from splice.merge.recipe import merge

from conftest import perturbed, save, tiny_model
from helpers import load_dir, run_cli


@pytest.fixture
def two_models(tmp_path) -> tuple[Path, Path]:
    base = tiny_model("bert", 0)
    return (save(base, tmp_path / "a", sharded=False), save(perturbed(base, 1), tmp_path / "b", sharded=False))


def write_recipe(
    path: Path,
    models: tuple[Path, Path],
    method: str = "linear",
    weights=(0.5, 0.5),
    parameters: dict | None = None,
    dtype: str | None = None,
    raw_weight: str | None = None,
) -> Path:
    """A recipe file; `raw_weight` is written verbatim as the first model's weight (YAML's own `.nan`)."""
    recipe = {
        "merge_method": method,
        "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, weights)],
    }
    if method != "linear":
        recipe["base_model"] = str(models[0])
        recipe["models"] = recipe["models"][1:]
    if parameters:
        recipe["parameters"] = parameters
    if dtype:
        recipe["dtype"] = dtype
    text = yaml.safe_dump(recipe)
    if raw_weight is not None:
        text = text.replace("weight: PLACEHOLDER", f"weight: {raw_weight}")
    path.write_text(text)
    return path


def refused(code: int, err: str, *words: str) -> bool:
    line = err.strip()
    return code == 2 and len(line.splitlines()) == 1 and "Traceback" not in err and all(w in line for w in words)


@pytest.mark.parametrize("raw", [".nan", ".inf", "-.inf", "[0.5, .nan]", "[{filter: mlp, value: .nan}, {value: 1}]"])
def test_a_recipe_weight_that_is_not_finite_is_refused(tmp_path, two_models, monkeypatch, capsys, raw):
    recipe = write_recipe(tmp_path / "r.yaml", two_models, weights=("PLACEHOLDER", 0.5), raw_weight=raw)
    code, _, err = run_cli(
        ["merge", recipe, "--out", tmp_path / "out", "--device", "cpu", "--quiet"], monkeypatch, capsys
    )
    assert refused(code, err, "finite"), err
    assert not (tmp_path / "out").exists()


def test_a_non_finite_global_parameter_is_refused_before_any_read(tmp_path, two_models):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        two_models,
        method="task_arithmetic",
        weights=(1.0, 1.0),
        parameters={"lambda": float("nan")},
    )
    with pytest.raises(RecipeError, match="finite") as caught:
        merge(recipe, tmp_path / "out", device="cpu")
    assert len(str(caught.value).splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_finite_weight_that_overflows_is_refused_naming_the_tensor(tmp_path, two_models, monkeypatch, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", two_models, weights=(1e308, 1.0), parameters={"normalize": False})
    code, _, err = run_cli(
        ["merge", recipe, "--out", tmp_path / "out", "--device", "cpu", "--quiet"], monkeypatch, capsys
    )
    assert refused(code, err, "NaN/Inf"), err
    named = re.search(r"output tensor (\S+) would hold NaN/Inf", err)
    assert named and named.group(1) in load_dir(two_models[0]), err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no partial left beside it


@pytest.mark.parametrize("slices", [False, True], ids=["whole-blocks", "cache-sized-slices"])
def test_an_output_dtype_overflow_is_refused(tmp_path, two_models, monkeypatch, slices):
    # LayerNorm weights are 1.0: 2e5 of them is beyond float16's 65504
    if slices:  # every tensor of more than 4 entries computed, cast and checked slice by slice
        import splice.tensors.stream as stream

        monkeypatch.setattr(stream, "COMPUTE_SLICE", 4)
    recipe = write_recipe(
        tmp_path / "r.yaml", two_models, weights=(1e5, 1e5), parameters={"normalize": False}, dtype="float16"
    )
    with pytest.raises(NonFiniteOutputError, match="LayerNorm.weight|float16") as caught:
        merge(recipe, tmp_path / "out", device="cpu")
    assert len(str(caught.value).splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_model_that_already_holds_inf_still_merges(tmp_path, monkeypatch, capsys):
    models = []
    for seed in (0, 1):
        model = tiny_model("bert", seed)
        with torch.no_grad():
            model.classifier.bias[0] = -math.inf  # e.g. a mask of a class that must never be predicted
        models.append(save(model, tmp_path / f"m{seed}", sharded=False))
    code, _, err = run_cli(
        ["soup", *models, "--out", tmp_path / "soup", "--device", "cpu", "--quiet"], monkeypatch, capsys
    )
    assert code == 0, err
    bias = load_dir(tmp_path / "soup")["classifier.bias"]
    assert bias[0] == -math.inf and torch.isfinite(bias[1:]).all()


def apply_is_refused(patch: Path, base: Path, out: Path, words, monkeypatch, capsys) -> None:
    """`splice patch apply PATCH --base BASE --out OUT` exits 2 with one line naming `words`; nothing at OUT."""
    code, _, err = run_cli(
        ["patch", "apply", patch, "--base", base, "--out", out, "--device", "cpu", "--quiet"], monkeypatch, capsys
    )
    assert refused(code, err, *words), err
    assert not out.exists()


def test_finite_values_whose_sum_overflows_still_merge(tmp_path):
    """The stream's check sums a tensor first; finite entries whose sum is beyond float32 are not taken for Inf:
    here each input's classifier.bias sums to 2e38, the merged one's to 4e38, every entry finite."""
    models = []
    for seed in (0, 1):
        model = tiny_model("bert", seed)
        with torch.no_grad():
            model.classifier.bias.zero_()[seed] = 2e38
        models.append(save(model, tmp_path / f"m{seed}", sharded=False))
    recipe = write_recipe(tmp_path / "r.yaml", tuple(models), weights=(1.0, 1.0), parameters={"normalize": False})
    merge(recipe, tmp_path / "out", device="cpu")
    assert torch.equal(load_dir(tmp_path / "out")["classifier.bias"], torch.tensor([2e38, 2e38, 0.0]))


# --- PEFT adapter configs -------------------------------------------------------------------------------------


@pytest.fixture
def adapter(tmp_path) -> tuple[Path, Path]:
    """(a real PEFT LoRA adapter directory, its base model directory)."""
    base = tiny_model("bert", 0)
    model = peft_lora("bert", base)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", save(base, tmp_path / "base", sharded=False)


def set_config(adapter_dir: Path, text: str) -> None:
    """Replace values in adapter_config.json as text (JSON's own `Infinity`, a string where a number goes)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config.update(json.loads(text))
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "change, words",
    [
        ('{"lora_alpha": Infinity}', ("lora_alpha", "finite")),
        ('{"lora_alpha": NaN}', ("lora_alpha", "finite")),
        ('{"lora_alpha": "abc"}', ("lora_alpha",)),
        ('{"lora_alpha": [8]}', ("lora_alpha",)),
        ('{"lora_alpha": 1e308}', ("lora_alpha",)),
        ('{"use_rslora": "false"}', ("use_rslora", "bool")),
        ('{"fan_in_fan_out": "no"}', ("fan_in_fan_out", "bool")),
        ('{"r": "4"}', ("r",)),
        ('{"rank_pattern": ["query"]}', ("rank_pattern",)),
        ('{"rank_pattern": {"query": "4"}}', ("rank_pattern",)),
        ('{"alpha_pattern": {"query": Infinity}}', ("alpha_pattern", "finite")),
        # strings from the file with a line break in them stay on the error's one line (issue 16 item 10)
        ('{"rank_pattern": {"query\\nvalue": 0}}', ("rank_pattern", "query\\nvalue")),
        ('{"alpha_pattern": {"que\\r\\nry": "x"}}', ("alpha_pattern", "que\\r\\nry")),
        ('{"rank_pattern": {"(\\n": 2}}', ("rank_pattern", "regular expression")),
        ('{"peft_type": "IA3\\nLORA"}', ("IA3\\nLORA", "not supported")),
        ('{"init_lora_weights": "pissa\\nniter_4"}', ("pissa\\nniter_4",)),
    ],
)
def test_a_bad_peft_config_value_is_refused_in_one_line(tmp_path, adapter, monkeypatch, capsys, change, words):
    adapter_dir, base_dir = adapter
    set_config(adapter_dir, change)
    apply_is_refused(adapter_dir, base_dir, tmp_path / "out", words, monkeypatch, capsys)


def test_a_good_peft_config_still_reads(tmp_path, adapter):
    adapter_dir, base_dir = adapter
    set_config(adapter_dir, '{"use_rslora": false, "lora_alpha": 16.0, "rank_pattern": {"value": 4}}')
    patch = load_patch(adapter_dir)
    assert patch.meta.settings["rslora"] is False
    assert set(patch.meta.settings["alpha"].values()) == {16.0}
    apply_patches([adapter_dir], base_dir, tmp_path / "out", device="cpu")
    assert torch.isfinite(
        torch.cat([t.flatten() for t in load_dir(tmp_path / "out").values() if t.dtype.is_floating_point])
    ).all()


def test_lora_factors_that_overflow_in_place_are_refused(tmp_path, adapter):
    """The LoRA kernel adds B @ A into the base tensor in place: the check reads the inputs again, so the base
    (finite on disk) is not taken for an input that already held Inf."""
    adapter_dir, base_dir = adapter
    weights = adapter_dir / "adapter_model.safetensors"
    save_file({name: t * 1e20 if "query" in name else t for name, t in load_file(weights).items()}, weights)
    with pytest.raises(NonFiniteOutputError, match=r"output tensor \S*query\.weight would hold NaN/Inf") as caught:
        apply_patches([adapter_dir], base_dir, tmp_path / "out", device="cpu")
    assert len(str(caught.value).splitlines()) == 1
    assert not (tmp_path / "out").exists()


# --- patch.json (PatchMeta) ------------------------------------------------------------------------------------


@pytest.fixture
def lora_patch(tmp_path, adapter) -> tuple[Path, Path]:
    """(a splice LoRA patch directory made from the adapter, its base directory)."""
    adapter_dir, base_dir = adapter
    load_patch(adapter_dir).save(tmp_path / "patch")
    return tmp_path / "patch", base_dir


def edit_manifest(patch_dir: Path, edit) -> None:
    manifest = json.loads((patch_dir / "patch.json").read_text())
    edit(manifest)
    (patch_dir / "patch.json").write_text(json.dumps(manifest))


def deep(levels: int):
    value: object = 1
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda m: m["metrics"].update(accuracy=math.nan), ("metrics", "finite")),
        (lambda m: m["metrics"].update(accuracy=math.inf), ("metrics", "finite")),
        (lambda m: m["metrics"].update(accuracy="0.9"), ("metrics",)),
        (lambda m: m["settings"].update(extra={"nested": [1.0, -math.inf]}), ("settings", "finite")),
        (lambda m: m["settings"].update(extra=deep(40)), ("settings", "nest")),
        (lambda m: m["settings"].update(rslora="false"), ("settings", "rslora")),
        (lambda m: m["settings"]["alpha"].update({next(iter(m["settings"]["alpha"])): math.inf}), ("finite",)),
    ],
)
def test_a_bad_patch_json_value_is_refused(tmp_path, lora_patch, monkeypatch, capsys, edit, words):
    patch_dir, base_dir = lora_patch
    edit_manifest(patch_dir, edit)
    with pytest.raises(PatchError) as caught:
        load_patch(patch_dir)
    assert len(str(caught.value).splitlines()) == 1 and all(w in str(caught.value) for w in words), caught.value
    apply_is_refused(patch_dir, base_dir, tmp_path / "out", words, monkeypatch, capsys)


def test_a_patch_json_nested_past_the_parser_is_refused(tmp_path, lora_patch):
    patch_dir, _ = lora_patch
    text = (patch_dir / "patch.json").read_text()
    (patch_dir / "patch.json").write_text(
        text.replace('"settings": {', '"settings": {"x": ' + "[" * 100_000 + "]" * 100_000 + ", ", 1)
    )
    with pytest.raises(PatchError, match="patch.json") as caught:
        load_patch(patch_dir)
    assert len(str(caught.value).splitlines()) == 1


def test_an_untouched_patch_json_still_reads(lora_patch):
    patch_dir, _ = lora_patch
    edit_manifest(patch_dir, lambda m: m["metrics"].update(accuracy=0.91, steps=300))
    meta = load_patch(patch_dir).meta
    assert meta.metrics == {"accuracy": 0.91, "steps": 300.0}


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda m: m["settings"].update(values="false"), ("settings", "values", "bool")),
        (lambda m: m["settings"]["shapes"].update({next(iter(m["settings"]["shapes"])): ["16"]}), ("shapes",)),
        (lambda m: m["settings"].update(density=math.nan), ("density", "finite")),
    ],
)
def test_a_bad_mask_setting_is_refused(tmp_path, two_models, monkeypatch, capsys, edit, words):
    base, tuned = two_models
    code, _, err = run_cli(
        [
            "patch",
            "extract",
            "--base",
            base,
            "--tuned",
            tuned,
            "--kind",
            "mask",
            "--density",
            "0.1",
            "--device",
            "cpu",
            "--out",
            tmp_path / "mask",
            "--quiet",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    load_patch(tmp_path / "mask")  # as written, it reads
    edit_manifest(tmp_path / "mask", edit)
    apply_is_refused(tmp_path / "mask", base, tmp_path / "out", words, monkeypatch, capsys)


# --- deployment records in safetensors metadata --------------------------------------------------------------


@pytest.mark.parametrize(
    "record", ['{"registry": "r", "base": "b", "patches": "none"}', "[" * 100_000 + "]" * 100_000, "{not json"]
)
def test_a_bad_deployment_record_is_refused_in_one_line(tmp_path, monkeypatch, capsys, record):
    model_dir = save(tiny_model("bert", 0), tmp_path / "model", sharded=False)
    weights = model_dir / "model.safetensors"
    save_file(load_file(weights), weights, metadata={"format": "pt", "splice_deployment": record})
    code, _, err = run_cli(["inspect", model_dir], monkeypatch, capsys)
    assert refused(code, err, "deployment record"), err


def big_values(tmp_path: Path, seeds=(0, 1)) -> list[Path]:
    """Two fp32 BERTs whose classifier weights are about 1e5: finite, but beyond float16's 65504."""
    base = tiny_model("bert", 0)
    dirs = []
    for seed in seeds:
        model = perturbed(base, seed + 1)
        with torch.no_grad():
            model.classifier.weight.fill_(1e5)
        dirs.append(save(model, tmp_path / f"big-{seed}", sharded=False))
    return dirs


def test_a_greedy_soup_that_would_write_inf_is_refused(tmp_path):
    from splice.merge.soup import greedy_soup

    dirs = big_values(tmp_path)
    with pytest.raises(NonFiniteOutputError, match=r"classifier\.weight") as caught:
        greedy_soup(dirs, tmp_path / "out", lambda state: 0.0, device="cpu", dtype="float16")
    assert len(str(caught.value).splitlines()) == 1
    assert not (tmp_path / "out").exists()
    greedy_soup(dirs, tmp_path / "fp32", lambda state: 0.0, device="cpu")  # the same soup in fp32 is fine
    assert torch.isfinite(load_dir(tmp_path / "fp32")["classifier.weight"]).all()
