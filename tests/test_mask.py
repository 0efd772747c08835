"""Mask patches: bit-packed masks, top-k selection per tensor and model-wide, sparse deltas and pruning masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splice.adapters.apply import apply_patches
from splice.adapters.extract import extract_patch
from splice.adapters.kinds.mask import pack_mask, unpack_mask
from splice.adapters.patch import Patch, PatchError
from splice.tensors.checkpoint import Checkpoint

from conftest import perturbed, save, tiny_model
from helpers import load_dir, run_cli


@pytest.fixture
def pair(tmp_path):
    base = tiny_model("bert", 0)
    tuned = perturbed(base, 4)
    with torch.no_grad():  # exact ties in |delta|, so the tie-break is exercised
        tuned.state_dict()["bert.encoder.layer.0.output.dense.weight"][:3, :4] = (
            base.state_dict()["bert.encoder.layer.0.output.dense.weight"][:3, :4] + 0.5
        )
    return save(base, tmp_path / "base", sharded=True), save(tuned, tmp_path / "tuned", sharded=False)


def float_deltas(base_dir, tuned_dir) -> dict[str, np.ndarray]:
    base, tuned = load_dir(base_dir), load_dir(tuned_dir)
    out = {}
    for name, before in base.items():
        if before.dtype.is_floating_point:
            delta = (tuned[name].double() - before.double()).float().numpy()
            if delta.any():
                out[name] = delta
    return out


def top_k_lowest_index_first(magnitudes: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values; among equal values the lowest index wins (stable sort)."""
    order = np.argsort(-magnitudes, kind="stable")
    return np.sort(order[:k])


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (3, 5), (4, 4, 3), (1000,)])
def test_pack_matches_numpy_little_bit_order_and_round_trips(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape))) < 0.3
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy().reshape(-1), bitorder="little"))
    assert torch.equal(unpack_mask(packed, shape), mask)
    with pytest.raises(PatchError, match="cannot hold"):
        unpack_mask(packed, (mask.numel() + 8,))


def test_per_tensor_mask_keeps_each_tensors_top_k_and_applies_as_a_sparse_delta(pair, tmp_path):
    base_dir, tuned_dir = pair
    density = 0.05
    patch = extract_patch(base_dir, tuned_dir, "mask", density=density, device="cpu")
    expected = float_deltas(base_dir, tuned_dir)
    assert sorted(patch.meta.targets) == sorted(expected)
    chosen = {}
    for name, delta in expected.items():
        flat = delta.reshape(-1)
        k = max(1, int(density * flat.size))
        indices = top_k_lowest_index_first(np.abs(flat), k)
        mask = unpack_mask(patch.tensors[name + ".mask"], delta.shape).numpy().reshape(-1)
        assert np.array_equal(np.flatnonzero(mask), indices), name
        assert np.array_equal(patch.tensors[name + ".values"].numpy(), flat[indices]), name
        assert patch.tensors[name + ".mask"].numel() == -(-flat.size // 8)
        chosen[name] = indices
    patch.save(tmp_path / "mask")
    apply_patches([tmp_path / "mask"], base_dir, tmp_path / "out", device="cpu")
    out, base = load_dir(tmp_path / "out"), load_dir(base_dir)
    for name, before in base.items():
        if name not in chosen:
            assert torch.equal(out[name], before), name
            continue
        independent = before.reshape(-1).clone()
        independent[torch.from_numpy(chosen[name])] += torch.from_numpy(expected[name].reshape(-1)[chosen[name]])
        assert torch.equal(out[name], independent.reshape(before.shape)), name


def test_model_wide_mask_keeps_the_global_top_k(pair):
    base_dir, tuned_dir = pair
    density = 0.01
    patch = extract_patch(base_dir, tuned_dir, "mask", density=density, mask_scope="model", device="cpu")
    expected = float_deltas(base_dir, tuned_dir)
    base = Checkpoint.open(base_dir)
    total = sum(info.numel for info in base.tensors.values() if info.dtype.is_floating_point)
    names = [name for name in base.tensors if name in expected]  # storage order decides ties across tensors
    flat = np.concatenate([np.abs(expected[name].reshape(-1)) for name in names])
    keep = np.zeros(flat.size, dtype=bool)
    keep[top_k_lowest_index_first(flat, int(density * total))] = True
    offset = 0
    for name in names:
        size = expected[name].size
        wanted = keep[offset : offset + size]
        offset += size
        if not wanted.any():
            assert name + ".mask" not in patch.tensors
            continue
        got = unpack_mask(patch.tensors[name + ".mask"], expected[name].shape).numpy().reshape(-1)
        assert np.array_equal(got, wanted), name
    assert sum(patch.meta.settings["kept"].values()) == int(density * total)


def test_full_density_sparse_delta_reproduces_the_fine_tune(pair, tmp_path):
    base_dir, tuned_dir = pair
    patch = extract_patch(base_dir, tuned_dir, "mask", density=1.0, device="cpu")
    apply_patches([patch], base_dir, tmp_path / "out", device="cpu")
    out, tuned = load_dir(tmp_path / "out"), load_dir(tuned_dir)
    for name in tuned:
        torch.testing.assert_close(out[name], tuned[name], rtol=0, atol=1e-6)


def test_a_bare_mask_prunes_and_composes_with_a_delta_in_order(pair, tmp_path):
    base_dir, tuned_dir = pair
    mask = extract_patch(base_dir, tuned_dir, "mask", density=0.1, mask_values=False, device="cpu")
    assert not any(name.endswith(".values") for name in mask.tensors)
    delta = extract_patch(base_dir, tuned_dir, "delta")
    apply_patches([mask, delta], base_dir, tmp_path / "out", device="cpu")
    out, base = load_dir(tmp_path / "out"), load_dir(base_dir)
    for name, before in base.items():
        expected = before.clone()
        if name in mask.meta.settings["shapes"]:
            expected = expected * unpack_mask(mask.tensors[name + ".mask"], before.shape).float()
        if name in delta.tensors:
            expected = expected + delta.tensors[name]
        assert torch.equal(out[name], expected), name


def test_a_mask_patch_stores_one_bit_per_entry_plus_the_kept_values(pair, tmp_path):
    base_dir, tuned_dir = pair
    patch = extract_patch(base_dir, tuned_dir, "mask", density=0.01, device="cpu")
    patch.save(tmp_path / "mask")
    stored = Checkpoint.open(tmp_path / "mask", weights_file="tensors.safetensors")
    payload = sum(info.nbytes for info in stored.tensors.values())
    expected = float_deltas(base_dir, tuned_dir)
    kept = patch.meta.settings["kept"]
    assert payload == sum(-(-expected[name].size // 8) + 4 * kept[name] for name in kept)
    assert payload < sum(delta.size * 4 for delta in expected.values()) / 6
    reloaded = Patch.load(tmp_path / "mask")
    assert reloaded.meta.settings == patch.meta.settings


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "needs `density`"),
        ({"density": 0}, "needs `density`"),
        ({"density": 1.5}, "needs `density`"),
        ({"density": 0.1, "mask_scope": "layer"}, "`mask_scope` must be one of tensor, model"),
    ],
)
def test_bad_mask_options_are_refused(pair, options, message):
    base_dir, tuned_dir = pair
    with pytest.raises(PatchError, match=message):
        extract_patch(base_dir, tuned_dir, "mask", **options)


def test_cli_extracts_and_applies_a_mask_patch(pair, tmp_path, monkeypatch, capsys):
    base_dir, tuned_dir = pair
    code, out, err = run_cli(
        [
            "patch",
            "extract",
            "--base",
            base_dir,
            "--tuned",
            tuned_dir,
            "--kind",
            "mask",
            "--density",
            "0.02",
            "--mask-scope",
            "model",
            "--out",
            tmp_path / "m",
            "--device",
            "cpu",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    assert "mask patch" in out
    code, _, err = run_cli(
        ["patch", "apply", tmp_path / "m", "--base", base_dir, "--out", tmp_path / "out", "-q"], monkeypatch, capsys
    )
    assert code == 0, err
    code, _, err = run_cli(
        ["patch", "extract", "--base", base_dir, "--tuned", tuned_dir, "--kind", "mask", "--out", tmp_path / "bad"],
        monkeypatch,
        capsys,
    )
    assert code == 2 and err.startswith("error: a mask patch needs --density") and not (tmp_path / "bad").exists()


def test_settings_are_described_in_one_line(pair):
    from splice.adapters.patch import describe_settings

    base_dir, tuned_dir = pair
    mask = extract_patch(base_dir, tuned_dir, "mask", density=0.05, device="cpu")
    kept = mask.meta.settings["kept"]
    assert describe_settings(mask.meta) == (
        f"density 0.05 per tensor, sparse delta; {sum(kept.values()):,} entries kept in {len(kept)} tensors"
    )
    lora = extract_patch(base_dir, tuned_dir, "lora", rank=2, device="cpu")
    errors = lora.meta.settings["relative_error"]
    worst = max(errors, key=errors.get)
    left = len(lora.meta.settings["left_out"])
    assert describe_settings(lora.meta) == (
        f"rank 2 on {len(errors)} matrices; rsLoRA no; relative error of the "
        f"delta at most {errors[worst]:.2g} ({worst}); {left} changed tensors "
        f"left out (not matrices)"
    )


@pytest.mark.parametrize("values", [True, False], ids=["sparse-delta", "mask-only"])
def test_a_mask_patch_counts_the_values_it_holds_and_its_mask_bits_apart(pair, tmp_path, monkeypatch, capsys, values):
    """Issue 16 item 17: a 1% mask patch reported its packed mask bytes as parameters (3,066,373 on MiniLM for
    227,076 values). Counted independently: per tensor the top max(1, int(0.01 n)) entries of every changed
    tensor (every entry of the perturbed fine-tune changed), one mask bit per entry of those tensors."""
    base_dir, tuned_dir = pair
    expected = float_deltas(base_dir, tuned_dir)
    held = sum(max(1, int(0.01 * delta.size)) for delta in expected.values()) if values else 0
    bits = sum(delta.size for delta in expected.values())
    code, out, err = run_cli(
        [
            "patch",
            "extract",
            "--base",
            base_dir,
            "--tuned",
            tuned_dir,
            "--kind",
            "mask",
            "--density",
            "0.01",
            "--mask-values" if values else "--mask-only",
            "--out",
            tmp_path / "m",
            "--device",
            "cpu",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    patch = Patch.load(tmp_path / "m")
    assert (patch.num_parameters, patch.size.mask_bits) == (held, bits)
    flat = " ".join(out.split())
    assert f"│ {held:,} │ {bits:,} │" in flat, out

    monkeypatch.setenv("SPLICE_REGISTRY", str(tmp_path / "registry"))
    for args in (["registry", "init"], ["registry", "push", "sparse", tmp_path / "m"]):
        code, _, err = run_cli(args, monkeypatch, capsys)
        assert code == 0, err
    code, out, err = run_cli(["registry", "show", "sparse@1"], monkeypatch, capsys)
    assert code == 0, err
    flat = " ".join(out.split())
    assert f"│ parameters │ {held:,} │" in flat and f"│ mask bits │ {bits:,} │" in flat, out
