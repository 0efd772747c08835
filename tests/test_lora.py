"""LoRA patches: truncated-SVD extraction checked against numpy, applied streamed and live, composed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from splice.adapters.apply import apply_patches
from splice.adapters.extract import extract_patch
from splice.adapters.kinds.lora import truncated_svd
from splice.adapters.live import apply_patch
from splice.adapters.patch import Patch, PatchError

from conftest import example_inputs, model_class, save, tiny_model
from helpers import load_dir, run_cli


def low_rank_fine_tune(
    model: torch.nn.Module, seed: int, rank, scale: float = 0.05, vectors: bool = False, norms: bool = False
) -> torch.nn.Module:
    """A copy whose every matrix (`*.weight`, 2-D) moved by a delta of exactly rank `rank(index, shape)` (an int
    works too); with `vectors` also every 1-D tensor moved, with `norms` only the norm ones."""
    rank_of = rank if callable(rank) else (lambda index, shape: rank)
    tuned = type(model)(model.config)
    tuned.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for index, (name, parameter) in enumerate(tuned.named_parameters()):
            if parameter.dim() == 2 and name.endswith(".weight"):
                k = min(rank_of(index, tuple(parameter.shape)), *parameter.shape)
                left = torch.randn(parameter.shape[0], k, generator=generator)
                right = torch.randn(k, parameter.shape[1], generator=generator)
                parameter.add_(scale * left @ right / math.sqrt(parameter.shape[1]))
            elif parameter.dim() == 1 and (vectors or (norms and "norm" in name.lower())):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return tuned


def lora_product(patch: Patch, module: str) -> torch.Tensor:
    settings = patch.meta.settings
    rank, alpha = settings["rank"][module], settings["alpha"][module]
    scale = alpha / math.sqrt(rank) if settings["rslora"] else alpha / rank
    return scale * patch.tensors[f"{module}.lora_B"].double() @ patch.tensors[f"{module}.lora_A"].double()


def stored_deltas(base_dir, tuned_dir) -> dict[str, torch.Tensor]:
    base, tuned = load_dir(base_dir), load_dir(tuned_dir)
    return {
        n: tuned[n].double() - base[n].double()
        for n in base
        if base[n].is_floating_point() and not torch.equal(base[n], tuned[n])
    }


def numpy_best(delta: torch.Tensor, rank: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(delta.numpy().astype(np.float64), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def numpy_energy_rank(delta: torch.Tensor, energy: float) -> int:
    s = np.linalg.svd(delta.numpy().astype(np.float64), compute_uv=False)
    shares = np.cumsum(s**2) / np.sum(s**2)
    return int(np.argmax(shares >= energy)) + 1


@pytest.fixture
def llama_rank3(tmp_path):
    base = tiny_model("llama", 0)
    return (
        save(base, tmp_path / "base", sharded=True),
        save(low_rank_fine_tune(base, 1, 3), tmp_path / "tuned", sharded=False),
    )


def test_an_exactly_low_rank_delta_is_recovered_exactly(llama_rank3):
    base_dir, tuned_dir = llama_rank3
    patch = extract_patch(base_dir, tuned_dir, "lora", rank=3, device="cpu")
    found = stored_deltas(base_dir, tuned_dir)
    assert sorted(f"{m}.weight" for m in patch.meta.targets) == sorted(found)  # embeddings and lm_head included
    assert patch.meta.settings["left_out"] == {}
    for name, delta in found.items():
        module = name.removesuffix(".weight")
        assert patch.shapes[f"{module}.lora_A"] == (3, delta.shape[1])
        assert patch.shapes[f"{module}.lora_B"] == (delta.shape[0], 3)
        torch.testing.assert_close(lora_product(patch, module), delta, rtol=0, atol=1e-5)
        assert patch.meta.settings["captured_energy"][module] == pytest.approx(1.0, abs=1e-6)
        assert patch.meta.settings["svd"][module] == "full"


def test_a_lower_rank_is_the_best_approximation_numpy_finds(tmp_path):
    base = tiny_model("bert", 0)
    base_dir = save(base, tmp_path / "base", sharded=False)
    tuned_dir = save(low_rank_fine_tune(base, 2, 6), tmp_path / "tuned", sharded=False)
    patch = extract_patch(base_dir, tuned_dir, "lora", rank=2, device="cpu")
    for name, delta in stored_deltas(base_dir, tuned_dir).items():
        module = name.removesuffix(".weight")
        assert patch.meta.settings["rank"][module] == 2
        torch.testing.assert_close(
            lora_product(patch, module), torch.from_numpy(numpy_best(delta, 2)), rtol=0, atol=1e-5
        )
        s = np.linalg.svd(delta.numpy(), compute_uv=False)
        assert patch.meta.settings["captured_energy"][module] == pytest.approx(
            np.sum(s[:2] ** 2) / np.sum(s**2), rel=1e-5
        )
        error = np.linalg.norm(delta.numpy() - numpy_best(delta, 2)) / np.linalg.norm(delta.numpy())
        assert patch.meta.settings["relative_error"][module] == pytest.approx(error, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("energy,cap", [(0.6, None), (0.9, None), (0.9, 3)])
def test_energy_mode_picks_the_rank_numpy_picks(tmp_path, energy, cap):
    base = tiny_model("gpt2", 0)
    base_dir = save(base, tmp_path / "base", sharded=False)
    tuned_dir = save(low_rank_fine_tune(base, 3, 8), tmp_path / "tuned", sharded=False)
    patch = extract_patch(base_dir, tuned_dir, "lora", energy=energy, rank=cap, device="cpu")
    ranks = patch.meta.settings["rank"]
    for name, delta in stored_deltas(base_dir, tuned_dir).items():
        module = name.removesuffix(".weight")
        expected = numpy_energy_rank(delta, energy)
        assert ranks[module] == (expected if cap is None else min(expected, cap)), module
        torch.testing.assert_close(
            lora_product(patch, module), torch.from_numpy(numpy_best(delta, ranks[module])), rtol=0, atol=1e-5
        )
        if cap is None:
            assert patch.meta.settings["captured_energy"][module] >= energy
    assert patch.meta.settings["requested"] == {"rank": cap, "energy": energy}


def test_rslora_scaling_is_exact(llama_rank3):
    base_dir, tuned_dir = llama_rank3
    plain = extract_patch(base_dir, tuned_dir, "lora", rank=3, device="cpu")
    rs = extract_patch(base_dir, tuned_dir, "lora", rank=3, rslora=True, device="cpu")
    assert rs.meta.settings["rslora"] is True and plain.meta.settings["rslora"] is False
    for module in rs.meta.targets:
        assert rs.meta.settings["alpha"][module] == 3 == plain.meta.settings["alpha"][module]
        product = rs.tensors[f"{module}.lora_B"].double() @ rs.tensors[f"{module}.lora_A"].double()
        # alpha / sqrt(r) = sqrt(3): the factors carry the delta divided by exactly that
        torch.testing.assert_close(product * math.sqrt(3), lora_product(plain, module), rtol=0, atol=1e-6)
    out = base_dir.parent / "rs-out"
    apply_patches([rs], base_dir, out, device="cpu")
    tuned = load_dir(tuned_dir)
    for name, value in load_dir(out).items():
        torch.testing.assert_close(value, tuned[name], rtol=0, atol=1e-5)


def low_rank_plus_noise(rows: int, cols: int, rank: int, noise: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, rank, generator=generator) @ torch.randn(
        rank, cols, generator=generator
    ) + noise * torch.randn(rows, cols, generator=generator)


def test_randomized_svd_agrees_with_the_exact_one():
    delta = low_rank_plus_noise(1100, 1200, 8, 1e-3, 0)
    exact_u, exact_s, exact_vh = torch.linalg.svd(delta.double(), full_matrices=False)
    u, s, vh, method = truncated_svd(delta, rank=8, energy=None)
    assert method == "randomized" and s.shape == (8,)
    best = (exact_u[:, :8] * exact_s[:8]) @ exact_vh[:8]
    approx = (u.double() * s.double()) @ vh.double()
    assert float((approx - best).norm() / best.norm()) < 1e-5
    torch.testing.assert_close(s.double(), exact_s[:8], rtol=1e-5, atol=0)

    total = float(delta.double().square().sum())
    energy = float(exact_s[:8].square().sum()) / total - 1e-7  # reached at rank 8, not before
    u, s, vh, method = truncated_svd(delta, rank=None, energy=energy)
    assert method == "randomized" and s.shape == (8,)
    # the captured share is exact for the factors returned: the residual's norm says the same
    approx = (u.double() * s.double()) @ vh.double()
    captured = float(s.double().square().sum()) / total
    residual = float((delta.double() - approx).square().sum()) / total
    assert captured + residual == pytest.approx(1.0, abs=1e-5)


def test_bad_requests_are_refused_in_one_line(llama_rank3, tmp_path):
    base_dir, tuned_dir = llama_rank3
    for kwargs, message in [
        ({}, "needs `rank=R`, `energy=E`"),
        ({"rank": 0}, "at least 1"),
        ({"energy": 1.5}, r"\(0, 1\]"),
    ]:
        with pytest.raises(PatchError, match=message) as caught:
            extract_patch(base_dir, tuned_dir, "lora", device="cpu", **kwargs)
        assert len(str(caught.value).splitlines()) == 1
    with pytest.raises(PatchError, match="identical"):
        extract_patch(base_dir, base_dir, "lora", rank=2, device="cpu")


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "vit"])
def test_lora_patch_applied_streamed_and_live_equals_the_fine_tune(arch, tmp_path):
    base = tiny_model(arch, 0)
    base_dir = save(base, tmp_path / "base", sharded=False)
    tuned_model = low_rank_fine_tune(base, 4, 2)
    tuned_dir = save(tuned_model, tmp_path / "tuned", sharded=False)
    patch = extract_patch(base_dir, tuned_dir, "lora", rank=2, device="cpu")
    patch.save(tmp_path / "lora")

    apply_patches([tmp_path / "lora"], base_dir, tmp_path / "out", device="cpu")
    out, tuned, stored_base = load_dir(tmp_path / "out"), load_dir(tuned_dir), load_dir(base_dir)
    assert out.keys() == tuned.keys()
    for name in tuned:
        torch.testing.assert_close(out[name], tuned[name], rtol=0, atol=1e-5, msg=name)
    assert sum(not torch.equal(out[n], stored_base[n]) for n in out) == len(patch.meta.targets)
    cls = model_class(arch)
    reloaded, info = cls.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    live, reference = cls.from_pretrained(base_dir).eval(), cls.from_pretrained(tuned_dir).eval()
    original = {n: t.clone() for n, t in live.state_dict().items()}
    handle = apply_patch(live, tmp_path / "lora")
    for (name, ours), theirs in zip(live.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(
            live(**example_inputs(arch)).logits, reference(**example_inputs(arch)).logits, rtol=1e-4, atol=1e-4
        )
    handle.remove()
    assert all(torch.equal(original[n], t) for n, t in live.state_dict().items())


def test_layernorm_and_lora_patches_compose(tmp_path, monkeypatch, capsys):
    base = tiny_model("llama", 0)
    base_dir = save(base, tmp_path / "base", sharded=False)
    tuned_dir = save(low_rank_fine_tune(base, 5, 2, norms=True), tmp_path / "tuned", sharded=False)
    norms = extract_patch(base_dir, tuned_dir, "layernorm")
    lora = extract_patch(base_dir, tuned_dir, "lora", rank=2, device="cpu")
    assert sorted(lora.meta.settings["left_out"]) == sorted(norms.tensors)  # norms are left out, and said so
    assert set(lora.meta.settings["left_out"].values()) == {"1-D"}
    apply_patches([norms, lora], base_dir, tmp_path / "out", device="cpu")
    out, tuned = load_dir(tmp_path / "out"), load_dir(tuned_dir)
    for name in tuned:
        if name in norms.tensors:
            assert torch.equal(out[name], tuned[name])
        else:
            torch.testing.assert_close(out[name], tuned[name], rtol=0, atol=1e-5, msg=name)

    code, out_text, err = run_cli(
        [
            "patch",
            "extract",
            "--base",
            base_dir,
            "--tuned",
            tuned_dir,
            "--kind",
            "lora",
            "--rank",
            "2",
            "--device",
            "cpu",
            "--out",
            tmp_path / "cli-lora",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    assert "lora patch" in out_text
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and f"{len(norms.tensors)} changed tensors" in warning[0]
    assert "delta or layernorm patch" in warning[0]
    assert Patch.load(tmp_path / "cli-lora").meta.settings["rank"] == lora.meta.settings["rank"]
    code, _, err = run_cli(
        ["patch", "extract", "--base", base_dir, "--tuned", tuned_dir, "--kind", "lora", "--out", tmp_path / "none"],
        monkeypatch,
        capsys,
    )
    assert code == 2 and "--rank R, --energy E" in err and not (tmp_path / "none").exists()


def test_lora_patch_with_inconsistent_settings_is_refused(llama_rank3, tmp_path):
    base_dir, tuned_dir = llama_rank3
    patch = extract_patch(base_dir, tuned_dir, "lora", rank=3, device="cpu")
    module = patch.meta.targets[0]
    bad = patch.meta.model_copy(deep=True)
    bad.settings["rank"][module] = 4
    with pytest.raises(PatchError, match="records rank 4"):
        apply_patches([Patch(patch.tensors, bad)], base_dir, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()
