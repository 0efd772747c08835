"""Per-tensor merge kernels: `(name, tensors) -> tensor`, run by the stream on the compute device.

splice computes soups, linear, task arithmetic and TIES itself (the magnitude trim uses a kthvalue threshold where
mergekit sorts the whole tensor; on the CPU, TIES finds each threshold by counting the magnitudes' bits over
cache-sized slices and then merges slice by slice; TIES and DARE run there as compiled loops, `fused`, where their
inputs allow, and DARE's and DELLA's draws are made there by them). DARE (dare_ties, dare_linear), DELLA (della,
della_linear) and slerp are computed as mergekit's kernels compute them, on the CPU in cache-sized slices: the same
draws from torch's generator, in the same order, the same operations on every entry, and the whole-tensor
statistics first (each trimmed delta's L1 norms, slerp's norms and dot); the one difference is stated where it
arises (`_l1_rescale`). Every other mergekit method runs through mergekit's own per-tensor API,
`mergekit.merge_methods.api.merge_tensors`, inside splice's stream, as do the cases splice's kernels leave to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from splice.errors import SpliceError, first_line
from splice.merge import fused
from splice.merge.ranks import KeepByRank, ranks_in_slices
from splice.sparsify import (
    SlicedMagnitudeMask,
    magnitude_masks,
    pack_mask,
    sliced_magnitude_masks,
    top_magnitude_mask,
    unpack_mask,
)
from splice.tensors.device import compute_dtype_for
from splice.tensors.stream import COMPUTE_SLICE, Compute, Kernel, Slices
from splice.tensors.threads import calling_thread_only

TensorParameters = Callable[[str], dict[str, Any]]
"""Tensor name -> resolved method parameters (shared values, and per-input values keyed by input index)."""
Trim = Callable[[torch.Tensor], None]
"""What trims a weighted delta in place (zeroes the entries a sparsifying method drops)."""


def average_coefficients(weights: Sequence[float]) -> list[float]:
    """w_i / sum w: what a weighted average multiplies each input by."""
    total = float(sum(weights))
    if total == 0:
        raise SpliceError(f"weights {list(weights)} sum to zero; a weighted average needs a non-zero sum")
    return [float(w) / total for w in weights]


def weighted_average(weights: Sequence[float]) -> Kernel:
    """sum_i (w_i / sum w) * x_i, multiplied then added in input order, so it is reproducible exactly."""
    coefficients = average_coefficients(weights)

    def average(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        merged = tensors[0] * coefficients[0]
        for tensor, coefficient in zip(tensors[1:], coefficients[1:]):
            merged += tensor * coefficient
        return merged

    return Kernel(average, elementwise=True)


def _trim_in_place(delta: torch.Tensor, density: float, rescale: bool, eps: float = 1e-7) -> None:
    keep = top_magnitude_mask(delta, density)
    if keep is None:
        return
    if not rescale:
        delta.mul_(keep)
        return
    before = delta.abs().sum()
    delta.mul_(keep)
    after = delta.abs().sum()
    if before >= eps and after >= eps:
        delta.mul_(before / after)


def _task_arithmetic_family(
    name: str,
    tensors: list[torch.Tensor],
    params: Mapping[str, Any],
    base_index: int,
    trims: Sequence[Trim | None],
    sign_consensus: bool,
) -> torch.Tensor:
    """base + lambda * (weighted deltas, each trimmed in place by its `trims` entry (one per non-base input, in
    order; None: kept whole), optionally filtered by sign consensus), normalised by the weights that contributed. One
    delta at a time, in place, to keep passes and memory low."""
    base = tensors[base_index]
    others = [i for i in range(len(tensors)) if i != base_index]
    if not others:
        return base
    weights = [params["weight"][i] for i in others]
    deltas = []
    for i, weight, trim in zip(others, weights, trims):
        delta = tensors[i] - base
        if trim is not None:
            trim(delta)
        delta.mul_(weight)
        deltas.append(delta)
    if sign_consensus:
        # the elected sign, that of the summed weighted deltas: +1 where the sum is >= 0, else -1. The comparisons
        # are made in place, into float tensors of 1 and 0: a bool result and its conversion cost ~8x more.
        total = deltas[0].clone() if len(deltas) == 1 else sum(deltas[1:], deltas[0])
        elected = total.ge_(0).mul_(2).sub_(1)
        merged = torch.zeros_like(base)
        divisor = torch.zeros_like(base)
        for delta, weight in zip(deltas, weights):
            agrees = torch.sign(delta).eq_(elected)  # 1 where the delta has the elected sign, else 0
            merged.addcmul_(delta, agrees)  # delta * 0 or 1 is exact: fused or not, one rounding in the add
            divisor.add_(agrees, alpha=weight)
        divisor.add_(divisor.clone().eq_(0))  # 0 -> 1, every other value unchanged
    else:
        merged = sum(deltas[1:], deltas[0])
        divisor = _weights_divisor(weights, base.dtype, base.device)
    if params["normalize"]:
        merged /= divisor
    if params["lambda"] != 1:
        merged *= params["lambda"]
    return base + merged


def _weights_divisor(
    weights: Sequence[float], dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """mergekit's normalization without sign consensus: the weights' sum (1 where it is below 1e-8 in magnitude)."""
    divisor = torch.tensor(weights, dtype=dtype, device=device).sum()
    if divisor.abs() < 1e-8:
        divisor.fill_(1)
    return divisor


def _magnitude_trims(params: Mapping[str, Any], base_index: int, count: int) -> list[Trim | None]:
    """TIES's trim of each non-base input's delta over the whole tensor: its top `density` by magnitude."""
    others = [i for i in range(count) if i != base_index]
    return [partial(_trim_in_place, density=params["density"][i], rescale=params["rescale"]) for i in others]


def _ties(name: str, tensors: list[torch.Tensor], params: Mapping[str, Any], base_index: int) -> torch.Tensor:
    return _task_arithmetic_family(
        name, tensors, params, base_index, _magnitude_trims(params, base_index, len(tensors)), True
    )


def _ties_in_slices(
    params: Mapping[str, Any], base_index: int, inputs: Sequence[torch.Tensor], slices: Slices
) -> Compute | None:
    """TIES on a tensor's slices: each delta's magnitude threshold found over the whole tensor first (two passes
    over the slices: sparsify.sliced_magnitude_masks), then the slices trimmed against it and merged in order, the
    same arithmetic on every entry as `_ties` on the whole tensor. None with `rescale` (it sums whole deltas)."""
    others = [i for i in range(len(inputs)) if i != base_index]
    if params["rescale"] or not others:
        return None
    densities = [params["density"][i] for i in others]

    def with_torch(masks: Sequence[SlicedMagnitudeMask | None]) -> Compute:
        trims = [None if mask is None else partial(_trim_by, mask) for mask in masks]
        return lambda name, part: _task_arithmetic_family(name, part, params, base_index, trims, True)

    if fused.fusable(inputs):
        counts = fused.FusedMagnitudeCounts(inputs[base_index], [inputs[i] for i in others])
        try:
            found = magnitude_masks(counts, inputs[0].numel(), densities)
        except fused.LoopsFailed:
            pass  # counted by torch below
        else:
            if found is None:
                return None
            return fused.FusedTiesSlices(params, base_index, others, found, with_torch(found))

    def magnitudes() -> Iterator[list[torch.Tensor]]:
        for part in slices():
            yield [(part[i] - part[base_index]).abs_() for i in others]

    masks = sliced_magnitude_masks(magnitudes, inputs[0].numel(), densities)
    return None if masks is None else with_torch(masks)


def _trim_by(mask: SlicedMagnitudeMask, delta: torch.Tensor) -> None:
    delta.mul_(mask.keep(delta.abs()))


# --- DARE and DELLA: random trims drawn as mergekit draws them -------------------------------------------------------

RESCALE_EPS = 1e-7
"""mergekit's `rescaled_masked_tensor`: a trimmed delta whose L1 norm, before or after the trim, is below this is
left unscaled."""

KeepProbability = Callable[[torch.Tensor], "float | torch.Tensor"]
"""A delta (or a block of whole rows of it, in fp32) -> the probability that each of its entries is kept."""


class _DropAll:
    """A trim that drops every entry without drawing (DELLA at density <= 0)."""


DROP_ALL = _DropAll()
Sparsifier = Callable[[Mapping[str, Any], int], "KeepProbability | KeepByRank | _DropAll | None"]
"""(a tensor's parameters, a non-base input's index) -> how that input's delta is trimmed: its entries' keep
probability (drawn; DELLA's from its magnitudes' ranks), DROP_ALL, or None (kept whole, nothing drawn)."""


def _dare(params: Mapping[str, Any], index: int) -> KeepProbability | _DropAll | None:
    """mergekit's `bernoulli` sparsification: each entry kept with probability `density`, drawn also at density 0
    (as mergekit draws); nothing drawn at density >= 1."""
    density = params["density"][index]
    return None if density >= 1 else (lambda delta: density)


def _della(params: Mapping[str, Any], index: int) -> KeepByRank | _DropAll | None:
    """mergekit's `della_magprune`: each entry kept with probability density - epsilon + 2 epsilon (rank - 1) /
    (n - 1), its magnitude's rank among the n entries of its row along dim 1 (a 1-D tensor is one row), equal
    magnitudes in the order torch's argsort leaves them; nothing drawn at density <= 0 (all dropped) or >= 1."""
    density, epsilon = params["density"][index], params["epsilon"][index]
    if density >= 1:
        return None
    if density <= 0:
        return DROP_ALL
    return KeepByRank(density, epsilon)


def _refused_by_mergekit(sparsifier: Sparsifier, params: Mapping[str, Any], index: int) -> bool:
    """Parameters mergekit's sparsification refuses mid-merge (a density below 0, DELLA's window density +/-
    epsilon outside (0, 1), NaN): left to mergekit's kernel, which says so as it always has."""
    density = params["density"][index]
    if sparsifier is _della and 0 < density < 1:
        epsilon = params["epsilon"][index]
        return not (density - epsilon > 0 and density + epsilon < 1)
    return not density >= 0


class _DrawnTrim:
    """One delta's random trim, drawn over the whole tensor before any of it is merged: the entries each slice keeps
    (packed eight to a byte, one slice after another in one buffer: small arrays kept one per slice between the
    passes' large temporaries would pin the heap, ~9 bytes an entry never returned) and the factor mergekit's rescale
    multiplies the kept entries by (None: unscaled); applied to the slices in order, with mergekit's operations
    (delta * keep, then * factor)."""

    def __init__(self, entries: int, slices_at_most: int) -> None:
        self.capacity = -(-entries // 8) + slices_at_most  # a slice's last byte may be part full
        self.packed: torch.Tensor | None = None
        self.spans: list[tuple[int, int]] = []  # (first byte, bytes) of each slice's mask
        self.scale: torch.Tensor | None = None
        self.applied = 0

    def add(self, keep: torch.Tensor) -> None:
        """The next slice's kept entries."""
        packed = pack_mask(keep)
        if self.packed is None:
            self.packed = torch.empty(self.capacity, dtype=torch.uint8, device=packed.device)
        start = self.spans[-1][0] + self.spans[-1][1] if self.spans else 0
        self.packed[start : start + packed.numel()].copy_(packed)
        self.spans.append((start, packed.numel()))

    def __call__(self, delta: torch.Tensor) -> None:
        assert self.packed is not None
        start, size = self.spans[self.applied]
        keep = unpack_mask(self.packed[start : start + size], tuple(delta.shape)).to(delta.device)
        self.applied += 1
        _trimmed(delta, keep, self.scale)


def _trimmed(delta: torch.Tensor, keep: torch.Tensor, scale: torch.Tensor | None) -> None:
    """A drawn trim applied with mergekit's operations: delta * keep (1s and 0s), then * scale (None: unscaled)."""
    delta.mul_(as_float_mask(keep, delta.dtype))
    if scale is not None:
        delta.mul_(scale)


def as_float_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean (or uint8 0/1) mask as 1s and 0s of `dtype` (mergekit's masks): through uint8, ~10x faster than from
    bool."""
    return keep.view(torch.uint8).to(dtype)


def _drop_all(delta: torch.Tensor) -> None:
    delta.zero_()  # mergekit's zeros_like: +0 everywhere


def _l1_rescale(before: Sequence[float], after: Sequence[float]) -> torch.Tensor | None:
    """mergekit's rescale of a trimmed delta: its L1 norm before the trim over its L1 norm after, in fp32 (None
    where either norm is below RESCALE_EPS). The one place splice's result may differ from mergekit's: the norms
    here are the exact sums rounded once to fp32 (each slice summed in fp64, the slices' sums added exactly), where
    mergekit sums the whole tensor in fp32 in an order set by the CPU's vector width and torch's thread count (its
    own norms differ in their last bits from one thread count to another), so the factor can differ from mergekit's
    in its last bits (tests/test_methods_slices.py measures it). Slices and whole tensors round the same fp32 norm
    unless the exact sum lies within ~1e-15 (relative) of a rounding boundary: a chance of ~1e-8 per norm. The
    compiled dare_ties (`fused.draw_dare_trims`) sums each run of 128K entries in eight fp64 sums side by side
    instead of torch's order: the same fp32 norm but for the same small chance."""
    norms = [torch.tensor(math.fsum(sums), dtype=torch.float32) for sums in (before, after)]
    if norms[0] < RESCALE_EPS or norms[1] < RESCALE_EPS:
        return None
    return norms[0] / norms[1]


def _drawn_trims(
    sparsifier: Sparsifier, params: Mapping[str, Any], base_index: int, shape: torch.Size, count: int, slices: Slices
) -> list[Trim | None]:
    """Each non-base input's trim, drawn input by input in order, each over all its slices in order: the draws
    mergekit's sparsification makes of torch's default generator, one per entry (none for a delta kept whole or
    dropped whole). DELLA's ranks are all found first, on every core (merge/ranks.py), before the first draw waits
    for the tensor's turn. With `rescale`, each delta's L1 norms before and after its trim, over all its slices."""
    others = [i for i in range(count) if i != base_index]
    keeps = {index: sparsifier(params, index) for index in others}
    ranks = ranks_in_slices([i for i in others if isinstance(keeps[i], KeepByRank)], base_index, slices)
    trims: list[Trim | None] = []
    for index in others:
        keep_probability = keeps[index]
        if keep_probability is None or isinstance(keep_probability, _DropAll):
            trims.append(None if keep_probability is None else _drop_all)
            continue
        drawn, before, after = _DrawnTrim(shape.numel(), shape[0] if shape else 1), [], []
        for part in slices():
            delta = part[index] - part[base_index]
            probability: float | torch.Tensor = (
                keep_probability(ranks[index].popleft(), delta.shape)  # each slice's ranks freed once used
                if isinstance(keep_probability, KeepByRank)
                else keep_probability(delta)
            )
            keep = fused.keep_drawn(probability, delta)
            drawn.add(keep)
            if params["rescale"]:
                magnitude = delta.abs_()
                before.append(float(magnitude.sum(dtype=torch.float64)))
                after.append(float(magnitude.mul_(as_float_mask(keep, delta.dtype)).sum(dtype=torch.float64)))
        drawn.scale = _l1_rescale(before, after) if params["rescale"] else None
        trims.append(drawn)
    return trims


def _random_in_slices(
    sparsifier: Sparsifier,
    sign_consensus: bool,
    params: Mapping[str, Any],
    base_index: int,
    inputs: Sequence[torch.Tensor],
    slices: Slices,
    whole: bool = False,
) -> Compute | None:
    """DARE or DELLA (`sparsifier`), with TIES's sign consensus or without, on a tensor's slices: every delta's trim
    drawn over the whole tensor first (`_drawn_trims`), then the slices trimmed and merged in order with the
    arithmetic of mergekit's generalized task arithmetic on every entry. `whole`: the one slice is the whole tensor.
    None (mergekit's kernel computes the tensor) where splice would not compute what mergekit computes: inputs not
    computed in fp32 (mergekit rounds an fp64 delta to fp32 to sparsify it), parameters mergekit refuses, and DELLA
    on slices of a tensor whose rows along dim 1 they do not hold whole (a 1-D tensor) or of fewer than 2 entries.
    Nothing is drawn before that is decided."""
    others = [i for i in range(len(inputs)) if i != base_index]
    if any(compute_dtype_for(t.dtype) != torch.float32 for t in inputs):
        return None
    if any(_refused_by_mergekit(sparsifier, params, i) for i in others):
        return None
    if sparsifier is _della and not _rows_lie_whole(inputs[0], whole):
        return None
    if sparsifier is _dare and fused.fusable(inputs):
        compiled = _dare_compiled(params, base_index, others, inputs, sign_consensus)
        if compiled is not None:
            return compiled
    trims = _drawn_trims(sparsifier, params, base_index, inputs[0].shape, len(inputs), slices)
    return lambda name, part: _task_arithmetic_family(name, part, params, base_index, trims, sign_consensus)


def _dare_compiled(
    params: Mapping[str, Any],
    base_index: int,
    others: Sequence[int],
    inputs: Sequence[torch.Tensor],
    sign_consensus: bool,
) -> fused.FusedDrawnSlices | None:
    """dare_ties (`sign_consensus`) or dare_linear drawn and merged by the compiled loops (the same draws, the same
    masks and the same arithmetic as `_drawn_trims` and `_task_arithmetic_family`; the rescale's sums added in another
    order, see `_l1_rescale`), where there is a delta and every one is drawn (densities below 1), and the loops run;
    None (nothing drawn) otherwise."""
    densities = [params["density"][i] for i in others]
    if not others or any(density >= 1 for density in densities):
        return None
    try:
        drawn = fused.draw_dare_trims(inputs[base_index], [inputs[i] for i in others], densities, params["rescale"])
    except fused.LoopsFailed:
        return None
    scales = [_l1_rescale(trim.before, trim.after) if params["rescale"] else None for trim in drawn]
    trims = [_PackedTrim(trim.packed, scale) for trim, scale in zip(drawn, scales)]
    return fused.FusedDrawnSlices(
        params,
        base_index,
        others,
        drawn,
        scales,
        lambda name, part: _task_arithmetic_family(name, part, params, base_index, trims, sign_consensus),
        None if sign_consensus else _weights_divisor([params["weight"][i] for i in others]),
    )


class _PackedTrim:
    """A drawn trim held as bits over the whole tensor (`fused.DrawnTrim.packed`), applied to its slices in order
    with `_DrawnTrim`'s operations."""

    def __init__(self, packed: np.ndarray, scale: torch.Tensor | None):
        self.packed, self.scale, self.applied = packed, scale, 0

    def __call__(self, delta: torch.Tensor) -> None:
        first, count = self.applied, delta.numel()
        bits = np.unpackbits(self.packed[first // 8 : -(-(first + count) // 8)], bitorder="little")
        keep = torch.from_numpy(bits[first % 8 : first % 8 + count].copy()).view(delta.shape)
        self.applied += count
        _trimmed(delta, keep, self.scale)


def _rows_lie_whole(tensor: torch.Tensor, whole: bool) -> bool:
    """Whether DELLA's rows (along dim 1; a 1-D tensor is one row) lie whole in every slice of `tensor` (blocks of
    dim 0, or the `whole` tensor) and hold 2 entries or more (its rank scale divides by n - 1)."""
    if tensor.dim() < 2:
        return whole and tensor.numel() >= 2
    return tensor.shape[1] >= 2


# --- slerp: mergekit's statistics, then elementwise ------------------------------------------------------------------

SLERP_CHUNK = 1024 * 1024
"""mergekit's slerp reduces the flattened tensors in chunks of this many entries (its `_CHUNK_ELEMENTS`)."""
SLERP_DOT_THRESHOLD = 0.9995  # mergekit's slerp: above it (in magnitude) the vectors are interpolated linearly
SLERP_EPS = 1e-8  # mergekit's slerp: a norm at most this is taken as 1


def slerp_coefficients(t: float, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ca, cb) such that mergekit's slerp of `a` (the base) to `b` at `t` is ca * a + cb * b entry by entry, for
    whole tensors in any stored dtype (each chunk converted to the working dtype as it is reduced): mergekit's chunks
    of the flattened tensors, its norms of the chunks' norms, its dot of normalised chunks and its operations, in
    its order, on the calling thread alone (torch's reductions over a chunk differ in their last bits on several
    threads, and mergekit runs on whatever thread count torch has)."""
    dtype = compute_dtype_for(a.dtype)
    a, b = a.reshape(1, -1), b.reshape(1, -1)
    chunks = [slice(start, start + SLERP_CHUNK) for start in range(0, a.shape[1], SLERP_CHUNK)]
    with calling_thread_only(COMPUTE_SLICE):
        share = torch.tensor([t], dtype=dtype, device=a.device).reshape(-1, 1)
        norms = []
        for x in (a, b):
            parts = [torch.linalg.vector_norm(x[:, chunk].to(dtype), dim=1, keepdim=True) for chunk in chunks]
            norm = torch.linalg.vector_norm(torch.stack(parts), dim=0)
            norms.append(torch.where(norm > SLERP_EPS, norm, 1))
        dots = [
            ((a[:, chunk].to(dtype) / norms[0]) * (b[:, chunk].to(dtype) / norms[1])).sum(dim=1, keepdim=True)
            for chunk in chunks
        ]
        dot = torch.stack(dots).sum(dim=0).clamp(-1, 1)
        linear = dot.abs() > SLERP_DOT_THRESHOLD
        theta = torch.acos(torch.where(linear, 0, dot))
        sin_theta = torch.sin(theta)
        coefficient_a = torch.where(linear, 1 - share, torch.sin((1 - share) * theta) / sin_theta)
        coefficient_b = torch.where(linear, share, torch.sin(share * theta) / sin_theta)
    return coefficient_a.reshape(()), coefficient_b.reshape(())


def _slerp_in_slices(
    params: Mapping[str, Any],
    base_index: int,
    inputs: Sequence[torch.Tensor],
    slices: Slices,
    whole: bool = False,
) -> Compute | None:
    """slerp on a tensor's slices (or, `whole`, on the whole tensors as one slice: the same thing): mergekit's
    coefficients from the whole tensors first (`slerp_coefficients`), then each slice ca * base + cb * other,
    mergekit's operations on every entry. None (mergekit's kernel) for anything but two non-empty inputs."""
    if len(inputs) != 2 or inputs[0].numel() == 0:
        return None
    other = 1 - base_index
    coefficient_a, coefficient_b = slerp_coefficients(params["t"], inputs[base_index], inputs[other])
    return lambda name, part: coefficient_a * part[base_index] + coefficient_b * part[other]


def _on_whole_tensors(in_slices: Callable[..., Compute | None]) -> Callable[..., torch.Tensor | None]:
    """A sliced method's whole-tensor kernel: the same code with the whole tensors as its one slice, so both give
    the same output bit for bit (None where it declines: mergekit's kernel computes the tensor)."""

    def whole(
        name: str, tensors: list[torch.Tensor], params: Mapping[str, Any], base_index: int | None
    ) -> torch.Tensor | None:
        if base_index is None:  # these methods require a base: mergekit's kernel says so
            return None
        compute = in_slices(params, base_index, tensors, lambda: iter([tensors]), whole=True)
        return None if compute is None else compute(name, tensors)

    return whole


def _linear(name: str, tensors: list[torch.Tensor], params: Mapping[str, Any], base_index: int | None) -> torch.Tensor:
    weights = [params["weight"][i] for i in range(len(tensors))]
    merged = tensors[0] * weights[0]
    for tensor, weight in zip(tensors[1:], weights[1:]):
        merged += tensor * weight
    if params["normalize"]:
        merged /= sum(weights)
    return merged


def _passthrough(
    name: str, tensors: list[torch.Tensor], params: Mapping[str, Any], base_index: int | None
) -> torch.Tensor:
    scale = params["scale"][0]
    return tensors[0] if scale is None else tensors[0] * scale


# Methods whose output entry depends only on the same entry of each input (no per-tensor statistics).
ELEMENTWISE_METHODS = frozenset({"linear", "task_arithmetic", "passthrough"})

# Methods whose output entries depend on the same entries of the inputs once per-tensor statistics are known: on
# the CPU they are computed in slices (Kernel.prepare), with the same result as on whole tensors.
SLICED_METHODS: dict[str, Callable[..., Compute | None]] = {
    "ties": _ties_in_slices,
    "dare_ties": partial(_random_in_slices, _dare, True),
    "dare_linear": partial(_random_in_slices, _dare, False),
    "della": partial(_random_in_slices, _della, True),
    "della_linear": partial(_random_in_slices, _della, False),
    "slerp": _slerp_in_slices,
}

# Methods that draw from torch's default generator: their tensors draw in the plan's order (Kernel.in_order).
DRAWING_METHODS = frozenset({"dare_ties", "dare_linear", "della", "della_linear"})

# splice's whole-tensor kernels; None from one: mergekit's kernel computes that tensor.
OWN_METHODS: dict[str, Callable[..., torch.Tensor | None]] = {
    "linear": _linear,
    "passthrough": _passthrough,
    "task_arithmetic": lambda n, t, p, b: _task_arithmetic_family(n, t, p, b, [None] * (len(t) - 1), False),
    "ties": _ties,
    **{method: _on_whole_tensors(SLICED_METHODS[method]) for method in (*DRAWING_METHODS, "slerp")},
}


def method_kernel(
    method: str, parameters_for: TensorParameters, base_index: int | None, prefer_own: bool = True
) -> Kernel:
    """A kernel for a named merge method: splice's own implementation where it has one (mergekit's for the tensors
    it leaves to it), else mergekit's."""
    through_mergekit = _mergekit_kernel(method, parameters_for, base_index)
    in_order = method in DRAWING_METHODS
    if not (prefer_own and method in OWN_METHODS):
        from splice.merge.methods import mergekit_method

        mergekit_method(method)  # an unknown method refused now, before anything is read
        return Kernel(through_mergekit, in_order=in_order)
    implementation = OWN_METHODS[method]

    def own(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        merged = implementation(name, tensors, parameters_for(name), base_index)
        return through_mergekit(name, tensors) if merged is None else merged

    in_slices = SLICED_METHODS.get(method)
    prepare = None
    if in_slices is not None and base_index is not None:
        base = base_index

        def prepare(name: str, inputs: Sequence[torch.Tensor], slices: Slices) -> Compute | None:
            return in_slices(parameters_for(name), base, inputs, slices)

    return Kernel(
        own,
        elementwise=method in ELEMENTWISE_METHODS,
        prepare=prepare,
        in_order=in_order,
        prepare_waits_to_draw=in_order,  # draws wait for their turn (fused, sparsify): what comes before them does not
    )


def _mergekit_kernel(method: str, parameters_for: TensorParameters, base_index: int | None) -> Compute:
    """mergekit's kernel for a method, through its per-tensor API (mergekit imported on the first call)."""

    def through_mergekit(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        from mergekit.merge_methods.api import merge_tensors

        from splice.merge.methods import mergekit_method

        try:
            return merge_tensors(
                tensors,
                mergekit_method(method),
                parameters=parameters_for(name),
                ids=list(range(len(tensors))),
                base_index=base_index,
                name=name,
            )
        except Exception as exc:  # mergekit raises many types; the user needs the method and the tensor
            raise SpliceError(f"{method} failed on tensor {name}: {first_line(exc)}") from exc

    return through_mergekit
