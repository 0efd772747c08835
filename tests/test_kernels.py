"""Kernel and parameter-resolution units against mergekit's own functions."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mergekit.config import ConditionalParameter
from mergekit.config import evaluate_setting as mergekit_evaluate_setting
from mergekit.sparsify import magnitude

from splice.arch.layers import layer_positions
from splice.merge.recipe import Conditional, evaluate_setting
from splice.sparsify import top_magnitude_mask


def keep_top_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    keep = top_magnitude_mask(delta, density)
    return delta if keep is None else delta * keep


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.integers(-4, 4), min_size=1, max_size=60), density=st.floats(0.01, 0.99))
def test_top_magnitude_keeps_exactly_k_largest_even_with_ties(values, density):
    delta = torch.tensor(values, dtype=torch.float32) / 4  # small integer grid: many equal magnitudes
    kept = keep_top_magnitude(delta, density)
    k = max(1, int(density * len(values)))
    survivors = kept != 0
    chosen = delta.abs()[survivors]
    dropped = delta.abs()[~survivors]
    assert int(survivors.sum()) <= k  # fewer only where zero deltas were among the k kept
    assert int(survivors.sum()) == min(k, int((delta != 0).sum()))
    if len(chosen) and len(dropped):
        assert chosen.min() >= dropped.max()
    # mergekit keeps exactly k entries; the magnitudes kept are the same multiset
    theirs = magnitude(delta, density)
    assert torch.equal(kept.abs().sort().values, theirs.abs().sort().values)


def test_top_magnitude_on_random_tensor_equals_mergekit():
    delta = torch.randn(257, 33, generator=torch.Generator().manual_seed(0))
    for density in (0.05, 0.5, 0.93):
        assert torch.equal(keep_top_magnitude(delta, density), magnitude(delta, density))


def test_settings_resolve_like_mergekit():
    cases = [
        0.5,
        [0.1, 0.9],
        [0.0, 1.0, 0.25],
        [Conditional(filter="mlp", value=[0.2, 0.4]), Conditional(value=0.7)],
    ]

    def to_mergekit(setting):
        if isinstance(setting, list) and setting and isinstance(setting[0], Conditional):
            return [ConditionalParameter(filter=c.filter, value=c.value) for c in setting]
        return setting

    for setting in cases:
        for name in ("model.layers.3.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"):
            for t in (0.0, 0.3, 0.5, 1.0):
                ours = evaluate_setting(setting, name, t)
                theirs = mergekit_evaluate_setting(name, to_mergekit(setting), t, validate=float)
                assert abs(ours - theirs) < 1e-12, (setting, name, t)


def test_layer_positions():
    names = [f"model.layers.{i}.mlp.weight" for i in range(5)] + ["model.embed_tokens.weight", "lm_head.weight"]
    position = layer_positions(names)
    assert [position(n) for n in names] == [0.0, 0.25, 0.5, 0.75, 1.0, 0.0, 0.0]
    bert = layer_positions(["bert.encoder.layer.0.x", "bert.encoder.layer.1.x"])
    assert bert("bert.encoder.layer.1.x") == 1.0
    assert layer_positions(["transformer.h.0.attn", "transformer.h.2.attn"])("transformer.h.1.attn") == 0.5


def test_ties_at_the_threshold_keep_the_lowest_indices():
    delta = torch.tensor([0.5, -1.0, 1.0, 2.0, -1.0, 1.0])
    assert top_magnitude_mask(delta, 0.5).tolist() == [False, True, True, True, False, False]
    assert top_magnitude_mask(delta, 1.0) is None
    assert not top_magnitude_mask(delta, 0.0).any()
