"""Extract LayerNorm and delta patches from a fine-tune and apply them back onto the base, streamed."""

from __future__ import annotations

import pytest
import torch

from splice.adapters.apply import apply_patches
from splice.adapters.extract import extract_patch
from splice.adapters.patch import Patch, PatchError

from conftest import model_class, perturbed, save, tiny_model
from helpers import load_dir


@pytest.fixture
def pair(tmp_path):
    base = tiny_model("llama", 0)
    return save(base, tmp_path / "base", sharded=True), save(perturbed(base, 3), tmp_path / "tuned", sharded=False)


def test_layernorm_patch_carries_exactly_the_tuned_norms(pair, tmp_path):
    base_dir, tuned_dir = pair
    patch = extract_patch(base_dir, tuned_dir, "layernorm")
    tuned, base = load_dir(tuned_dir), load_dir(base_dir)
    norms = sorted(n for n in tuned if "norm" in n)
    assert sorted(patch.tensors) == norms  # input/post-attention layernorms of both layers and the final norm
    patch.save(tmp_path / "ln")
    apply_patches([tmp_path / "ln"], base_dir, tmp_path / "out", device="cpu")
    out = load_dir(tmp_path / "out")
    for name in base:
        assert torch.equal(out[name], tuned[name] if name in norms else base[name]), name


def test_delta_patch_reproduces_the_fine_tune(pair, tmp_path):
    base_dir, tuned_dir = pair
    patch = extract_patch(base_dir, tuned_dir, "delta")
    apply_patches([patch], base_dir, tmp_path / "out", device="cpu")
    out, tuned = load_dir(tmp_path / "out"), load_dir(tuned_dir)
    for name in tuned:
        torch.testing.assert_close(out[name], tuned[name], rtol=0, atol=1e-6)
    reloaded, info = model_class("llama").from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_deltas_add_and_a_layernorm_replacement_on_a_delta_is_refused(pair, tmp_path):
    base_dir, tuned_dir = pair
    delta = extract_patch(base_dir, tuned_dir, "delta")
    half = Patch({n: t / 2 for n, t in delta.tensors.items()}, delta.meta)
    apply_patches([half, half], base_dir, tmp_path / "twice", device="cpu")
    out, tuned = load_dir(tmp_path / "twice"), load_dir(tuned_dir)
    for name in tuned:
        torch.testing.assert_close(out[name], tuned[name], rtol=0, atol=1e-6)
    layernorm = extract_patch(base_dir, tuned_dir, "layernorm")
    with pytest.raises(PatchError, match="does not compose"):
        apply_patches([delta, layernorm], base_dir, tmp_path / "both", device="cpu")
    assert not (tmp_path / "both").exists()


def test_wrong_base_is_refused_before_anything_is_written(pair, tmp_path):
    base_dir, tuned_dir = pair
    patch = extract_patch(base_dir, tuned_dir, "layernorm")
    # a fresh Llama's RMSNorm weights are all ones, like the base's: only a trained one differs there
    other = save(perturbed(tiny_model("llama", 9), 5), tmp_path / "other", sharded=False)
    with pytest.raises(PatchError, match="not the base"):
        apply_patches([patch], other, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()
    apply_patches([patch], other, tmp_path / "out", device="cpu", allow_base_drift=True)
    assert torch.equal(load_dir(tmp_path / "out")["model.norm.weight"], load_dir(tuned_dir)["model.norm.weight"])


def test_cli_extract_then_apply_and_a_refused_base(pair, tmp_path, monkeypatch, capsys):
    from helpers import run_cli

    base_dir, tuned_dir = pair
    code, out, err = run_cli(["patch", "extract", "--base", base_dir, "--tuned", tuned_dir, "--kind", "layernorm",
                              "--out", tmp_path / "ln"], monkeypatch, capsys)
    assert code == 0, err
    assert "layernorm patch" in out
    code, _, err = run_cli(["patch", "apply", tmp_path / "ln", "--base", base_dir, "--out", tmp_path / "out",
                            "--device", "cpu", "--quiet"], monkeypatch, capsys)
    assert code == 0, err
    assert torch.equal(load_dir(tmp_path / "out")["model.norm.weight"], load_dir(tuned_dir)["model.norm.weight"])

    code, _, err = run_cli(["patch", "apply", tmp_path / "ln", "--base", tuned_dir, "--out", tmp_path / "wrong",
                            "--device", "cpu"], monkeypatch, capsys)
    assert code == 2 and err.startswith("error:") and "not the base" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "wrong").exists()
    code, _, err = run_cli(["patch", "extract", "--base", base_dir, "--tuned", tuned_dir, "--kind", "nonsense",
                            "--out", tmp_path / "x"], monkeypatch, capsys)
    assert code == 2 and "unknown patch kind 'nonsense'" in err


def test_untouched_tensors_are_copied_in_the_kernel_locally_and_through_memory_remotely(pair, tmp_path,
                                                                                        monkeypatch):
    import os

    import fsspec

    from splice.tensors.checkpoint import Checkpoint

    base_dir, tuned_dir = pair
    patch = extract_patch(base_dir, tuned_dir, "layernorm")
    untouched = [name for name in Checkpoint.open(base_dir).tensors if name not in patch.tensors]
    copies = []
    real_copy = os.copy_file_range

    def counting_copy(*args):
        copies.append(args[2])
        return real_copy(*args)

    monkeypatch.setattr(os, "copy_file_range", counting_copy)
    apply_patches([patch], base_dir, tmp_path / "local", device="cpu")
    assert sum(copies) == sum(Checkpoint.open(base_dir).tensors[name].nbytes for name in untouched)

    remote = fsspec.filesystem("memory")
    for path in base_dir.iterdir():
        remote.pipe(f"/deploy-base/{path.name}", path.read_bytes())
    copies.clear()
    apply_patches([patch], "memory://deploy-base", tmp_path / "remote", device="cpu")
    assert copies == []
    local, through_memory, base = load_dir(tmp_path / "local"), load_dir(tmp_path / "remote"), load_dir(base_dir)
    for name in base:
        expected = patch.tensors[name] if name in patch.tensors else base[name]
        assert torch.equal(local[name], expected) and torch.equal(through_memory[name], expected), name
