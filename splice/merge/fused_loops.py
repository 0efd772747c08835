"""The loops `splice.merge.fused` runs, compiled by numba (imported only through it). Every float here is fp32:
numba would widen a Python float constant to fp64, so constants are np.float32. error_model="numpy": a division by
zero gives IEEE's result, not a check per entry (which kept LLVM from vectorizing the loop)."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import config, njit, types
from numba.core.errors import NumbaError
from numba.extending import intrinsic, overload

from splice.sparsify import INF_BITS

if config.DISABLE_JIT:  # the loops would run as Python, on numba's intrinsics that then do nothing
    raise ImportError("numba's JIT is disabled (NUMBA_DISABLE_JIT)")

COMPILE_ERRORS = (NumbaError, OSError)
"""What a first call can raise where numba cannot compile a loop or write it to its cache."""

BLOCK = 1024
"""Entries a loop takes a block at a time: each delta's block, their sum and the merge's accumulators stay in L1."""
ZERO = np.float32(0)
ONE = np.float32(1)


@intrinsic
def _float_bits(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def _bits_float(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


def widened(values, i):
    """values[i] in fp32: a bf16 (held as its uint16 bits) widened exactly, an fp32 as it is."""


@overload(widened)
def _widened(values, i):
    if values.dtype == types.uint16:
        return lambda values, i: _bits_float(np.int32(values[i]) << 16)
    if values.dtype == types.float32:
        return lambda values, i: values[i]
    return None


def stored(values, i, value):
    """values[i] = value (fp32): rounded to the nearest bf16, ties to even, where values holds bf16 bits (as torch
    rounds a finite value or an infinity; where a NaN is stored the caller is told, `outside`, and discards the
    output), as it is into fp32."""


@overload(stored)
def _stored(values, i, value):
    if values.dtype == types.uint16:

        def to_bf16(values, i, value):
            bits = np.uint32(_float_bits(value))
            values[i] = np.uint16(
                (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            )

        return to_bf16
    if values.dtype == types.float32:

        def as_it_is(values, i, value):
            values[i] = value

        return as_it_is
    return None


@njit(nogil=True, cache=True, error_model="numpy", inline="always")
def outside(value, largest):
    """1 where an fp32 value is NaN or beyond +-largest, else 0 (no branch: a loop of them vectorizes)."""
    return np.int32(abs(value) > largest) | np.int32(value != value)


@njit(nogil=True, cache=True, error_model="numpy")
def count_high_halves(base, other, counts):
    """counts[h] += how many |other - base| have h as the high half of their fp32 bits; False at a NaN. A block's
    halves are computed first (a loop LLVM vectorizes), then counted."""
    halves = np.empty(BLOCK, dtype=np.int32)
    nan = np.int32(0)
    for start in range(0, base.shape[0], BLOCK):
        size = min(BLOCK, base.shape[0] - start)
        b, o = base[start : start + size], other[start : start + size]
        for i in range(size):
            bits = _float_bits(abs(widened(o, i) - widened(b, i)))
            nan |= np.int32(bits > INF_BITS)
            halves[i] = bits >> 16
        for i in range(size):
            counts[halves[i]] += 1
    return nan == 0


@njit(nogil=True, cache=True, error_model="numpy")
def count_low_halves(base, other, high_half, counts):
    """counts[l] += how many |other - base| have high_half and l as the halves of their fp32 bits. A block's low
    halves in that high half are gathered first, without a branch (one taken at random is mispredicted), then
    counted."""
    high = np.int32(high_half)
    lows = np.empty(BLOCK, dtype=np.int32)
    for start in range(0, base.shape[0], BLOCK):
        size = min(BLOCK, base.shape[0] - start)
        b, o = base[start : start + size], other[start : start + size]
        found = 0
        for i in range(size):
            bits = _float_bits(abs(widened(o, i) - widened(b, i)))
            lows[found] = bits & 0xFFFF
            found += bits >> 16 == high
        for i in range(found):
            counts[lows[i]] += 1


@njit(nogil=True, cache=True, error_model="numpy")
def ties_merge(base, others, thresholds, ties_left, weights, normalize, scale, scaled, out, largest):
    """TIES on entries in order, in fp32 (read from bf16 or fp32, stored into bf16 or fp32): each delta kept where
    its magnitude is above its threshold, or equal to it while ties_left (counted down) lasts, weighted; the sign of
    their sum elected; the deltas of that sign summed (and divided by their weights' sum if normalize, scaled if
    scaled) onto the base. Written without branches on the entries' values, block by block, so that LLVM vectorizes
    every loop. Whether every value fits +-largest."""
    count = len(others)
    deltas = np.empty((count, BLOCK), dtype=np.float32)
    total = np.empty(BLOCK, dtype=np.float32)  # three arrays, not rows of one: LLVM then knows they do not overlap
    merged = np.empty(BLOCK, dtype=np.float32)
    divisor = np.empty(BLOCK, dtype=np.float32)
    misfits = np.int32(0)
    for start in range(0, base.shape[0], BLOCK):
        size = min(BLOCK, base.shape[0] - start)
        b = base[start : start + size]
        for j in range(count):
            _trim_and_weigh(others[j][start : start + size], b, thresholds, ties_left, j, weights[j], deltas[j])
        first = deltas[0]
        for i in range(size):  # explicit loops: numba's slice assignments are not vectorized
            total[i] = first[i]
        for j in range(1, count):
            delta = deltas[j]
            for i in range(size):
                total[i] = total[i] + delta[i]
        for i in range(size):
            merged[i] = ZERO
            divisor[i] = ZERO
        for j in range(count):
            delta, weight = deltas[j], weights[j]
            for i in range(size):
                agrees = ONE if ((delta[i] > ZERO) == (total[i] >= ZERO)) & (delta[i] != ZERO) else ZERO
                merged[i] = merged[i] + delta[i] * agrees
                divisor[i] = divisor[i] + weight * agrees
        if normalize:  # the conditions out of the loops: with them inside, LLVM left the loop scalar
            for i in range(size):
                merged[i] = merged[i] / (divisor[i] + (ONE if divisor[i] == ZERO else ZERO))
        if scaled:
            for i in range(size):
                merged[i] = merged[i] * scale
        block = out[start : start + size]
        for i in range(size):
            value = widened(b, i) + merged[i]
            misfits |= outside(value, largest)
            stored(block, i, value)
    return misfits == 0


@njit(nogil=True, cache=True, error_model="numpy", inline="always")
def _trim_and_weigh(other, base, thresholds, ties_left, j, weight, into):
    """into[:n] = (other - base) where its magnitude is kept (else 0 x it), times weight."""
    threshold = thresholds[j]
    if ties_left[j] > 0:
        equal = 0
        for i in range(base.shape[0]):
            equal += abs(widened(other, i) - widened(base, i)) == threshold
        if equal > ties_left[j]:  # the ties run out in this block: kept in order
            for i in range(base.shape[0]):
                delta = widened(other, i) - widened(base, i)
                magnitude = abs(delta)
                keep = magnitude > threshold
                if magnitude == threshold and ties_left[j] > 0:
                    ties_left[j] -= 1
                    keep = True
                into[i] = (delta * (ONE if keep else ZERO)) * weight
            return
        ties_left[j] -= equal
        for i in range(base.shape[0]):
            delta = widened(other, i) - widened(base, i)
            into[i] = (delta * (ONE if abs(delta) >= threshold else ZERO)) * weight
        return
    for i in range(base.shape[0]):
        delta = widened(other, i) - widened(base, i)
        into[i] = (delta * (ONE if abs(delta) > threshold else ZERO)) * weight
