"""TIES on the CPU as loops compiled by numba: what ~60 torch operations do to every entry, each a
pass over memory, done in one (benchmarks/README.md, throughput: per entry of a 3-model bf16 TIES, 24 -> 7.8 ns on
one core; a 3 x 1.6 GB bf16 TIES 13 -> 8 s).

The loops do what `kernels._ties_in_slices` does with torch, operation for operation, in fp32 (no fused
multiply-add, no reordering: numba leaves IEEE arithmetic as written), so the outputs are the same bit for bit
(tests/test_fused.py). They run with the GIL released, on the stream's compute threads. numba compiles them the first
time a process meets a new combination of dtypes and input count (seconds, then read from its cache in `__pycache__`
or the user's cache directory), so it is imported only when such a merge reaches the CPU: its import and LLVM cost a
process ~140 MB, which is why the soup, as fast without it, does not use it (nor dare_ties, whose time goes to its
draws from torch's generator: its merge compiled measured no faster).
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
from splice.sparsify import MAGNITUDE_HALF, SlicedMagnitudeMask

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


class FusedTiesSlices:
    """TIES's merge of a tensor's fp32 slices, in order, against each delta's mask (None: kept whole): what
    `kernels._task_arithmetic_family` computes with `sign_consensus` and trims by `SlicedMagnitudeMask.keep`."""

    def __init__(
        self,
        params: Mapping[str, Any],
        base_index: int,
        others: Sequence[int],
        masks: Sequence[SlicedMagnitudeMask | None],
        with_torch: Callable[[str, list[torch.Tensor]], torch.Tensor],
    ):
        """with_torch: the same merge of the slices by torch's operations (trimming by `masks`), for where the loops
        turn out not to run."""
        self.base_index, self.others, self.with_torch = base_index, list(others), with_torch
        # a mask that keeps everything: every magnitude is above -inf (NaN ones too: NaN x 1 and NaN x 0 are NaN)
        self.thresholds = np.array([-np.inf if m is None else float(m.threshold) for m in masks], dtype=np.float32)
        self.ties_left = np.array([0 if m is None else m.ties_left for m in masks], dtype=np.int64)
        self.weights = np.array([float(params["weight"][i]) for i in others], dtype=np.float32)
        self.normalize = bool(params["normalize"])
        self.scale = np.float32(params["lambda"])
        self.scaled = float(params["lambda"]) != 1
        self.compiled: bool | None = None
        self.slices_merged = 0

    def __call__(self, name: str, part: list[torch.Tensor]) -> torch.Tensor:
        """The next slice, merged in fp32 (the ties at the thresholds counted down from the last slice's)."""
        base = part[self.base_index].contiguous()
        if self.compiled is None:  # decided on the first slice, kept for the rest (the ties are counted down)
            self.compiled = _available()
        if not self.compiled:
            return self.with_torch(name, part)
        merged = torch.empty_like(base)
        try:
            self._merge([base, *(part[i].contiguous() for i in self.others)], merged, self.ties_left)
        except LoopsFailed:
            if self.slices_merged:  # a loop that has compiled runs: a failure is not numba's
                raise
            self.compiled = False
            return self.with_torch(name, part)
        self.slices_merged += 1
        return merged

    def fill(self, inputs: Sequence[torch.Tensor], out: torch.Tensor) -> bool:
        """stream.Filling: the whole tensor from its inputs as stored (read by the loops: `fusable`, checked before
        this was made), straight into the output."""
        if not (_available() and out.dtype in FUSED_DTYPES and out.is_contiguous()):
            return False
        try:
            return self._merge([inputs[self.base_index], *(inputs[i] for i in self.others)], out, self.ties_left.copy())
        except LoopsFailed:
            return False

    def _merge(self, tensors: list[torch.Tensor], out: torch.Tensor, ties_left: np.ndarray) -> bool:
        base, *others = (_as_array(t) for t in tensors)
        return bool(
            _run(
                "ties_merge",
                base,
                tuple(others),
                self.thresholds,
                ties_left,
                self.weights,
                self.normalize,
                self.scale,
                self.scaled,
                _as_array(out),
                _largest(out.dtype),
            )
        )


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
