"""TIES, dare_ties and dare_linear on the CPU as loops compiled by numba: what ~60 torch operations do to every
entry, each a pass over memory, done in one (benchmarks/README.md, throughput: per entry of a 3-model bf16 TIES, 24 ->
7.8 ns on one core; a 3 x 1.6 GB bf16 TIES 13 -> 8 s, dare_ties 25 -> 12 s), and the random draws of DARE and DELLA.

The loops do what `kernels._ties_in_slices` and `kernels._random_in_slices` do with torch, operation for operation,
in fp32 (no fused multiply-add, no reordering: numba leaves IEEE arithmetic as written), so the outputs are the same
bit for bit (tests/test_fused.py). The draws are those of torch's default generator: its mt19937 run by the loops
from the generator's state, which is then set where torch's own draws would leave it. The loops run with the GIL
released, on the stream's compute threads. numba compiles them the first time a process meets a new combination of
dtypes and input count (seconds, then read from its cache in `__pycache__` or the user's cache directory), so it is
imported only when such a merge reaches the CPU: its import and LLVM cost a process ~140 MB, which is why the soup,
as fast without it, does not use it.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from splice.errors import first_line
from splice.sparsify import MAGNITUDE_HALF, SlicedMagnitudeMask, bernoulli_keep
from splice.tensors.turns import my_turn

FUSED_DTYPES = (torch.bfloat16, torch.float32)
"""The dtypes the loops read and write as they are (bf16 through its bits)."""

log = logging.getLogger("splice.fused")


class LoopsFailed(Exception):
    """numba could not compile a loop or write it to its cache: the loops are off for the process, torch computes."""


def fusable(inputs: Sequence[torch.Tensor]) -> bool:
    """Whether the compiled loops can read these inputs: on the CPU, contiguous, one dtype of FUSED_DTYPES, and
    the loops available."""
    first = inputs[0]
    return (
        first.dtype in FUSED_DTYPES
        and all(t.device.type == "cpu" and t.dtype == first.dtype and t.is_contiguous() for t in inputs)
        and _available()
    )


def _run(loop: str, *args: Any) -> Any:
    """The compiled `loop` called on `args`. Where numba fails to compile it or to cache it (a full disk), the
    loops are turned off for the rest of the process with one warning, and LoopsFailed raised: the caller then
    computes with torch's operations."""
    loops = _loops()
    try:
        return getattr(loops, loop)(*args)
    except loops.COMPILE_ERRORS as exc:
        _failures.append(exc)
        log.warning("compiled loops turned off, torch computes instead: %s", first_line(exc))
        raise LoopsFailed(first_line(exc)) from exc


_failures: list[BaseException] = []


def _available() -> bool:
    return not _failures and _loops() is not None


def _as_array(tensor: torch.Tensor) -> np.ndarray:
    flat = tensor.reshape(-1)
    return (flat.view(torch.uint16) if flat.dtype == torch.bfloat16 else flat).numpy()


class FusedMagnitudeCounts:
    """sparsify.MagnitudeCounts of the deltas `others[j] - base` of whole stored tensors, counted by the compiled
    loops straight from the stored bytes (bf16 widened to fp32 exactly, as torch widens it)."""

    def __init__(self, base: torch.Tensor, others: Sequence[torch.Tensor]):
        self.base = _as_array(base)
        self.others = tuple(_as_array(t) for t in others)

    def high(self, tensors: Sequence[int]) -> list[torch.Tensor] | None:
        counts = []
        for i in tensors:
            found = np.zeros(MAGNITUDE_HALF, dtype=np.int64)
            if not _run("count_high_halves", self.base, self.others[i], found):
                return None
            counts.append(torch.from_numpy(found))
        return counts

    def low(self, chosen: Mapping[int, int]) -> dict[int, torch.Tensor]:
        counts = {}
        for i, high_half in chosen.items():
            counts[i] = np.zeros(MAGNITUDE_HALF, dtype=np.int64)
            _run("count_low_halves", self.base, self.others[i], high_half, counts[i])
        return {i: torch.from_numpy(found) for i, found in counts.items()}


class _FusedMerge:
    """A merge of a tensor's fp32 slices in order, or of the whole tensor from its stored inputs into its output
    (`fill`), by the compiled `LOOP`: TIES's sign consensus over the deltas trimmed as the subclass's `_trims` say,
    each weighted, normalized and scaled as `kernels._task_arithmetic_family` does."""

    LOOP = ""

    def __init__(
        self,
        params: Mapping[str, Any],
        base_index: int,
        others: Sequence[int],
        with_torch: Callable[[str, list[torch.Tensor]], torch.Tensor],
    ):
        """with_torch: the same merge of the slices by torch's operations, for where the loops turn out not to run."""
        self.base_index, self.others, self.with_torch = base_index, list(others), with_torch
        self.weights = np.array([float(params["weight"][i]) for i in others], dtype=np.float32)
        self.normalize = bool(params["normalize"])
        self.scale = np.float32(params["lambda"])
        self.scaled = float(params["lambda"]) != 1
        self.compiled: bool | None = None
        self.entries_merged = 0

    def _trims(self, whole: bool) -> tuple[Any, ...]:
        """The loop's arguments that say how each delta is trimmed: for the whole tensor, or for the next slice."""
        raise NotImplementedError

    def __call__(self, name: str, part: list[torch.Tensor]) -> torch.Tensor:
        """The next slice, merged in fp32."""
        base = part[self.base_index].contiguous()
        if self.compiled is None:  # decided on the first slice, kept for the rest (with_torch counts its own way)
            self.compiled = _available()
        if not self.compiled:
            return self.with_torch(name, part)
        merged = torch.empty_like(base)
        try:
            self._merge([base, *(part[i].contiguous() for i in self.others)], merged, whole=False)
        except LoopsFailed:
            if self.entries_merged:  # a loop that has compiled runs: a failure is not numba's
                raise
            self.compiled = False
            return self.with_torch(name, part)
        self.entries_merged += base.numel()
        return merged

    def fill(self, inputs: Sequence[torch.Tensor], out: torch.Tensor) -> bool:
        """stream.Filling: the whole tensor from its inputs as stored (read by the loops: `fusable`, checked before
        this was made), straight into the output."""
        if not (_available() and out.dtype in FUSED_DTYPES and out.is_contiguous()):
            return False
        try:
            return self._merge([inputs[self.base_index], *(inputs[i] for i in self.others)], out, whole=True)
        except LoopsFailed:
            return False

    def _merge(self, tensors: list[torch.Tensor], out: torch.Tensor, whole: bool) -> bool:
        base, *others = (_as_array(t) for t in tensors)
        trims = self._trims(whole)
        settings = (self.weights, self.normalize, self.scale, self.scaled)
        return bool(_run(self.LOOP, base, tuple(others), *trims, *settings, _as_array(out), _largest(out.dtype)))


class FusedTiesSlices(_FusedMerge):
    """TIES: each delta trimmed by its mask (None: kept whole), `SlicedMagnitudeMask.keep`'s trim."""

    LOOP = "ties_merge"

    def __init__(
        self,
        params: Mapping[str, Any],
        base_index: int,
        others: Sequence[int],
        masks: Sequence[SlicedMagnitudeMask | None],
        with_torch: Callable[[str, list[torch.Tensor]], torch.Tensor],
    ):
        super().__init__(params, base_index, others, with_torch)
        # a mask that keeps everything: every magnitude is above -inf (NaN ones too: NaN x 1 and NaN x 0 are NaN)
        self.thresholds = np.array([-np.inf if m is None else float(m.threshold) for m in masks], dtype=np.float32)
        self.ties_left = np.array([0 if m is None else m.ties_left for m in masks], dtype=np.int64)

    def _trims(self, whole: bool) -> tuple[Any, ...]:
        # the ties at the thresholds: counted down from slice to slice, from the start for the whole tensor
        return self.thresholds, self.ties_left.copy() if whole else self.ties_left


class DrawnTrim:
    """One delta's DARE trim drawn by `draw_dare_trims`: its kept entries' bits over the whole tensor (entry e in bit
    e % 8 of byte e // 8) and, for the rescale, fp64 partial sums of its magnitudes and of its kept magnitudes (each
    over 128K entries in order; the caller adds them exactly)."""

    def __init__(self, packed: np.ndarray, before: list[float], after: list[float]):
        self.packed, self.before, self.after = packed, before, after


def draw_dare_trims(
    base: torch.Tensor, others: Sequence[torch.Tensor], densities: Sequence[float], rescale: bool
) -> list[DrawnTrim]:
    """Each of `others`' deltas from `base` (stored tensors: `fusable`) trimmed as `kernels._drawn_trims` trims it
    for DARE, in the same order: one draw from torch's default generator per entry, delta after delta, each entry
    kept where its draw is below the delta's density; the generator left where torch's draws leave it. Raises
    LoopsFailed (nothing drawn) where the loops cannot run."""
    if not _draws_as_torch():
        raise LoopsFailed("the compiled draws differ from this torch's")
    entries = base.numel()
    sums = -(-entries // (_loops().BLOCK * _loops().SUM_BLOCKS)) if rescale else 0
    trims = []
    with _GeneratorState(torch.default_generator) as (words, place):
        for other, density in zip(others, densities):
            packed = np.empty(-(-entries // 8), dtype=np.uint8)
            before, after = np.zeros(sums), np.zeros(sums)
            _run(
                "draw_trim", _as_array(base), _as_array(other), words, place, np.float32(density), packed, before, after
            )
            trims.append(DrawnTrim(packed, before.tolist(), after.tolist()))
    return trims


class FusedDrawnSlices(_FusedMerge):
    """DARE: each delta trimmed by its drawn mask and multiplied by its rescale factor (None: unscaled), then TIES's
    consensus (dare_ties) or, `divisor` given, the deltas' sum normalized by it (dare_linear), as
    `kernels._task_arithmetic_family` does with the same trims."""

    LOOP = "drawn_merge"

    def __init__(
        self,
        params: Mapping[str, Any],
        base_index: int,
        others: Sequence[int],
        trims: Sequence[DrawnTrim],
        rescales: Sequence[torch.Tensor | None],
        with_torch: Callable[[str, list[torch.Tensor]], torch.Tensor],
        divisor: torch.Tensor | None = None,
    ):
        """divisor: dare_linear's (the weights' sum as `_task_arithmetic_family` takes it); None: dare_ties."""
        super().__init__(params, base_index, others, with_torch)
        self.packed = tuple(trim.packed for trim in trims)
        self.rescales = np.array([1 if r is None else float(r) for r in rescales], dtype=np.float32)
        self.consensus = divisor is None
        self.divisor = np.float32(1 if divisor is None else float(divisor))

    def _trims(self, whole: bool) -> tuple[Any, ...]:
        return self.packed, 0 if whole else self.entries_merged, self.rescales, self.consensus, self.divisor


def keep_drawn(probability: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """sparsify.bernoulli_keep (the same mask, torch's default generator left in the same state), its draws made by
    the compiled loops on the CPU: torch draws one uniform at a time through its generator's lock (~6 ns an entry on
    an AVX2 core, plus ~1.3 ns for the comparison), the loops ~0.8 ns (benchmarks/README.md, throughput). Elsewhere,
    where the loops are off, or where this torch's generator does not draw as `_draws_as_torch` found torch 2.13's
    to: torch's draws. The caller draws on one thread at a time (the stream's DRAWING_METHODS): see
    `_GeneratorState`."""
    if like.device.type != "cpu" or not (_available() and _draws_as_torch()):
        return bernoulli_keep(probability, like)
    below = np.float32(probability) if not isinstance(probability, torch.Tensor) else _probabilities(probability, like)
    try:
        return _drawn(torch.default_generator, below, like.shape)
    except LoopsFailed:
        return bernoulli_keep(probability, like)


def _probabilities(probability: torch.Tensor, like: torch.Tensor) -> np.ndarray:
    return probability.to(torch.float32).expand(like.shape).contiguous().reshape(-1).numpy()


# torch's CPU generator state (`get_state`, 5056 bytes: its legacy layout): the countdown to mt19937's next twist
# (int32 at 8), the index of its next word (uint64 at 16), its 624 words (each a uint64, from 24).
_STATE_BYTES, _LEFT_AT, _NEXT_AT, _WORDS_AT = 5056, 8, 16, 24


class _GeneratorState:
    """A CPU generator's mt19937 state as the loops take it, (its 624 words, [left, next]), written back into the
    generator when the block ends without an exception (one that ends it draws nothing from the generator). Not a
    lock: what another thread draws from the generator meanwhile repeats the loops' draws and its advance is
    overwritten (torch's own draws hold the generator's mutex); splice draws on one thread, in the plan's order."""

    def __init__(self, generator: torch.Generator):
        if generator is torch.default_generator:
            my_turn()  # the tensors computed on other threads draw in the plan's order
        self.generator = generator
        self.raw = generator.get_state()
        packed = self.raw.numpy()
        self.words_stored = packed[_WORDS_AT : _WORDS_AT + 624 * 8].view(np.uint64)
        self.left, self.next = (
            packed[_LEFT_AT : _LEFT_AT + 4].view(np.int32),
            packed[_NEXT_AT : _NEXT_AT + 8].view(np.uint64),
        )
        self.words = self.words_stored.astype(np.uint32)
        self.place = np.array([self.left[0], self.next[0]], dtype=np.int64)

    def __enter__(self) -> tuple[np.ndarray, np.ndarray]:
        return self.words, self.place

    def __exit__(self, kind: object, *_: object) -> None:
        if kind is None:
            self.words_stored[:] = self.words
            self.left[0], self.next[0] = self.place
            self.generator.set_state(self.raw)


def _drawn(generator: torch.Generator, below: np.float32 | np.ndarray, shape: torch.Size) -> torch.Tensor:
    kept = np.empty(shape.numel(), dtype=np.bool_)
    with _GeneratorState(generator) as (words, place):
        _run("draw_below", words, place, below, kept)
    return torch.from_numpy(kept).view(shape)


@functools.cache
def _draws_as_torch() -> bool:
    """Whether the loops draw what this torch draws, and leave its generator where torch leaves it: checked once,
    on a generator of its own, over a stretch that crosses mt19937's twists, with one probability and with one per
    entry (a torch whose generator or state layout changed: torch's draws are used)."""
    ours, theirs = torch.Generator().manual_seed(20261207), torch.Generator().manual_seed(20261207)
    if ours.get_state().numel() != _STATE_BYTES:
        return False
    try:
        probabilities = torch.linspace(0, 1, 1500)
        for below in (np.float32(0.3), probabilities.numpy()):
            drawn = _drawn(ours, below, torch.Size([1500]))
            expected = torch.empty(1500).uniform_(generator=theirs) < torch.as_tensor(below)
            if not (torch.equal(drawn, expected) and torch.equal(ours.get_state(), theirs.get_state())):
                log.debug("the compiled draws differ from this torch's: torch draws")
                return False
    except LoopsFailed:
        return False
    return True


def _largest(dtype: torch.dtype) -> np.float32:
    return np.float32(torch.finfo(dtype).max)


@functools.cache
def _loops() -> Any:
    """The compiled loops' module, or None where numba cannot be imported or SPLICE_NUMBA=0 says not to (torch's
    operations do the work)."""
    if os.environ.get("SPLICE_NUMBA") == "0":
        return None
    try:
        from splice.merge import fused_loops
    except (ImportError, RuntimeError):  # numba missing, not for this numpy, its JIT disabled; no cache directory
        return None
    return fused_loops
