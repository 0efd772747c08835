"""LayerNormBank: per-task norms gathered per sample, routing by keys on real features, LayerNorm patches in and out."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import splice
from splice.adapters.extract import extract_patch
from splice.adapters.live import apply_patch
from splice.arch.names import stored_to_module_names
from splice.arch.pooling import pool
from splice.continual.bank import LayerNormBank
from splice.errors import SpliceError

from conftest import ARCHITECTURES, example_inputs, model_class, perturbed, save, tiny_model


def perturb_slots(bank: LayerNormBank, seed: int, scale: float = 0.5) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for task in range(bank.num_tasks):
            for parameter in bank.task_parameters(task):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def with_norms(arch: str, values: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An unwrapped model whose norms hold `values` (stored names), set through its own state dict."""
    model = tiny_model(arch, 0).eval()
    names = stored_to_module_names(model)
    state = model.state_dict()
    state.update({names[name]: value for name, value in values.items()})
    model.load_state_dict(state)
    return model


def batch(arch: str, size: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    if arch == "vit":
        return {"pixel_values": torch.rand(size, 1, 8, 8, generator=generator)}
    return {"input_ids": torch.randint(0, 64, (size, 7), generator=generator)}


def task_inputs(arch: str, task: int, size: int, seed: int) -> dict[str, torch.Tensor]:
    """Inputs of 3 clearly different tasks: images of different means, token ids from disjoint vocabulary ranges."""
    generator = torch.Generator().manual_seed(seed)
    if arch == "vit":
        return {"pixel_values": torch.randn(size, 1, 8, 8, generator=generator) * 0.3 + (-4.0, 0.0, 4.0)[task]}
    return {"input_ids": torch.randint(21 * task, 21 * task + 21, (size, 16), generator=generator)}


def related_vocabulary(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Each of the 3 vocabulary ranges given a shared direction in the input embeddings, as related tokens share
    one in a pretrained model (a randomly initialised model's tokens are unrelated, so no feature tells its
    vocabulary ranges apart)."""
    generator = torch.Generator().manual_seed(seed)
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        for task in range(3):
            weight[21 * task : 21 * task + 21] += torch.randn(weight.shape[1], generator=generator) * 0.1
    return model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_slot_of_pretrained_values_is_the_unwrapped_model(arch):
    reference, model = tiny_model(arch, 0).eval(), tiny_model(arch, 0).eval()
    names = sorted(model.state_dict())
    bank = LayerNormBank(model)
    assert sorted(model.state_dict()) == names  # the model's own tensors keep their names
    bank.add_task()
    inputs = batch(arch, 4, 1)
    with torch.no_grad():
        expected = reference(**inputs).logits
        assert torch.allclose(bank(task_ids=torch.zeros(4, dtype=torch.long), **inputs).logits, expected, atol=1e-6)
        assert torch.equal(model(**inputs).logits, expected)  # no ids: the pretrained norms themselves


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_mixed_batch_equals_each_input_alone_with_its_tasks_norms(arch):
    bank = LayerNormBank(tiny_model(arch, 0).eval())
    for _ in range(3):
        bank.add_task()
    perturb_slots(bank, seed=7)
    inputs, ids = batch(arch, 6, 2), torch.tensor([2, 0, 1, 1, 2, 0])
    with torch.no_grad():
        mixed = bank(task_ids=ids, **inputs).logits
        models = [with_norms(arch, bank.slot_state(task)) for task in range(3)]
        for i, task in enumerate(ids.tolist()):
            alone = {name: value[i : i + 1] for name, value in inputs.items()}
            assert torch.allclose(mixed[i], models[task](**alone).logits[0], atol=1e-5)
            assert torch.allclose(mixed[i], bank(task_ids=ids[i : i + 1], **alone).logits[0], atol=1e-5)
        distinct = [bank(task_ids=torch.full((6,), task), **inputs).logits for task in range(3)]
    assert not torch.allclose(distinct[0], distinct[1], atol=1e-3)  # the slots do differ


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_keys_on_real_features_select_the_true_task(arch):
    model = tiny_model(arch, 0).eval()
    bank = LayerNormBank(model if arch == "vit" else related_vocabulary(model, seed=0))
    for task in range(3):
        bank.add_task(key=LayerNormBank.closed_form_key(bank.features(**task_inputs(arch, task, 16, seed=task))))
    assert bank.has_key.all() and torch.allclose(bank.keys.norm(dim=1), torch.ones(3))
    for task in range(3):
        test = task_inputs(arch, task, 16, seed=100 + task)
        assert bank.route(**test).tolist() == [task] * 16
    mixed = {
        name: torch.cat([task_inputs(arch, t, 4, seed=200 + t)[name] for t in range(3)])
        for name in task_inputs(arch, 0, 1, 0)
    }
    truth = torch.arange(3).repeat_interleave(4)
    assert torch.equal(bank.route(**mixed), truth)
    perturb_slots(bank, seed=3)
    with torch.no_grad():  # routed forward == oracle forward when the routing is right
        assert torch.allclose(bank(**mixed).logits, bank(task_ids=truth, **mixed).logits, atol=1e-6)


def test_select_only_over_tasks_with_keys():
    bank = LayerNormBank(tiny_model("bert", 0))
    with pytest.raises(SpliceError, match="no task has a key"):
        bank.select(torch.randn(2, 16))
    keys = torch.eye(16)[:3]
    bank.add_task(keys[0])
    bank.add_task()  # no key: never selected
    bank.add_task(keys[2])
    features = torch.stack([keys[0], keys[1] + 0.1 * keys[2], keys[2] * 3 + keys[0]])
    assert bank.select(features).tolist() == [0, 2, 2]
    bank.set_key(1, keys[1] * 5)
    assert bank.select(features).tolist() == [0, 1, 2]


def test_closed_form_key_is_the_maximiser_of_mean_cosine():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(40, 16, generator=generator) * torch.rand(40, 1, generator=generator) * 5 + 1.0
    key = LayerNormBank.closed_form_key(features)

    def objective(k: torch.Tensor) -> torch.Tensor:
        return F.cosine_similarity(features, k.expand_as(features), dim=1).mean()

    assert torch.isclose(key.norm(), torch.tensor(1.0))
    trained = torch.randn(16, generator=generator).requires_grad_(True)
    optimizer = torch.optim.Adam([trained], lr=0.05)
    for _ in range(300):  # gradient ascent on mean cos, as the reference code trains its keys
        optimizer.zero_grad()
        (-objective(trained)).backward()
        optimizer.step()
    best = objective(key)
    assert best >= objective(trained.detach()) - 1e-6
    assert best - objective(trained.detach()) < 1e-3  # ascent converges to the same optimum
    assert torch.allclose(F.normalize(trained.detach(), dim=0), key, atol=1e-2)
    for _ in range(20):
        assert best >= objective(torch.randn(16, generator=generator))


@pytest.mark.parametrize("arch", ["vit", "bert", "llama"])
def test_a_one_task_bank_equals_the_model_with_its_layernorm_patch(arch, tmp_path):
    base = tiny_model(arch, 0)
    base_dir = save(base, tmp_path / "base", sharded=False)
    tuned = perturbed(base, 1, scale=0.2)
    if hasattr(tuned, "classifier"):  # a changed head would be in the LayerNorm patch too; a slot holds norms
        tuned.classifier.load_state_dict(base.classifier.state_dict())
    tuned_dir = save(tuned, tmp_path / "tuned", sharded=False)
    patch = extract_patch(base_dir, tuned_dir, "layernorm")
    patched = model_class(arch).from_pretrained(base_dir).eval()
    apply_patch(patched, patch)
    bank = LayerNormBank(model_class(arch).from_pretrained(base_dir).eval())
    bank.load_slot(bank.add_task(), patch.tensors)
    state = bank.slot_state(0)
    assert sorted(state) == sorted(patch.tensors)
    assert all(torch.equal(state[name], patch.tensors[name]) for name in state)
    inputs = batch(arch, 3, 4)
    with torch.no_grad():
        expected = patched(**inputs).logits
        assert torch.allclose(bank(task_ids=torch.zeros(3, dtype=torch.long), **inputs).logits, expected, atol=1e-6)
        assert not torch.allclose(bank.model(**inputs).logits, expected, atol=1e-3)  # pretrained norms untouched


def test_slot_state_round_trip_with_stored_names():
    bank = LayerNormBank(tiny_model("vit", 0).eval())
    for _ in range(3):
        bank.add_task()
    perturb_slots(bank, seed=5)
    state = bank.slot_state(1)
    # transformers 5 loads ViT's norms as `vit.layers.0...`; the stored (patch) names are the old ones
    assert "vit.encoder.layer.0.layernorm_before.weight" in state and "vit.layernorm.bias" in state
    assert len(state) == 2 * 5
    bank.load_slot(2, state)
    inputs = batch("vit", 3, 6)
    with torch.no_grad():
        ones, twos = (bank(task_ids=torch.full((3,), t), **inputs).logits for t in (1, 2))
        zeros = bank(task_ids=torch.zeros(3, dtype=torch.long), **inputs).logits
    assert torch.equal(ones, twos)
    assert not torch.allclose(ones, zeros, atol=1e-3)
    with pytest.raises(SpliceError, match="not a norm of this model"):
        bank.load_slot(0, {"vit.embeddings.cls_token": torch.zeros(1, 1, 16)})
    with pytest.raises(SpliceError, match="shape"):
        bank.load_slot(0, {"vit.layernorm.bias": torch.zeros(3)})


def test_add_task_initialises_from_the_last_slot_or_the_one_named():
    model = tiny_model("llama", 0)
    pretrained = {name: value.clone() for name, value in model.state_dict().items() if "norm" in name}
    bank = LayerNormBank(model)
    bank.add_task()
    names = stored_to_module_names(model)
    assert all(torch.equal(value, pretrained[names[name]]) for name, value in bank.slot_state(0).items())
    perturb_slots(bank, seed=1)
    assert bank.add_task() == 1
    assert all(torch.equal(bank.slot_state(1)[n], v) for n, v in bank.slot_state(0).items())
    perturb_slots(bank, seed=2)
    assert bank.add_task(init_from=0) == 2
    assert all(torch.equal(bank.slot_state(2)[n], v) for n, v in bank.slot_state(0).items())
    assert not all(torch.equal(bank.slot_state(1)[n], v) for n, v in bank.slot_state(0).items())
    assert all(torch.equal(value, pretrained[name]) for name, value in model.state_dict().items() if "norm" in name)


def test_training_one_slot_changes_only_that_slot():
    model = tiny_model("bert", 0)
    bank = LayerNormBank(model).freeze_backbone()
    for _ in range(3):
        bank.add_task()
    perturb_slots(bank, seed=9, scale=0.1)
    before = {name: value.clone() for name, value in bank.state_dict().items()}
    trainable = [parameter for parameter in bank.parameters() if parameter.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for t in range(3) for p in bank.task_parameters(t)}
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    inputs = batch("bert", 4, 8)
    for _ in range(3):
        optimizer.zero_grad()
        bank(task_ids=torch.ones(4, dtype=torch.long), labels=torch.tensor([0, 1, 2, 0]), **inputs).loss.backward()
        optimizer.step()
    after = bank.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    slot_one = {name for name in before if name.startswith("slots.") and name.endswith(".1")}
    assert changed == slot_one  # the other slots, the pretrained norms and the rest of the model: exact


def test_mean_pooling_ignores_padding():
    bank = LayerNormBank(tiny_model("gpt2", 0))
    ids = torch.randint(1, 64, (1, 5), generator=torch.Generator().manual_seed(0))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 5 + [0] * 3])
    alone = bank.features(input_ids=ids)
    assert torch.allclose(bank.features(input_ids=padded, attention_mask=mask), alone, atol=1e-6)
    hidden = torch.randn(2, 4, 3)
    assert torch.equal(pool("bert", hidden), hidden[:, 0])
    assert torch.allclose(pool("llama", hidden, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))[0], hidden[0, :2].mean(0))
    with pytest.raises(SpliceError, match="no feature pooling"):
        pool("unknown-arch", hidden)


def test_features_use_the_pretrained_norms_in_eval_mode():
    model = tiny_model("bert", 0)
    bank = LayerNormBank(model)
    bank.add_task()
    perturb_slots(bank, seed=4)
    model.train()
    inputs = batch("bert", 3, 3)
    reference = tiny_model("bert", 0).eval()
    with torch.no_grad():
        expected = reference.base_model(**inputs).last_hidden_state[:, 0]
    assert torch.allclose(bank.features(**inputs), expected, atol=1e-6)
    assert model.training and all(module.training for module in model.modules())


def test_bad_uses_are_one_line_errors():
    model = tiny_model("vit", 0)
    bank = LayerNormBank(model)
    assert splice.LayerNormBank is LayerNormBank
    with pytest.raises(SpliceError, match="already banked"):
        LayerNormBank(model)
    with pytest.raises(SpliceError, match="no task slot 0"):
        bank.task_parameters(0)
    bank.add_task()
    inputs = example_inputs("vit")
    with pytest.raises(SpliceError, match="task ids must lie in"):
        bank(task_ids=torch.tensor([0, 1]), **inputs)
    with pytest.raises(SpliceError, match="one task id per input"):
        bank(task_ids=torch.tensor([0, 0, 0]), **inputs)
    with pytest.raises(SpliceError, match="a key of 3 values"):
        bank.set_key(0, torch.ones(3))
    with pytest.raises(SpliceError, match="nonzero"):
        bank.set_key(0, torch.zeros(16))


def test_a_norm_computing_otherwise_is_refused():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm  # scales by (1 + weight)

    model = tiny_model("llama", 0)
    model.model.norm = GemmaRMSNorm(16)
    with pytest.raises(SpliceError, match=r"model\.norm \(GemmaRMSNorm\) does not compute as"):
        LayerNormBank(model)
    assert not any(type(module).__name__ == "BankedNorm" for module in model.modules())  # nothing half-wrapped
