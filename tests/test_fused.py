"""The compiled loops (splice.merge.fused) against the torch operations they replace: the magnitudes' bit counts
equal torch.bincount's, and the merge of every slice equals `kernels._ties_in_slices`'s torch path bit for bit, over
ties at the thresholds, edge densities, one to three deltas, weights, normalize and lambda; the draws equal torch's
(the masks and the generator's state after), and dare_ties equals its torch path bit for bit."""

from __future__ import annotations

import pytest
import torch

from splice.merge import fused, kernels
from splice.sparsify import MAGNITUDE_HALF, bernoulli_keep, sliced_magnitude_masks


def stored_inputs(seed: int, count: int, shape: tuple[int, ...], dtype: torch.dtype, values: str) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    inputs = [base] + [base + 0.05 * torch.randn(shape, generator=generator) for _ in range(count)]
    if values == "many-ties":  # few distinct deltas: thresholds shared by many entries, ties running out mid-block
        inputs = [base] + [base + torch.round((t - base) * 40) / 40 for t in inputs[1:]]
    elif values == "zero-deltas":
        for t in inputs[1:]:
            t.view(-1)[::3] = base.view(-1)[::3]
    elif values == "with-inf":
        inputs[1].view(-1)[::11] = float("inf")
    return [t.to(dtype) for t in inputs]


FUSABLE = fused.fusable
KEEP_DRAWN = fused.keep_drawn


def merged_in_slices(inputs, params, base_index, rows, fused_on, monkeypatch) -> torch.Tensor | None:
    monkeypatch.setattr(fused, "fusable", FUSABLE if fused_on else lambda inputs: False)

    def slices():
        for start in range(0, inputs[0].shape[0], rows):
            yield [t[start : start + rows].to(torch.float32) for t in inputs]

    compute = kernels._ties_in_slices(params, base_index, inputs, slices)
    if compute is None:
        return None
    assert isinstance(compute, fused.FusedTiesSlices) == fused_on
    return torch.cat([compute("w", part) for part in slices()])


def ties_params(count: int, generator: torch.Generator, density: float | None = None, **overrides) -> dict:
    draw = lambda: float(torch.rand(1, generator=generator))  # noqa: E731
    params = {
        "weight": {i: round(2 * draw() - 0.4, 3) for i in range(count + 1)},
        "density": {i: draw() if density is None else density for i in range(count + 1)},
        "normalize": True,
        "lambda": 1.0,
        "rescale": False,
    }
    params.update(overrides)
    return params


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("values", ["gaussian", "many-ties", "zero-deltas", "with-inf"])
@pytest.mark.parametrize("count", [1, 2, 3])
def test_the_compiled_merge_equals_the_torch_operations_bit_for_bit(dtype, values, count, monkeypatch):
    generator = torch.Generator().manual_seed(count * 10 + len(values))
    inputs = stored_inputs(count, count, (301, 29), dtype, values)  # 8729 entries: several 1024-entry blocks
    for options in ({}, {"normalize": False}, {"lambda": 0.7}):
        params = ties_params(count, generator, **options)
        base_index = int(torch.randint(0, count + 1, (1,), generator=generator))
        rows = int(torch.randint(1, 120, (1,), generator=generator))
        expected = merged_in_slices(inputs, params, base_index, rows, False, monkeypatch)
        got = merged_in_slices(inputs, params, base_index, rows, True, monkeypatch)
        assert expected is not None and got is not None
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32)), (options, base_index, rows)


@pytest.mark.parametrize("density", [0.0, 1.0, 1e-9, 0.999])
def test_edge_densities_merge_as_the_torch_operations_do(density, monkeypatch):
    inputs = stored_inputs(3, 2, (97, 33), torch.bfloat16, "many-ties")
    params = ties_params(2, torch.Generator().manual_seed(2), density=density)
    expected = merged_in_slices(inputs, params, 0, 10, False, monkeypatch)
    got = merged_in_slices(inputs, params, 0, 10, True, monkeypatch)
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_counts_equal_torch_bincount(dtype):
    base, first, second = stored_inputs(5, 2, (64, 300), dtype, "many-ties")
    magnitudes = [(t.float() - base.float()).abs().reshape(-1).view(torch.int32) for t in (first, second)]
    counts = fused.FusedMagnitudeCounts(base, [first, second])
    high = counts.high([0, 1])
    for found, bits in zip(high, magnitudes):
        assert torch.equal(found, torch.bincount(bits >> 16, minlength=MAGNITUDE_HALF))
    chosen = {i: int(torch.argmax(found)) for i, found in enumerate(high)}
    low = counts.low(chosen)
    for i, bits in enumerate(magnitudes):
        within = bits[(bits >> 16) == chosen[i]] & 0xFFFF
        assert int(low[i].sum()) == within.numel() > 0
        assert torch.equal(low[i], torch.bincount(within, minlength=MAGNITUDE_HALF))


def test_a_nan_delta_leaves_the_tensor_to_the_whole_tensor_merge(monkeypatch):
    inputs = stored_inputs(1, 2, (50, 40), torch.bfloat16, "gaussian")
    inputs[2][7, 3] = float("nan")
    params = ties_params(2, torch.Generator().manual_seed(0), density=0.5)
    assert merged_in_slices(inputs, params, 0, 8, True, monkeypatch) is None
    assert fused.FusedMagnitudeCounts(inputs[0], inputs[1:]).high([1]) is None


def test_the_selection_from_compiled_counts_is_the_sliced_selection():
    base, first, second = stored_inputs(7, 2, (120, 50), torch.bfloat16, "many-ties")

    def magnitudes():
        for start in range(0, 120, 13):
            yield [(t[start : start + 13].float() - base[start : start + 13].float()).abs() for t in (first, second)]

    from splice.sparsify import magnitude_masks

    expected = sliced_magnitude_masks(magnitudes, base.numel(), [0.3, 0.8])
    got = magnitude_masks(fused.FusedMagnitudeCounts(base, [first, second]), base.numel(), [0.3, 0.8])
    for want, have in zip(expected, got):
        assert torch.equal(have.threshold, want.threshold) and have.ties_left == want.ties_left


def test_what_the_loops_cannot_read_is_left_to_torch():
    bf16 = torch.zeros(4, 4, dtype=torch.bfloat16)
    assert fused.fusable([bf16, bf16.clone()])
    assert not fused.fusable([bf16.half(), bf16.half()])  # fp16: not read by the loops
    assert not fused.fusable([bf16, bf16.float()])  # mixed dtypes
    assert not fused.fusable([bf16.t(), bf16])  # not contiguous


def through_the_stream(kernel, inputs, dtype):
    """The stream's computation of one tensor in slices (or in one compiled pass where the kernel fills it)."""
    import splice.tensors.stream as stream

    with torch.inference_mode():
        return stream._computed_in_slices(kernel, "w", inputs, dtype)


def filling(calls: list):
    """A spy on FusedTiesSlices.fill: each call's answer appended to `calls`."""
    original = fused.FusedTiesSlices.fill

    def spy(self, inputs, out):
        calls.append(original(self, inputs, out))
        return calls[-1]

    return spy


@pytest.mark.parametrize("output", [torch.float32, torch.bfloat16])
def test_the_compiled_ties_fills_what_the_torch_operations_compute(output, monkeypatch):
    from splice.merge.kernels import method_kernel

    inputs = stored_inputs(4, 2, (400, 333), torch.bfloat16, "many-ties")
    params = ties_params(2, torch.Generator().manual_seed(3), density=0.4, **{"lambda": 0.8})
    kernel = method_kernel("ties", lambda name: params, 1)
    filled: list[bool] = []
    monkeypatch.setattr(fused.FusedTiesSlices, "fill", filling(filled))
    got, _ = through_the_stream(kernel, inputs, output)
    monkeypatch.setattr(fused, "fusable", lambda inputs: False)
    expected, _ = through_the_stream(kernel, inputs, output)
    assert filled == [True]
    assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))


def test_a_value_that_does_not_fit_leaves_the_tensor_to_the_slices():
    from splice.merge.kernels import method_kernel

    inputs = stored_inputs(6, 2, (300, 200), torch.float32, "gaussian")
    for tensor in inputs:  # a base value beyond bf16's largest (3.39e38), its deltas 0: the merge keeps it
        tensor[17, 5] = 3.4e38
    params = ties_params(2, torch.Generator().manual_seed(6), density=0.5)
    kernel = method_kernel("ties", lambda name: params, 0)
    filled: list[bool] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused.FusedTiesSlices, "fill", filling(filled))
        got, got_finite = through_the_stream(kernel, inputs, torch.bfloat16)
        patch.setattr(fused, "fusable", lambda inputs: False)
        expected, finite = through_the_stream(kernel, inputs, torch.bfloat16)
    assert filled == [False] and not finite and not got_finite
    assert torch.equal(got.view(torch.uint16), expected.view(torch.uint16))  # torch's own inf bits


def test_a_prepared_kernel_outside_fp32_is_computed_on_whole_tensors(monkeypatch):
    import dataclasses

    from splice.merge.kernels import method_kernel
    from splice.tensors.stream import Precision

    params = ties_params(2, torch.Generator().manual_seed(7), density=0.5)
    kernel = dataclasses.replace(method_kernel("ties", lambda name: params, 0), precision=Precision(exact=False))
    inputs = stored_inputs(8, 2, (300, 200), torch.bfloat16, "gaussian")
    assert through_the_stream(kernel, inputs, torch.bfloat16) is None  # its thresholds are taken in fp32


def test_without_numba_torch_merges(monkeypatch):
    import sys

    inputs = stored_inputs(12, 2, (301, 29), torch.bfloat16, "many-ties")
    params = ties_params(2, torch.Generator().manual_seed(12), density=0.5)
    compiled = merged_in_slices(inputs, params, 0, 40, True, monkeypatch)
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` raises ImportError
    monkeypatch.delitem(sys.modules, "splice.merge.fused_loops")
    monkeypatch.delattr(sys.modules["splice.merge"], "fused_loops")  # (`splice.merge` is also the merge function)
    fused._loops.cache_clear()
    try:
        assert fused._loops() is None and not fused.fusable(inputs)
        expected = merged_in_slices(inputs, params, 0, 40, False, monkeypatch)
    finally:
        fused._loops.cache_clear()
    assert torch.equal(compiled.view(torch.int32), expected.view(torch.int32))


def test_a_loop_numba_cannot_compile_turns_the_loops_off_and_torch_merges(monkeypatch, caplog):
    from numba.core.errors import NumbaError

    inputs = stored_inputs(13, 2, (301, 29), torch.bfloat16, "gaussian")
    params = ties_params(2, torch.Generator().manual_seed(13), density=0.5)
    expected = merged_in_slices(inputs, params, 0, 40, False, monkeypatch)
    monkeypatch.setattr(fused, "_failures", [])
    loops = fused._loops()

    def cannot_compile(*args):
        raise NumbaError("cannot compile (a test)")

    for loop in ("count_high_halves", "ties_merge"):
        monkeypatch.setattr(loops, loop, cannot_compile)
        monkeypatch.setattr(fused, "_failures", [])
        monkeypatch.setattr(fused, "fusable", FUSABLE)

        def slices():
            for start in range(0, inputs[0].shape[0], 40):
                yield [t[start : start + 40].to(torch.float32) for t in inputs]

        compute = kernels._ties_in_slices(params, 0, inputs, slices)
        got = torch.cat([compute("w", part) for part in slices()])
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32)), loop
        assert fused._failures and not fused.fusable(inputs)
    assert "compiled loops turned off, torch computes instead: cannot compile (a test)" in caplog.text


# --- DARE: the draws from torch's generator and dare_ties's merge -----------------------------------------------------


def dare_in_slices(inputs, params, base_index, rows, fused_on, monkeypatch, seed=11, method="dare_ties"):
    """dare_ties of the slices (or, rows None, filled whole into a bf16/fp32 output), drawn from torch's default
    generator seeded with `seed`; (the merge, the generator's state after)."""
    monkeypatch.setattr(fused, "fusable", FUSABLE if fused_on else lambda inputs: False)
    monkeypatch.setattr(fused, "keep_drawn", KEEP_DRAWN if fused_on else bernoulli_keep)  # torch's own draws

    def slices():
        for start in range(0, inputs[0].shape[0], rows or inputs[0].shape[0]):
            yield [t[start : start + (rows or inputs[0].shape[0])].to(torch.float32) for t in inputs]

    torch.manual_seed(seed)
    compute = kernels.SLICED_METHODS[method](params, base_index, inputs, slices)
    assert isinstance(compute, fused.FusedDrawnSlices) == fused_on
    state = torch.default_generator.get_state()
    if rows is None:
        out = torch.empty_like(inputs[0])
        assert compute.fill(inputs, out)
        return out, state
    return torch.cat([compute("w", part) for part in slices()]).to(inputs[0].dtype), state


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("count", [1, 2, 3])
@pytest.mark.parametrize("rescale", [True, False])
def test_compiled_dare_draws_and_merges_as_the_torch_operations(method, dtype, count, rescale, monkeypatch):
    generator = torch.Generator().manual_seed(count + 7 * rescale)
    inputs = stored_inputs(count, count, (157, 29), dtype, "zero-deltas")  # rows of 29: slices start mid-byte
    for options, rows in (({}, 5), ({"normalize": False}, 64), ({"lambda": 0.7}, 1), ({}, None)):
        params = ties_params(count, generator, rescale=rescale, **options)
        base_index = int(torch.randint(0, count + 1, (1,), generator=generator))
        expected, expected_state = dare_in_slices(
            inputs, params, base_index, rows or 157, False, monkeypatch, method=method
        )
        got, state = dare_in_slices(inputs, params, base_index, rows, True, monkeypatch, method=method)
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8)), (options, base_index, rows)
        assert torch.equal(state, expected_state)


@pytest.mark.parametrize("probability", ["one", "per-entry"])
def test_compiled_draws_keep_what_torch_bernoulli_keeps_and_leave_its_generator_as_torch_does(probability):
    assert fused._draws_as_torch()  # this torch draws as the loops do: the loops are what is tested below
    like = torch.empty(37, 101)  # 3737 draws: several of mt19937's 624-word twists, starting mid-state
    p = 0.35 if probability == "one" else torch.rand(37, 101, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(21)
    torch.rand(5)
    expected = torch.bernoulli(torch.as_tensor(p, dtype=torch.float32).expand(like.shape).contiguous()).bool()
    expected_state = torch.default_generator.get_state()
    torch.manual_seed(21)
    torch.rand(5)
    kept = fused.keep_drawn(p, like)
    assert torch.equal(kept, expected) and torch.equal(torch.default_generator.get_state(), expected_state)
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().set_state(expected_state)))


def test_a_torch_that_draws_otherwise_is_left_to_draw_itself(monkeypatch):
    monkeypatch.setattr(fused, "_draws_as_torch", lambda: False)
    monkeypatch.setattr(fused, "_drawn", lambda *args: pytest.fail("the loops drew"))
    inputs = stored_inputs(2, 2, (40, 16), torch.bfloat16, "gaussian")
    params = ties_params(2, torch.Generator().manual_seed(1), rescale=True)
    torch.manual_seed(5)
    compute = kernels.SLICED_METHODS["dare_ties"](params, 0, inputs, lambda: iter([[t.float() for t in inputs]]))
    assert compute is not None and not isinstance(compute, fused.FusedDrawnSlices)
    torch.manual_seed(5)
    kept = fused.keep_drawn(0.5, torch.empty(9))
    torch.manual_seed(5)
    assert torch.equal(kept, torch.empty(9).uniform_() < 0.5)


def test_dare_ties_of_the_base_alone_leaves_the_loops_on():
    base = torch.randn(40, 33)
    params = {"weight": {0: 1.0}, "density": {0: 0.5}, "normalize": True, "lambda": 1.0, "rescale": False}
    compute = kernels.SLICED_METHODS["dare_ties"](params, 0, [base], lambda: iter([[base]]))
    assert not isinstance(compute, fused.FusedDrawnSlices)
    assert torch.equal(compute("w", [base]), base)
    assert fused._available() and not fused._failures


@pytest.mark.parametrize("rescale", [True, False])
def test_compiled_draws_merged_by_torch_where_the_merge_loop_fails_are_the_torch_path(rescale, monkeypatch):
    inputs = stored_inputs(4, 2, (157, 29), torch.bfloat16, "gaussian")  # rows of 29: slices start mid-byte
    params = ties_params(2, torch.Generator().manual_seed(8), rescale=rescale)
    expected, expected_state = dare_in_slices(inputs, params, 1, 7, False, monkeypatch)
    real_run, failed = fused._run, []

    def merge_loop_fails(loop, *args):
        if loop == fused.FusedDrawnSlices.LOOP:
            failed.append(loop)
            raise fused.LoopsFailed("no compiler here")
        return real_run(loop, *args)

    monkeypatch.setattr(fused, "_run", merge_loop_fails)
    got, state = dare_in_slices(inputs, params, 1, 7, True, monkeypatch)  # the masks drawn compiled, merged by torch
    assert failed  # the merge loop was asked for, and failed
    assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8)) and torch.equal(state, expected_state)
