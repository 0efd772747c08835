"""Sparsification shared by merges and patches: keep the largest-magnitude entries; masks bit-packed, eight entries
to a byte (entry 8i+j in bit j of byte i), as mask patches store them and Localize-and-Stitch holds them."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from math import prod
from typing import Protocol

import numpy as np
import torch

from splice.errors import PatchError
from splice.tensors.turns import my_turn

_BIT_WEIGHTS = torch.tensor([1 << bit for bit in range(8)], dtype=torch.uint8)
_SET_BITS = torch.tensor([bin(byte).count("1") for byte in range(256)], dtype=torch.int64)  # byte -> its set bits


def top_magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor | None:
    """Where the k = max(1, int(density * n)) largest-magnitude entries are (None: keep everything).

    The k-th largest magnitude is found with kthvalue (linear time) instead of a full sort. Entries equal
    to it are kept lowest index first until exactly k survive (mergekit's argsort breaks such ties in an
    unspecified order; on large fp32 tensors equal magnitudes at the threshold are common).
    """
    if density >= 1:
        return None
    count = delta.numel()
    if density <= 0 or count == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    return top_k_over({"": delta.abs()}, max(1, int(density * count)))[""]


def top_k_over(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Where the k largest scores of all the tensors together are, one boolean mask per tensor: exactly k entries in
    all (k is capped by the entries there are). Ties at the k-th score are kept in the tensors' order, lowest index
    first, so the result is deterministic."""
    if not scores:
        return {}
    parts = [score.reshape(-1) for score in scores.values()]
    flat = parts[0] if len(parts) == 1 else torch.cat(parts)  # one tensor (a merge's trim): no copy
    k = max(0, min(k, flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k:
        threshold = flat.kthvalue(flat.numel() - k + 1).values
        keep = flat > threshold
        missing = k - int(keep.sum())
        if missing:
            keep[(flat == threshold).nonzero().squeeze(1)[:missing]] = True
    masks, start = {}, 0
    for name, score in scores.items():
        masks[name] = keep[start : start + score.numel()].view(score.shape)
        start += score.numel()
    return masks


MAGNITUDE_HALF = 1 << 16
"""A magnitude's fp32 bits split in two 16-bit halves: the k-th largest is found by counting the high halves, then
the low halves of the entries in the high half that holds it (a radix selection: two passes, no sort)."""
INF_BITS = 0x7F800000


class SlicedMagnitudeMask:
    """`top_magnitude_mask` of a whole tensor, applied to it slice after slice in order: keeps the entries whose
    magnitude is above the k-th largest, then those equal to it, lowest index first, until exactly k are kept. Made
    by `sliced_magnitude_masks`."""

    def __init__(self, threshold: torch.Tensor, ties_to_keep: int):
        self.threshold = threshold
        self.ties_left = ties_to_keep

    def keep(self, magnitude: torch.Tensor) -> torch.Tensor:
        """Where the next slice's entries (their magnitudes, in the whole tensor's order) are kept."""
        if self.ties_left <= 0:
            return magnitude > self.threshold
        # bf16 deltas share few values: a fifth of a slice can equal the threshold. Ranked only in the one slice where
        # the ties run out; before it every equal entry is kept.
        equal = magnitude == self.threshold
        count = int(equal.sum())
        if count <= self.ties_left:
            self.ties_left -= count
            return magnitude >= self.threshold
        rank = equal.reshape(-1).cumsum(0).view(equal.shape)
        keep = (magnitude > self.threshold) | (equal & (rank <= self.ties_left))
        self.ties_left = 0
        return keep


class MagnitudeCounts(Protocol):
    """Counts of the fp32 bits of several tensors' magnitudes (each tensor's count of entries the same), by halves:
    what a radix selection of their k-th largest entries needs."""

    def high(self, tensors: Sequence[int]) -> list[torch.Tensor] | None:
        """For each of `tensors` (indices), MAGNITUDE_HALF counts: how many of its magnitudes have each high half;
        None when a magnitude is NaN."""

    def low(self, chosen: Mapping[int, int]) -> dict[int, torch.Tensor]:
        """For each tensor index in `chosen`, MAGNITUDE_HALF counts of the low halves of its magnitudes whose high
        half is `chosen[index]`."""


def sliced_magnitude_masks(
    magnitudes: Callable[[], Iterator[list[torch.Tensor]]], count: int, densities: Sequence[float]
) -> list[SlicedMagnitudeMask | None] | None:
    """For each of several tensors of `count` entries whose fp32 magnitudes `magnitudes()` yields slice by slice
    (a list per slice, one slice of each tensor, the same slices on every call): what `top_magnitude_mask(tensor,
    density)` keeps, as a mask applied slice by slice (None where it keeps everything). Two passes over the slices.
    None when a magnitude is NaN (the caller computes the whole tensor instead)."""
    return magnitude_masks(_CountedInSlices(magnitudes), count, densities)


def magnitude_masks(
    counts: MagnitudeCounts, count: int, densities: Sequence[float]
) -> list[SlicedMagnitudeMask | None] | None:
    """`sliced_magnitude_masks` of the tensors whose magnitudes `counts` counts."""
    masks: list[SlicedMagnitudeMask | None] = [None] * len(densities)
    wanted = {i: max(1, int(density * count)) for i, density in enumerate(densities) if 0 < density < 1}
    for i, density in enumerate(densities):
        if density <= 0 or count == 0:
            masks[i] = SlicedMagnitudeMask(torch.tensor(float("inf")), 0)
    if not wanted:
        return masks
    high = counts.high(list(wanted))
    if high is None:
        return None
    # (high half, k's rank within it, entries above it)
    chosen = {i: _kth_from_top(found, wanted[i]) for i, found in zip(wanted, high)}
    low = counts.low({i: high_half for i, (high_half, _, _) in chosen.items()})
    for i, (high_half, rank, above) in chosen.items():
        low_half, _, above_within = _kth_from_top(low[i], rank)
        threshold = torch.tensor((high_half << 16) | low_half, dtype=torch.int32).view(torch.float32)
        masks[i] = SlicedMagnitudeMask(threshold, wanted[i] - above - above_within)
    return masks


class _CountedInSlices:
    """MagnitudeCounts of fp32 magnitudes yielded slice by slice, counted by torch.bincount."""

    def __init__(self, magnitudes: Callable[[], Iterator[list[torch.Tensor]]]):
        self.magnitudes = magnitudes

    def high(self, tensors: Sequence[int]) -> list[torch.Tensor] | None:
        high = [torch.zeros(MAGNITUDE_HALF, dtype=torch.int64) for _ in tensors]
        for part in self.magnitudes():
            for counts, i in zip(high, tensors):
                found = torch.bincount(part[i].reshape(-1).view(torch.int32) >> 16, minlength=MAGNITUDE_HALF)
                if found.numel() > MAGNITUDE_HALF or found[(INF_BITS >> 16) + 1 :].any():  # NaN bits lie above inf's
                    return None
                counts += found
        return high

    def low(self, chosen: Mapping[int, int]) -> dict[int, torch.Tensor]:
        low = {i: torch.zeros(MAGNITUDE_HALF, dtype=torch.int64) for i in chosen}
        for part in self.magnitudes():
            for i, high_half in chosen.items():
                # low halves of the chosen high half in 1..2^16; entries below it counted at 0, above it at 2^16 + 1
                within = part[i].reshape(-1).view(torch.int32) - (high_half << 16)
                found = torch.bincount(within.clamp_(-1, MAGNITUDE_HALF).add_(1), minlength=MAGNITUDE_HALF + 2)
                low[i] += found[1:-1]
        return low


def _kth_from_top(counts: torch.Tensor, k: int) -> tuple[int, int, int]:
    """(the bucket holding the k-th largest entry, its rank from the top within that bucket, entries above the
    bucket) for per-bucket `counts` in increasing order of value."""
    from_top = counts.flip(0).cumsum(0).flip(0)  # entries in this bucket or above
    bucket = int((from_top >= k).nonzero()[-1])
    above = int(from_top[bucket + 1]) if bucket + 1 < counts.numel() else 0
    return bucket, k - above, above


def bernoulli_keep(probability: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Where `torch.bernoulli` draws a 1 for every entry of `like` (in fp32: `probability` is one value for all, as
    mergekit's DARE fills it, or a tensor of `like`'s shape, as DELLA's), as a boolean mask, drawing from torch's
    default generator exactly what torch.bernoulli draws. On the CPU torch draws one uniform per entry, in order,
    and keeps the entry where it is below the probability: `uniform_` and a comparison do the same ~3.7x faster
    (tests/test_methods_slices.py holds them equal, draws and generator state); elsewhere torch.bernoulli itself.
    Tensors computed on several threads draw in the plan's order: this waits for the calling thread's turn."""
    my_turn()
    if not isinstance(probability, torch.Tensor):
        probability = torch.tensor(probability, dtype=torch.float32, device=like.device)
    if like.device.type == "cpu":
        return torch.empty(like.shape, dtype=torch.float32).uniform_() < probability
    return torch.bernoulli(probability.to(torch.float32).expand(like.shape).contiguous()).bool()


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as uint8 bytes, eight entries per byte (flattened, zero-padded)."""
    if mask.device.type == "cpu" and mask.dtype == torch.bool:  # numpy's packing: ~30x faster, the same bytes
        return torch.from_numpy(np.packbits(mask.reshape(-1).numpy(), bitorder="little"))
    flat = mask.reshape(-1).to(torch.uint8)
    padded = torch.nn.functional.pad(flat, (0, -flat.numel() % 8)).view(-1, 8)
    return (padded * _BIT_WEIGHTS.to(padded.device)).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The boolean tensor of `shape` that `pack_mask` packed."""
    count = _packed_entries(packed, shape)
    if packed.device.type == "cpu" and packed.dtype == torch.uint8:  # numpy's unpacking: ~70x faster
        unpacked = np.unpackbits(packed.reshape(-1).numpy(), count=count, bitorder="little")
        return torch.from_numpy(unpacked).view(torch.bool).reshape(shape)
    bits = packed.reshape(-1, 1).bitwise_and(_BIT_WEIGHTS.to(packed.device)).ne(0)
    return bits.reshape(-1)[:count].reshape(shape)


def mask_indices(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Where the packed mask of `shape` is set, as sorted flat indices: only the bytes with a bit set are expanded, so
    a sparse mask costs one pass over its bytes (an eighth of the entries) and then its set entries."""
    count = _packed_entries(packed, shape)
    flat = packed.reshape(-1)
    set_bytes = flat.nonzero().squeeze(1)
    rows, bits = flat[set_bytes].reshape(-1, 1).bitwise_and(_BIT_WEIGHTS.to(flat.device)).ne(0).nonzero(as_tuple=True)
    where = set_bytes[rows] * 8 + bits
    return where[where < count]  # not the last byte's padding


def count_selected(packed: torch.Tensor, shape: Sequence[int]) -> int:
    """How many entries of `shape` the packed mask selects: its bytes' set bits, counted without unpacking (the
    last byte's padding bits left out)."""
    padding = -_packed_entries(packed, shape) % 8
    flat = packed.reshape(-1).cpu()
    if padding:
        flat = torch.cat([flat[:-1], flat[-1:] & (0xFF >> padding)])
    return int(torch.bincount(flat, minlength=256) @ _SET_BITS)


def _packed_entries(packed: torch.Tensor, shape: Sequence[int]) -> int:
    """The entries of `shape`, refused unless `packed` holds exactly the bytes they pack into."""
    count = prod(shape)
    if packed.numel() != -(-count // 8):
        raise PatchError(f"a packed mask of {packed.numel()} bytes cannot hold {count} entries of shape {list(shape)}")
    return count
