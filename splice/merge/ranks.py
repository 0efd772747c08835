"""DELLA's keep probabilities, from each delta's magnitude ranks: the ranks found on every core before the tensor's
turn to draw.

The ranks (a sort of every row) need no draws and are nearly all of DELLA's time: ~60 ns an entry on one core, where
the draws take ~1 ns. A tensor's compute thread hands its slices to ranking threads of its own, one per core, and
waits for its turn to draw (tensors/turns.py) only once they are ranked. So two tensors in flight are ranked at
once, and a tensor computed alone (a large vocabulary's, past the stream's bound on the bytes in flight) on every
core, where its compute thread alone would leave the other cores idle.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections import deque
from collections.abc import Sequence

import torch

from splice.errors import SpliceError
from splice.tensors.stream import COMPUTE_SLICE, Slices
from splice.tensors.threads import calling_thread_only

RANK_WAIT_S = 600.0
"""How long a compute thread waits for one slice's ranks (a slice takes milliseconds)."""

EXACT_FP32_INTEGERS = 2**24
"""fp32 holds every integer up to this one exactly: a row's ranks + 1 up to here are exact."""

SLICES_AHEAD_PER_THREAD = 2
"""Slices handed to each ranking thread ahead of the ranks collected: the deltas waiting stay a few slices."""


class KeepByRank:
    """DELLA's keep probabilities (mergekit's `della_magprune`), computed with mergekit's operations, except that the
    ranks are the inverse permutation of the sort, scattered (~20x faster than mergekit's second argsort, which
    computes the same permutation). The ranks are kept as 16-bit integers where the rows allow (a quarter of the
    probabilities' memory) until the probabilities are computed from them, as the tensor draws."""

    def __init__(self, density: float, epsilon: float):
        self.density, self.epsilon = density, epsilon

    @staticmethod
    def ranks(delta: torch.Tensor) -> torch.Tensor:
        """Each entry's 0-based rank by magnitude in its row along dim 1 (a 1-D delta: one row), as those rows; equal
        magnitudes in the order torch's argsort leaves them."""
        rows = delta if delta.dim() >= 2 else delta.reshape(1, -1)
        order = rows.abs().argsort(dim=1)
        dtype = torch.int16 if rows.shape[1] <= torch.iinfo(torch.int16).max else torch.int32
        places = torch.arange(rows.shape[1], dtype=dtype, device=rows.device).view(1, -1, *[1] * (rows.dim() - 2))
        return torch.empty(order.shape, dtype=dtype, device=rows.device).scatter_(1, order, places.expand_as(order))

    def __call__(self, ranks: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The keep probabilities of a delta of `shape` whose `ranks` these are. A row's ranks are 0..n-1, so
        mergekit's least and greatest rank (its ranks + 1) are 1 and n, and its (rank + 1 - least) / (greatest -
        least) is rank / (n - 1): the same fp32 operations on the same values (the division one tensor by another,
        as mergekit's), two reductions and two passes fewer, for rows of up to 2^24 entries (longer ones: mergekit's
        operations, since fp32 rounds rank + 1 there)."""
        if ranks.shape[1] > EXACT_FP32_INTEGERS:  # fp32 rounds rank + 1 there: mergekit's operations as they are
            ranked = ranks.to(torch.float32) + 1
            lowest, highest = ranked.min(dim=1, keepdim=True).values, ranked.max(dim=1, keepdim=True).values
            rank_norm = ((ranked - lowest) / (highest - lowest)).clamp(0, 1)
        else:
            span = torch.full((ranks.shape[0], 1, *ranks.shape[2:]), ranks.shape[1] - 1, dtype=torch.float32)
            rank_norm = ranks.to(torch.float32).div_(span.to(ranks.device)).clamp_(0, 1)
        return rank_norm.mul_(2).mul_(self.epsilon).add_(self.density - self.epsilon).view(shape)


def ranks_in_slices(ranked: Sequence[int], base_index: int, slices: Slices) -> dict[int, deque[torch.Tensor]]:
    """The ranks (`KeepByRank.ranks`) of each delta from the input at `base_index` to those at `ranked`, slice by
    slice, in order; on the CPU found on ranking threads, one per core, each running torch's operations alone."""
    ranks: dict[int, deque[torch.Tensor]] = {index: deque() for index in ranked}
    if not ranked:
        return ranks
    workers = os.cpu_count() or 1
    pending: deque[tuple[int, concurrent.futures.Future[torch.Tensor]]] = deque()

    def collect() -> None:
        index, job = pending.popleft()
        try:
            ranks[index].append(job.result(timeout=RANK_WAIT_S))
        except concurrent.futures.TimeoutError:
            raise SpliceError(f"DELLA's ranks of a slice took over {RANK_WAIT_S:.0f} s") from None

    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="splice-ranks") as pool:
        try:
            for part in slices():
                for index in ranked:
                    delta = part[index] - part[base_index]
                    if delta.device.type != "cpu":  # (a GPU ranks on its own)
                        ranks[index].append(KeepByRank.ranks(delta))
                        continue
                    while len(pending) >= workers * SLICES_AHEAD_PER_THREAD:
                        collect()
                    pending.append((index, pool.submit(_ranked_alone, delta)))
            while pending:
                collect()
        finally:  # (what is still running ends with its slice: a failed or timed-out wait does not wait for it)
            pool.shutdown(wait=False, cancel_futures=True)
    return ranks


def _ranked_alone(delta: torch.Tensor) -> torch.Tensor:
    with calling_thread_only(COMPUTE_SLICE):  # one thread per core already: torch's pool would only add its spin
        return KeepByRank.ranks(delta)
