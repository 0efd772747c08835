"""DARE, DELLA and slerp computed by splice in cache-sized slices (Kernel.prepare) against mergekit's own kernels.

The draws: torch.bernoulli's on the CPU are one uniform per entry in order, so `bernoulli_keep` (uniform_ and a
comparison) draws the same masks and leaves the generator in the same state; a delta's masks drawn slice by slice
in order are the whole tensor's. Everything but DARE/DELLA's rescale is then mergekit's arithmetic on every entry,
bit for bit; the rescale divides L1 norms that splice sums exactly and rounds once, where mergekit sums in fp32 in
an order set by the CPU and torch's thread count: with mergekit's norms made the same (its `rescaled_masked_tensor`
given exactly rounded sums), splice's output is mergekit's bit for bit, and without, it differs at most by what a
factor off in its last bits makes. slerp's coefficients are mergekit's chunked norms and dot on one thread."""

from __future__ import annotations

import math
from pathlib import Path

import mergekit.sparsify
import pytest
import torch
import yaml
from mergekit.merge_methods import slerp as mergekit_slerp
from mergekit.merge_methods.api import merge_tensors

import splice
import splice.tensors.stream as stream
from splice.errors import SpliceError
from splice.merge.kernels import SLERP_CHUNK, method_kernel
from splice.options import RunOptions
from splice.sparsify import bernoulli_keep
from splice.tensors.safetensors import OutputTensor
from splice.tensors.stream import StreamItem, compute_workers

from helpers import load_dir, run_mergekit

CPU = torch.device("cpu")
DRAWING = ["dare_ties", "dare_linear", "della", "della_linear"]


@pytest.mark.parametrize("shape", [(1,), (7,), (33, 65), (4, 5, 6)])
@pytest.mark.parametrize("probability", ["scalar", "tensor"])
def test_bernoulli_keep_draws_what_torch_bernoulli_draws(shape, probability):
    generator = torch.Generator().manual_seed(len(shape))
    p = torch.rand(shape, generator=generator) if probability == "tensor" else 0.37
    full = p if isinstance(p, torch.Tensor) else torch.full(shape, p)
    torch.manual_seed(4)
    expected = torch.bernoulli(full)
    after = torch.get_rng_state()
    torch.manual_seed(4)
    kept = bernoulli_keep(p, torch.empty(shape))
    assert kept.dtype == torch.bool and torch.equal(kept, expected.bool())
    assert torch.equal(torch.get_rng_state(), after)


def test_a_mask_drawn_slice_by_slice_is_the_whole_tensors():
    torch.manual_seed(9)
    whole = bernoulli_keep(0.5, torch.empty(100, 30))
    torch.manual_seed(9)
    parts = [bernoulli_keep(0.5, torch.empty(rows, 30)) for rows in (7, 40, 1, 52)]
    assert torch.equal(torch.cat(parts), whole)


def parameters(method: str, rescale: bool, **overrides) -> dict:
    shared = {"int8_mask": False, "normalize": method == "della", "rescale": rescale, "lambda": 0.9}
    per_input = {"weight": {0: 0.6, 1: -0.3}, "density": {0: 0.45, 1: 0.8}}
    if method.startswith("della"):
        per_input["epsilon"] = {0: 0.2, 1: 0.15}
    return {**shared, **per_input, **overrides}


def inputs(shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    """Two fine-tunes and their base (last), rounded to bf16 values so that many deltas share a magnitude; one
    delta far larger than the rest, so that a norm summed in fp32 is not the exact sum rounded."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator) * 0.02
    tuned = [base + torch.randn(shape, generator=generator) * 0.002 for _ in range(2)]
    tuned[0].view(-1)[-1] += 300
    return [t.to(torch.bfloat16).float() for t in (*tuned, base)]


SHAPES = [(97, 64), (5, 3), (3000,), (2, 120, 8)]  # sliced; whole (small); 1-D (DELLA: whole); 3-D, in 2 slices


def through_the_stream(kernel, tensors: list[torch.Tensor]) -> torch.Tensor:
    item = StreamItem(OutputTensor("t", torch.float32, tuple(tensors[0].shape)), ())
    return stream.compute_one(item, [t.clone() for t in tensors], kernel, CPU, lambda: tensors)


def exactly_rounded_norms(monkeypatch):
    """mergekit's rescale given the L1 norms rounded once from their exact sums (splice's rule)."""
    original = mergekit.sparsify.rescaled_masked_tensor

    def rescaled(tensor, mask, norm, eps=1e-7):
        masked = tensor * mask
        if norm is None:
            return masked
        before = torch.tensor(math.fsum(tensor.abs().double().reshape(-1).tolist()), dtype=torch.float32)
        after = torch.tensor(math.fsum(masked.abs().double().reshape(-1).tolist()), dtype=torch.float32)
        if before < eps or after < eps:
            return masked
        return masked * (before / after)

    monkeypatch.setattr(mergekit.sparsify, "rescaled_masked_tensor", rescaled)
    return original


@pytest.mark.parametrize("rescale", [False, True], ids=["no-rescale", "rescale"])
@pytest.mark.parametrize("method", DRAWING)
def test_drawing_methods_in_slices_equal_mergekits_kernel(method, rescale, monkeypatch):
    monkeypatch.setattr(stream, "COMPUTE_SLICE", 1000)  # the 97 x 64 matrix in 7 slices of 15 rows
    params = parameters(method, rescale)
    kernel = method_kernel(method, lambda name: params, base_index=2)
    tensors = [inputs(shape, seed) for seed, shape in enumerate(SHAPES)]
    torch.manual_seed(21)
    ours = [through_the_stream(kernel, group) for group in tensors]  # one generator, the tensors in order
    state = torch.get_rng_state()
    if rescale:
        exactly_rounded_norms(monkeypatch)
    torch.manual_seed(21)
    theirs = [merge_tensors(group, method, parameters=params, ids=[0, 1, 2], base_index=2) for group in tensors]
    assert torch.equal(torch.get_rng_state(), state)  # the same draws, as many
    for group, mine, expected in zip(tensors, ours, theirs):
        assert torch.equal(mine, expected), (method, mine.shape)
        assert 0 < int((mine != group[2]).sum()) < mine.numel()  # drops and keeps both happened


def test_the_rescale_differs_from_mergekits_fp32_norms_at_most_in_their_last_bits(monkeypatch):
    monkeypatch.setattr(stream, "COMPUTE_SLICE", 4096)
    params = parameters("dare_ties", True)
    group = inputs((512, 256), 3)
    torch.manual_seed(5)
    ours = through_the_stream(method_kernel("dare_ties", lambda name: params, base_index=2), group)
    torch.manual_seed(5)
    theirs = merge_tensors(group, "dare_ties", parameters=params, ids=[0, 1, 2], base_index=2)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-8)  # a few ulps of the deltas; a wrong draw: ~1e-3


@pytest.mark.parametrize("method", ["della", "dare_ties"])
def test_densities_mergekit_treats_apart(method, monkeypatch):
    """density >= 1 keeps the delta whole and draws nothing; density 0 drops it (DARE still draws, DELLA does not)."""
    monkeypatch.setattr(stream, "COMPUTE_SLICE", 1000)
    params = parameters(method, True, density={0: 1.0, 1: 0.0})
    group = inputs((97, 64), 8)
    torch.manual_seed(2)
    ours = through_the_stream(method_kernel(method, lambda name: params, base_index=2), group)
    state = torch.get_rng_state()
    torch.manual_seed(2)
    theirs = merge_tensors(group, method, parameters=params, ids=[0, 1, 2], base_index=2)
    assert torch.equal(ours, theirs) and torch.equal(torch.get_rng_state(), state)


def test_what_mergekit_refuses_is_refused_by_mergekit_with_nothing_drawn_before(monkeypatch):
    monkeypatch.setattr(stream, "COMPUTE_SLICE", 1000)
    params = parameters("dare_ties", True, density={0: 0.5, 1: -0.1})
    group = inputs((97, 64), 0)
    torch.manual_seed(0)
    with pytest.raises(RuntimeError) as theirs:
        merge_tensors(group, "dare_ties", parameters=params, ids=[0, 1, 2], base_index=2)
    state = torch.get_rng_state()
    torch.manual_seed(0)
    with pytest.raises(SpliceError) as ours:
        through_the_stream(method_kernel("dare_ties", lambda name: params, base_index=2), group)
    assert str(ours.value) == f"dare_ties failed on tensor t: {str(theirs.value).splitlines()[0]}"
    assert torch.equal(torch.get_rng_state(), state)  # input 0's draws made once, by mergekit


def test_fp64_inputs_are_left_to_mergekit_which_sparsifies_them_in_fp32(monkeypatch):
    monkeypatch.setattr(stream, "COMPUTE_SLICE", 1000)
    params = parameters("dare_linear", False)
    group = [t.double() + 1e-12 for t in inputs((97, 64), 1)]  # bits below fp32's, which mergekit's rounding drops
    torch.manual_seed(3)
    ours = through_the_stream(method_kernel("dare_linear", lambda name: params, base_index=2), group)
    torch.manual_seed(3)
    theirs = merge_tensors(group, "dare_linear", parameters=params, ids=[0, 1, 2], base_index=2)
    assert ours.dtype == torch.float32 and torch.equal(ours, theirs.float())


@pytest.mark.parametrize("shape", [(300, 5000), (97, 64), (3000,), (3, 40, 20), (5, 3)])  # 2 of mergekit's chunks
@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_slerp_in_slices_equals_mergekits_kernel(shape, stored, monkeypatch):
    assert SLERP_CHUNK == mergekit_slerp._CHUNK_ELEMENTS
    monkeypatch.setattr(stream, "COMPUTE_SLICE", 1000)  # all but (5, 3) in slices
    generator = torch.Generator().manual_seed(len(shape))
    base = torch.randn(shape, generator=generator).to(stored)
    other = (base.float() * 0.7 + torch.randn(shape, generator=generator)).to(stored)
    kernel = method_kernel("slerp", lambda name: {"t": 0.35}, base_index=0)
    item = StreamItem(OutputTensor("t", torch.float32, shape), ())
    ours = stream.compute_one(item, [base, other], kernel, CPU, lambda: [base, other])
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # mergekit's reductions over a chunk depend on the thread count; splice's run on one
    try:
        theirs = merge_tensors([base.float(), other.float()], "slerp", parameters={"t": 0.35}, base_index=0)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(ours, theirs)


def test_drawing_kernels_draw_in_turns_on_the_compute_threads():
    """They draw in `prepare`, in the plan's order (tensors/turns.py; test_compute_threads.py holds their outputs on
    two threads equal to one's, bit for bit)."""
    params = parameters("dare_ties", True)
    for method in DRAWING:
        kernel = method_kernel(method, lambda name: params, base_index=2)
        assert kernel.prepare is not None and kernel.in_order
        assert compute_workers(kernel, CPU, RunOptions(compute_threads=4)) == 4
    slerp = method_kernel("slerp", lambda name: {"t": 0.5}, base_index=0)
    assert compute_workers(slerp, CPU, RunOptions(compute_threads=4)) == 4


def recipe(tmp_path: Path, method: str, dirs: list[Path], **options) -> Path:
    base, first, second = (str(d) for d in dirs)
    models = [
        {"model": first, "parameters": {"weight": 0.6, "density": 0.5}},
        {"model": second, "parameters": {"weight": [0.3, 0.9], "density": [0.4, 0.7]}},
    ]
    data = {"merge_method": method, "base_model": base, "dtype": "float32", "models": models, "parameters": options}
    if method == "slerp":
        data |= {"models": [{"model": base}, {"model": first}], "parameters": {"t": [0.1, 0.8]}}
    path = tmp_path / f"{method}-{len(options)}.yml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "method, options",
    [("dare_ties", {}), ("della", {"epsilon": 0.1}), ("slerp", {})],
)
def test_slices_equal_whole_tensors_and_mergekit_yaml_on_a_sharded_llama(method, options, make_models, tmp_path):
    """The merge in slices (and on two compute threads) equals the merge on whole tensors bit for bit, and
    mergekit-yaml's output with the same seed: bit for bit for slerp, and for DARE/DELLA but for the rescale
    factor's last bits."""
    dirs = make_models("llama", 3, sharded=True)
    path = recipe(tmp_path, method, dirs, **options)
    run_mergekit(path, tmp_path / "mergekit", "--random-seed", "7")
    outputs = {}
    with pytest.MonkeyPatch.context() as patched:
        for case, elements, threads in [("whole", 10**12, 1), ("slices", 40, 2)]:
            patched.setattr(stream, "COMPUTE_SLICE", elements)
            splice.merge(path, tmp_path / case, device="cpu", seed=7, compute_threads=threads)
            outputs[case] = load_dir(tmp_path / case)
    theirs = load_dir(tmp_path / "mergekit")
    assert outputs["whole"].keys() == outputs["slices"].keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.equal(outputs["slices"][name], outputs["whole"][name]), name
        if method == "slerp":
            assert torch.equal(outputs["slices"][name], tensor), name
        torch.testing.assert_close(
            outputs["slices"][name], tensor, rtol=1e-6, atol=1e-7, msg=name
        )  # a wrong draw: ~1e-2


def test_dare_without_rescale_equals_mergekit_yaml_bit_for_bit(make_models, tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "COMPUTE_SLICE", 40)
    dirs = make_models("llama", 3, sharded=True)
    path = recipe(tmp_path, "dare_linear", dirs, rescale=False)
    run_mergekit(path, tmp_path / "mergekit", "--random-seed", "3")
    splice.merge(path, tmp_path / "splice", device="cpu", seed=3)
    ours, theirs = load_dir(tmp_path / "splice"), load_dir(tmp_path / "mergekit")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in theirs)


@pytest.mark.parametrize("row", [2, 3, 7, 64, 1000, 2048, 5632, 32000, 40000])
@pytest.mark.parametrize(("density", "epsilon"), [(0.5, 0.1), (0.45, 0.2), (0.8, 0.15), (1 / 3, 0.07)])
def test_dellas_probabilities_from_ranks_are_mergekits_for_every_rank(row, density, epsilon):
    """Every rank of rows of each length, in random order, through `KeepByRank` (ranks 0..n-1, kept in 16 or 32
    bits) against mergekit's operations on its own ranks (+1, least and greatest, normalized, the window)."""
    from splice.merge.ranks import KeepByRank

    generator = torch.Generator().manual_seed(row)
    delta = torch.randn(3, row, generator=generator).to(torch.bfloat16).float()  # equal magnitudes among them
    ranks = KeepByRank.ranks(delta)
    assert ranks.dtype == (torch.int16 if row < 32768 else torch.int32)
    assert all(torch.equal(r.sort().values, torch.arange(row, dtype=r.dtype)) for r in ranks)  # each row's 0..n-1
    theirs_ranks = delta.abs().argsort(dim=1).argsort(dim=1).to(torch.float32) + 1
    assert torch.equal(ranks.to(torch.float32) + 1, theirs_ranks)  # the same tie order as mergekit's two argsorts
    lowest, highest = theirs_ranks.min(dim=1, keepdim=True).values, theirs_ranks.max(dim=1, keepdim=True).values
    expected = (density - epsilon) + ((theirs_ranks - lowest) / (highest - lowest)).clamp(0, 1) * 2 * epsilon
    ours = KeepByRank(density, epsilon)(ranks, delta.shape)
    assert ours.dtype == torch.float32 and torch.equal(ours, expected)


def test_dellas_probabilities_from_ranks_past_fp32s_exact_integers_are_mergekits():
    """Rows longer than 2^24 + 1 entries: fp32 rounds rank + 1, and mergekit's operations are kept as they are."""
    from splice.merge.ranks import KeepByRank

    row = 2**24 + 5
    ranks = torch.arange(row, dtype=torch.int32).flip(0).view(1, -1)
    theirs = ranks.to(torch.float32) + 1
    lowest, highest = theirs.min(dim=1, keepdim=True).values, theirs.max(dim=1, keepdim=True).values
    expected = (0.5 - 0.1) + ((theirs - lowest) / (highest - lowest)).clamp(0, 1) * 2 * 0.1
    assert torch.equal(KeepByRank(0.5, 0.1)(ranks, torch.Size([row])), expected.view(-1))
