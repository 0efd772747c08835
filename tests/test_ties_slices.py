"""TIES on the CPU in cache-sized slices (Kernel.prepare): each delta's magnitude threshold found by counting the
magnitudes' bits over the slices (sparsify.sliced_magnitude_masks), then the slices trimmed and merged in order.
It must keep exactly what `top_magnitude_mask` keeps on the whole tensor (ties at the threshold lowest index first),
and a merge in slices must equal the merge on whole tensors bit for bit, which the other tests hold to mergekit."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from safetensors.torch import save_file

import splice
import splice.tensors.stream as stream
from splice.sparsify import sliced_magnitude_masks, top_magnitude_mask

from helpers import load_dir


def slices_of(tensor: torch.Tensor, rows: int):
    def magnitudes():
        for start in range(0, tensor.shape[0], rows):
            yield [tensor[start : start + rows].abs()]

    return magnitudes


def kept_in_slices(tensor: torch.Tensor, density: float, rows: int) -> torch.Tensor | None:
    (mask,) = sliced_magnitude_masks(slices_of(tensor, rows), tensor.numel(), [density])
    return None if mask is None else torch.cat([mask.keep(part) for (part,) in slices_of(tensor, rows)()])


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("values", ["gaussian", "many-ties", "half-zero", "with-inf"])
def test_the_sliced_selection_keeps_what_the_whole_tensor_selection_keeps(seed, values):
    generator = torch.Generator().manual_seed(seed)
    rows, cols = (int(x) for x in torch.randint(1, 60, (2,), generator=generator))
    tensor = torch.randn(rows, cols, generator=generator)
    if values == "many-ties":  # a few distinct magnitudes: the threshold is shared by many entries
        tensor = torch.round(tensor * 2) / 2
    elif values == "half-zero":
        tensor[: rows // 2] = 0
    elif values == "with-inf":
        tensor.view(-1)[::7] = float("inf")
    density = float(torch.rand(1, generator=generator))
    step = int(torch.randint(1, rows + 1, (1,), generator=generator))
    expected = top_magnitude_mask(tensor, density)
    assert expected is not None and int(expected.sum()) == max(1, int(density * tensor.numel()))
    assert torch.equal(kept_in_slices(tensor, density, step), expected)


@pytest.mark.parametrize("density", [0.0, 1.0, 1e-9])
def test_edge_densities_keep_what_the_whole_tensor_selection_keeps(density):
    tensor = torch.randn(30, 7, generator=torch.Generator().manual_seed(1))
    expected, kept = top_magnitude_mask(tensor, density), kept_in_slices(tensor, density, 4)
    assert (expected is None and kept is None) or torch.equal(kept, expected)


def test_a_nan_magnitude_sends_the_tensor_to_the_whole_tensor_selection():
    tensor = torch.randn(20, 5)
    tensor[3, 2] = float("nan")
    assert sliced_magnitude_masks(slices_of(tensor, 3), tensor.numel(), [0.5]) is None


def bf16_copies(dirs, tmp_path):
    """The models in bf16, their values rounded so that many deltas share a magnitude (ties at the thresholds)."""
    copies = []
    for i, source in enumerate(dirs):
        target = tmp_path / f"bf16-{i}"
        target.mkdir()
        shutil.copy(source / "config.json", target / "config.json")
        state = {n: (torch.round(t * 64) / 64).to(torch.bfloat16) for n, t in load_dir(source).items()}
        save_file(state, target / "model.safetensors")
        copies.append(target)
    return copies


def ties_recipe(tmp_path, dirs, dtype, **options) -> str:
    base, first, second = (str(d) for d in dirs)
    data = {
        "merge_method": "ties",
        "base_model": base,
        "dtype": dtype,
        "models": [
            {"model": first, "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": second, "parameters": {"weight": [0.2, 0.5], "density": [0.3, 0.8]}},
        ],
        "parameters": {"lambda": 0.9, **options},
    }
    path = tmp_path / f"ties-{dtype}-{len(options)}.yml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "options", [{}, {"normalize": False}, {"rescale": True}], ids=["default", "no-normalize", "rescale"]
)
def test_ties_in_slices_equals_ties_on_whole_tensors_bit_for_bit(stored, options, make_models, tmp_path, monkeypatch):
    dirs = make_models("llama", 3)
    if stored == "bfloat16":
        dirs = bf16_copies(dirs, tmp_path)
    recipe = ties_recipe(tmp_path, dirs, stored, **options)
    monkeypatch.setattr(stream, "COMPUTE_SLICE", 10**12)  # whole tensors
    splice.merge(recipe, tmp_path / "whole", device="cpu")
    prepared = []
    monkeypatch.setattr(stream, "COMPUTE_SLICE", 40)  # every matrix in many slices of a few rows
    original = stream._computed_in_slices

    def spy(kernel, name, tensors, dtype):
        found = original(kernel, name, tensors, dtype)
        prepared.append(found is not None)
        return found

    monkeypatch.setattr(stream, "_computed_in_slices", spy)
    splice.merge(recipe, tmp_path / "slices", device="cpu")
    whole, slices = load_dir(tmp_path / "whole"), load_dir(tmp_path / "slices")
    assert prepared and all(prepared) != bool(options.get("rescale"))  # rescale sums whole deltas: not in slices
    for name, tensor in whole.items():
        assert torch.equal(slices[name], tensor), name
