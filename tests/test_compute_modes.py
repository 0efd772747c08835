"""`compute: mergekit` gives mergekit-yaml's output bit for bit in bf16 and fp16; a seeded random method draws in
mergekit's tensor order, so one seed gives mergekit's output also for a sharded model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import splice

from conftest import perturbed, save, tiny_model
from helpers import load_dir, run_mergekit


def half_models(tmp_path: Path, dtype: torch.dtype, count: int = 3) -> list[Path]:
    base = tiny_model("llama", 0)
    models = [base] + [perturbed(base, i, scale=0.05) for i in range(1, count)]
    return [save(m.to(dtype), tmp_path / f"{dtype}-{i}", sharded=True) for i, m in enumerate(models)]


def recipe(method: str, dirs: list[Path], dtype: str | None) -> dict:
    base, first, second = (str(d) for d in dirs)
    data: dict = {"merge_method": method, "parameters": {}}
    if method == "linear":
        data["models"] = [
            {"model": base, "parameters": {"weight": 0.3}},
            {"model": first, "parameters": {"weight": [0.2, 0.7]}},
            {"model": second, "parameters": {"weight": 0.45}},
        ]
    elif method == "slerp":
        data |= {"base_model": base, "models": [{"model": base}, {"model": first}], "parameters": {"t": [0.1, 0.8]}}
    else:
        data |= {
            "base_model": base,
            "models": [
                {"model": first, "parameters": {"weight": 0.6, "density": 0.5}},
                {"model": second, "parameters": {"weight": [0.3, 0.9], "density": 0.7}},
            ],
        }
    if dtype is not None:
        data["dtype"] = dtype
    return data


def both_ways(tmp_path: Path, data: dict, seed: int | None = None) -> tuple[dict, dict, dict]:
    """(mergekit-yaml's output, splice's with compute: mergekit, splice's with compute: exact)."""
    theirs = tmp_path / "mergekit.yml"
    theirs.write_text(yaml.safe_dump(data))
    run_mergekit(theirs, tmp_path / "mergekit", *(["--random-seed", str(seed)] if seed is not None else []))
    outputs = {}
    for compute in ("mergekit", "exact"):
        ours = tmp_path / f"{compute}.yml"
        ours.write_text(yaml.safe_dump(data | {"compute": compute}))
        splice.merge(ours, tmp_path / f"splice-{compute}", device="cpu", seed=seed)
        outputs[compute] = load_dir(tmp_path / f"splice-{compute}")
    return load_dir(tmp_path / "mergekit"), outputs["mergekit"], outputs["exact"]


@pytest.mark.parametrize(
    "dtype, method, declared, rounds_in_dtype",
    [
        (torch.bfloat16, "linear", "bfloat16", True),
        (torch.bfloat16, "ties", "bfloat16", True),
        (torch.bfloat16, "slerp", "bfloat16", False),  # mergekit's slerp computes in fp32 itself
        (torch.bfloat16, "dare_ties", "bfloat16", True),
        (torch.float16, "task_arithmetic", None, True),  # no dtype: computed as stored, in fp16
        (torch.float16, "ties", "float16", True),
    ],
)
def test_compute_mergekit_is_mergekit_bit_for_bit(dtype, method, declared, rounds_in_dtype, tmp_path):
    dirs = half_models(tmp_path, dtype)
    theirs, as_mergekit, exact = both_ways(tmp_path, recipe(method, dirs, declared), seed=5)
    assert set(as_mergekit) == set(theirs)
    for name in theirs:
        assert as_mergekit[name].dtype == theirs[name].dtype == dtype, name
        assert torch.equal(as_mergekit[name], theirs[name]), name
    # the recipe written for mergekit's tools leaves out how splice computes: mergekit-yaml runs it as above
    written = yaml.safe_load((tmp_path / "splice-mergekit" / "mergekit_config.yml").read_text())
    assert "compute" not in written and written["merge_method"] == method
    # the default, exact, computes in fp32 and rounds once: other bits wherever mergekit rounds in the half dtype
    assert any(not torch.equal(exact[name], theirs[name]) for name in theirs) == rounds_in_dtype


def test_seeded_dare_on_a_sharded_model_equals_mergekit(make_models, tmp_path):
    dirs = make_models("llama", 3, sharded=True)
    index = json.loads((dirs[0] / "model.safetensors.index.json").read_text())["weight_map"]
    by_shard = sorted(index, key=lambda name: (index[name], name))
    assert by_shard != sorted(index)  # storage order is not mergekit's order, so the order matters here
    data = recipe("dare_ties", dirs, "float32")
    path = tmp_path / "dare.yml"
    path.write_text(yaml.safe_dump(data))
    run_mergekit(path, tmp_path / "mergekit", "--random-seed", "11")
    splice.merge(path, tmp_path / "splice", device="cpu", seed=11)
    theirs, ours = load_dir(tmp_path / "mergekit"), load_dir(tmp_path / "splice")
    assert set(ours) == set(theirs)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6, msg=name)
