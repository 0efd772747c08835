"""Collected statistics against independent computations: Grams from hooks written here (inputs captured, padding
rows dropped by the mask, X^T X in fp64), Fisher diagonals from a plain loop of loss.backward() per example."""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from splice.arch.names import stored_to_module_names
from splice.merge.stats.collect import collect_fisher, collect_grams, live_model

from conftest import save, tiny_model


def _batch(arch: str, padded: bool) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    if arch == "vit":
        return {"pixel_values": torch.rand(3, 1, 8, 8, generator=generator)}
    ids = torch.randint(0, 64, (3, 9), generator=generator)
    mask = torch.ones(3, 9, dtype=torch.long)
    if padded:  # sample 0 runs the full length, so no column is padding everywhere and nothing is trimmed
        mask[1, 5:] = 0
        mask[2, 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _independent_grams(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, int]]:
    """{live weight name: (X^T X, rows of X)}, X the non-padding rows entering each Linear / Conv1D (one forward)."""
    captured: dict[str, list[torch.Tensor]] = {}
    handles = []
    for path, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)):

            def hook(_module, args, path=path):
                captured.setdefault(f"{path}.weight", []).append(args[0].detach())

            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(**batch)
    for handle in handles:
        handle.remove()
    mask = batch.get("attention_mask")
    grams = {}
    for name, (x,) in captured.items():
        if x.dim() == 3 and mask is not None:
            rows = x[mask.bool()]
        else:
            rows = x.reshape(-1, x.shape[-1])
        rows = rows.to(torch.float64)
        grams[name] = (rows.T @ rows, len(rows))
    return grams


@pytest.mark.parametrize(("arch", "padded"), [("vit", False), ("bert", True), ("gpt2", True), ("llama", True)])
def test_grams_equal_an_independent_computation(arch, padded):
    model = tiny_model(arch, 0).eval()
    batch = _batch(arch, padded)
    collected = collect_grams(model, batch)
    expected = _independent_grams(model, batch)
    live = stored_to_module_names(model)
    owned = {name for name, _ in model.named_parameters()}
    # every layer that owns its weight has a Gram (GPT-2's lm_head is the tied embedding: not a layer of its own)
    assert {live[stored] for stored in collected.keys} == {name for name in expected if name in owned}
    for stored, key in collected.keys.items():
        want, rows = expected[live[stored]]
        got = collected.grams[key]
        assert got.dtype == torch.float64
        assert torch.allclose(got, want, rtol=0, atol=1e-8 * float(want.norm())), stored
        assert collected.tokens[key] == rows, stored
    first = next(iter(collected.keys.values()))  # a layer inside the first block: one row per real token
    assert collected.tokens[first] == (int(batch["attention_mask"].sum()) if padded else 3 * 5)
    assert collected.samples == 3


def test_layers_fed_one_input_share_one_gram():
    model = tiny_model("llama", 0).eval()
    keys = collect_grams(model, _batch("llama", True)).keys
    layer = "model.layers.0"
    assert keys[f"{layer}.self_attn.k_proj.weight"] == keys[f"{layer}.self_attn.v_proj.weight"]
    assert keys[f"{layer}.self_attn.k_proj.weight"] == keys[f"{layer}.self_attn.q_proj.weight"]
    assert keys[f"{layer}.mlp.up_proj.weight"] == keys[f"{layer}.mlp.gate_proj.weight"]
    assert keys[f"{layer}.self_attn.o_proj.weight"] == f"{layer}.self_attn.o_proj.weight"
    assert keys[f"{layer}.mlp.down_proj.weight"] == f"{layer}.mlp.down_proj.weight"
    assert len(set(keys.values())) == 2 * 4 + 1  # per layer q/k/v, o, gate/up, down; and lm_head
    bert = collect_grams(tiny_model("bert", 0).eval(), _batch("bert", True)).keys
    prefix = "bert.encoder.layer.0.attention.self"
    assert bert[f"{prefix}.query.weight"] == bert[f"{prefix}.key.weight"] == bert[f"{prefix}.value.weight"]


def test_grams_of_a_stored_model_use_stored_names(tmp_path):
    model = tiny_model("vit", 0).eval()
    batch = _batch("vit", False)
    live = live_model(str(save(model, tmp_path / "vit", sharded=True)), torch.device("cpu"))
    collected = collect_grams(live, batch)
    assert "vit.encoder.layer.0.attention.attention.query.weight" in collected.keys  # the name in the file
    in_memory = collect_grams(model, batch)
    assert collected.keys == in_memory.keys
    for key, gram in in_memory.grams.items():
        assert torch.equal(collected.grams[key], gram)


def _loop_fisher(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sums = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    count = len(batch["input_ids"])
    for n in range(count):
        model.zero_grad()
        model(**{key: value[n : n + 1] for key, value in batch.items()}).loss.backward()
        for name, p in model.named_parameters():
            sums[name] += p.grad**2
    return {name: total / count for name, total in sums.items()}


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_fisher_equals_per_example_gradients_squared(arch):
    model = tiny_model(arch, 0).eval()
    batch = _batch(arch, padded=True)
    if arch == "bert":
        batch["labels"] = torch.tensor([0, 2, 1])
    else:
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    fisher = collect_fisher(model, batch, labels="batch")
    expected = _loop_fisher(model, batch)
    assert set(fisher.diagonals) == set(expected)  # GPT-2's tied head: once, as transformer.wte.weight
    assert fisher.samples == 3
    for name, want in expected.items():
        assert torch.allclose(fisher.diagonals[name], want, rtol=0, atol=1e-6), name
    # a batch-summed gradient squared is not the same thing
    model.zero_grad()
    model(**batch).loss.backward()
    squared_sum = (
        model.bert.pooler.dense.weight.grad if arch == "bert" else model.transformer.h[0].attn.c_attn.weight.grad
    )
    name = "bert.pooler.dense.weight" if arch == "bert" else "transformer.h.0.attn.c_attn.weight"
    assert not torch.allclose(squared_sum**2, fisher.diagonals[name], rtol=0.1)


def test_fisher_with_a_given_loss_and_sampled_labels():
    model = tiny_model("bert", 0).eval()
    batch = _batch("bert", padded=True)
    batch["labels"] = torch.tensor([0, 2, 1])

    def loss(outputs, labels):
        return torch.nn.functional.cross_entropy(outputs.logits, labels)

    given = collect_fisher(model, batch, loss=loss, labels="batch")
    expected = _loop_fisher(model, batch)  # the model's own loss is this cross-entropy
    assert all(torch.allclose(given.diagonals[name], want, rtol=0, atol=1e-6) for name, want in expected.items())

    first = collect_fisher(model, batch, seed=3)
    again = collect_fisher(model, batch, seed=3)
    other = collect_fisher(tiny_model("bert", 0).eval(), batch, seed=4)
    assert first.labels == "sample"
    assert all(torch.equal(first.diagonals[name], again.diagonals[name]) for name in first.diagonals)
    assert any(not torch.equal(first.diagonals[name], other.diagonals[name]) for name in first.diagonals)
    assert all(p.grad is None for p in model.parameters())  # the model is left as it was
