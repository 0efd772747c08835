"""What a norm is, defined once (splice.arch.norms): the LayerNorm patch extractor, reading a checkpoint's tensor
names, and LayerNormBank, wrapping a loaded model, pick the same norms on every architecture."""

from __future__ import annotations

import pytest
import torch

from splice.adapters.extract import extract_patch
from splice.arch.names import stored_to_module_names
from splice.arch.norms import find_norm_modules, is_norm_weight, loaded_norm_modules
from splice.continual.bank import RMSNORM, LayerNormBank
from splice.tensors.checkpoint import Checkpoint

from conftest import ARCHITECTURES, perturbed, save, tiny_model

NORM_ARCHITECTURES = (*ARCHITECTURES, "t5")  # T5LayerNorm: a norm by name, not a torch LayerNorm nor *RMSNorm


@pytest.mark.parametrize("arch", NORM_ARCHITECTURES)
def test_the_patch_extractor_and_the_bank_pick_the_same_norms(arch, tmp_path):
    base = tiny_model(arch, 0)
    base_dir = save(base, tmp_path / "base", sharded=False)
    tuned_dir = save(perturbed(base, 1, scale=0.2), tmp_path / "tuned", sharded=False)
    patch = extract_patch(base_dir, tuned_dir, "layernorm")
    extracted = set(patch.tensors) - set(patch.meta.settings.get("head", []))
    with Checkpoint.open(base_dir) as checkpoint:
        stored_norms = {module.name for module in find_norm_modules(checkpoint)}
    model = type(base).from_pretrained(base_dir).eval()
    module_of = stored_to_module_names(model)
    stored_of = {module.rpartition(".")[0]: stored.rpartition(".")[0] for stored, module in module_of.items()}
    loaded = {stored_of[name] for name in loaded_norm_modules(model)}
    bank = LayerNormBank(model)
    assert extracted and extracted == set(bank.tensor_names)
    assert stored_norms == loaded == {stored_of[name] for name in bank.norm_names}
    assert {name.rpartition(".")[0] for name in extracted} == stored_norms


def test_t5_norms_are_banked_as_rms_norms_and_a_pretrained_slot_is_the_model():
    model = tiny_model("t5", 0).eval()
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(2, 64, (3, 7), generator=generator),
        "decoder_input_ids": torch.randint(2, 64, (3, 5), generator=generator),
    }
    with torch.no_grad():
        expected = model(**inputs).logits
    bank = LayerNormBank(model)
    assert len(bank.norm_names) == 12
    assert {bank.model.get_submodule(name).kind for name in bank.norm_names} == {RMSNORM}
    bank.add_task()
    with torch.no_grad():
        got = bank(task_ids=torch.zeros(3, dtype=torch.long), **inputs).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "shape", "norm"),
    [
        ("bert.encoder.layer.0.output.LayerNorm.weight", (16,), True),
        ("vit.encoder.layer.1.layernorm_before.weight", (16,), True),
        ("transformer.h.0.ln_1.weight", (16,), True),
        ("model.layers.0.post_attention_layernorm.weight", (16,), True),
        ("model.norm.weight", (16,), True),
        ("encoder.final_layer_norm.weight", (16,), True),
        ("bert.embeddings.LayerNorm.gamma", (16,), True),
        ("bert.encoder.layer.0.output.LayerNorm.bias", (16,), False),  # a bias is carried with its weight
        ("model.norm.weight", (16, 16), False),
        ("bert.pooler.dense.weight", (16,), False),
        ("model.layers.0.mlp.down_proj.weight", (16, 24), False),
    ],
)
def test_what_a_norm_weight_is(name, shape, norm):
    assert is_norm_weight(name, shape, floating=True) is norm
    assert not is_norm_weight(name, shape, floating=False)
