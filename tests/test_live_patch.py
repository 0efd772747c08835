"""apply_patch on a loaded model: the same result as the fine-tune, and remove() restores the base exactly."""

from __future__ import annotations

import pytest
import torch

from splice.adapters.extract import extract_patch
from splice.adapters.live import apply_patch
from splice.adapters.patch import PatchError

from conftest import example_inputs, model_class, perturbed, save, tiny_model


def same_state(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    return all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def norms_only_fine_tune(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    tuned = type(model)(model.config)
    tuned.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            if "norm" in name.lower():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return tuned


@pytest.mark.parametrize("arch", ["vit", "bert", "llama"])  # ViT: stored names differ from module names
def test_layernorm_patch_on_a_live_model_matches_the_fine_tune(arch, tmp_path):
    base = tiny_model(arch, 0)
    base_dir = save(base, tmp_path / "base", sharded=False)
    tuned_dir = save(norms_only_fine_tune(base, 1), tmp_path / "tuned", sharded=False)
    patch = extract_patch(base_dir, tuned_dir, "layernorm")
    cls = model_class(arch)
    live, tuned = cls.from_pretrained(base_dir).eval(), cls.from_pretrained(tuned_dir).eval()
    inputs = example_inputs(arch)
    with torch.no_grad():
        before = live(**inputs).logits
        with apply_patch(live, patch):
            patched = live(**inputs).logits
            assert torch.equal(patched, tuned(**inputs).logits)
        after = live(**inputs).logits
    assert not torch.equal(before, patched)
    assert torch.equal(before, after)
    assert same_state(live, cls.from_pretrained(base_dir))


def test_delta_patch_on_a_live_model_and_a_refused_base(tmp_path):
    base = tiny_model("llama", 0)
    base_dir = save(base, tmp_path / "base", sharded=False)
    tuned_dir = save(perturbed(base, 2), tmp_path / "tuned", sharded=False)
    patch = extract_patch(base_dir, tuned_dir, "delta")
    cls = model_class("llama")
    live, tuned = cls.from_pretrained(base_dir), cls.from_pretrained(tuned_dir)
    handle = apply_patch(live, patch)
    for (name, ours), theirs in zip(live.state_dict().items(), tuned.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6, msg=name)
    with pytest.raises(PatchError, match="already applied"):
        apply_patch(live, patch)
    handle.remove()
    assert same_state(live, cls.from_pretrained(base_dir))


def test_stacked_patches_are_checked_against_the_unpatched_base_and_come_off_in_reverse(tmp_path):
    base = tiny_model("bert", 0)  # fresh BERT LayerNorms are ones and zeros whatever the seed
    base_dir = save(base, tmp_path / "base", sharded=False)
    tuned_dir = save(perturbed(base, 2), tmp_path / "tuned", sharded=False)
    layernorm = extract_patch(base_dir, tuned_dir, "layernorm")
    delta = extract_patch(base_dir, tuned_dir, "delta")
    cls = model_class("bert")
    other_model = tiny_model("bert", 7)
    other_model.classifier.load_state_dict(base.classifier.state_dict())  # the patch carries the changed head too
    other = cls.from_pretrained(save(other_model, tmp_path / "other", sharded=False))
    with pytest.raises(PatchError, match=r"not the base this layernorm patch was made for: \d+ other tensors differ"):
        apply_patch(other, layernorm)  # its own tensors match; the rest of the model does not
    live = cls.from_pretrained(base_dir)
    first = apply_patch(live, layernorm)
    half = type(delta)(
        {name: tensor / 2 for name, tensor in delta.tensors.items() if name not in layernorm.tensors},
        delta.meta.model_copy(update={"description": "half"}),
    )
    second = apply_patch(live, half)  # checked against the base under the LayerNorm patch, so accepted
    with pytest.raises(PatchError, match="reverse order"):
        first.remove()
    second.remove()
    first.remove()
    assert same_state(live, cls.from_pretrained(base_dir))
