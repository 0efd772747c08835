"""The loops `splice.merge.fused` runs, compiled by numba (imported only through it). Every float here is fp32:
numba would widen a Python float constant to fp64, so constants are np.float32."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

INF_BITS = 0x7F800000
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


@njit(nogil=True, cache=True)
def count_high_halves(base, other, counts):
    """counts[h] += how many |other - base| have h as the high half of their fp32 bits; False at a NaN."""
    for i in range(base.shape[0]):
        bits = _float_bits(abs(widened(other, i) - widened(base, i)))
        if bits > INF_BITS:
            return False
        counts[bits >> 16] += 1
    return True


@njit(nogil=True, cache=True)
def count_low_halves(base, other, high_half, counts):
    """counts[l] += how many |other - base| have high_half and l as the halves of their fp32 bits."""
    high = np.int32(high_half)
    for i in range(base.shape[0]):
        bits = _float_bits(abs(widened(other, i) - widened(base, i)))
        counts[bits & 0xFFFF] += np.int64(bits >> 16 == high)  # no branch: a taken one is mispredicted at random


BLOCK = 1024
"""Entries merged a block at a time: each delta's block, their sum and the merge's two accumulators stay in L1."""


@njit(nogil=True, cache=True)
def ties_merge(base, others, thresholds, ties_left, weights, normalize, scale, scaled, out):
    """TIES on fp32 entries in order: each delta kept where its magnitude is above its threshold, or equal to it while
    ties_left (counted down) lasts, weighted; the sign of their sum elected; the deltas of that sign summed (and
    divided by their weights' sum if normalize, scaled if scaled) onto the base. Written without branches on the
    entries' values, block by block, so that LLVM vectorizes every loop."""
    count = len(others)
    deltas = np.empty((count, BLOCK), dtype=np.float32)
    total = np.empty(BLOCK, dtype=np.float32)
    merged = np.empty(BLOCK, dtype=np.float32)
    divisor = np.empty(BLOCK, dtype=np.float32)
    for start in range(0, base.shape[0], BLOCK):
        size = min(BLOCK, base.shape[0] - start)
        b = base[start : start + size]
        for j in range(count):
            _trim_and_weigh(others[j][start : start + size], b, thresholds, ties_left, j, weights[j], deltas[j])
        total[:size] = deltas[0, :size]
        for j in range(1, count):
            for i in range(size):
                total[i] = total[i] + deltas[j, i]
        merged[:size] = ZERO
        divisor[:size] = ZERO
        for j in range(count):
            weight = weights[j]
            for i in range(size):
                delta = deltas[j, i]
                agrees = ONE if (delta > ZERO) == (total[i] >= ZERO) and delta != ZERO else ZERO
                merged[i] = merged[i] + delta * agrees
                divisor[i] = divisor[i] + weight * agrees
        for i in range(size):
            share = divisor[i]
            share = share + (ONE if share == ZERO else ZERO)
            value = merged[i] / share if normalize else merged[i]
            value = value * scale if scaled else value
            out[start + i] = b[i] + value


@njit(nogil=True, cache=True, inline="always")
def _trim_and_weigh(other, base, thresholds, ties_left, j, weight, into):
    """into[:n] = (other - base) where its magnitude is kept (else 0 x it), times weight."""
    threshold = thresholds[j]
    if ties_left[j] > 0:
        equal = 0
        for i in range(base.shape[0]):
            equal += abs(other[i] - base[i]) == threshold
        if equal > ties_left[j]:  # the ties run out in this block: kept in order
            for i in range(base.shape[0]):
                delta = other[i] - base[i]
                magnitude = abs(delta)
                keep = magnitude > threshold
                if magnitude == threshold and ties_left[j] > 0:
                    ties_left[j] -= 1
                    keep = True
                into[i] = (delta * (ONE if keep else ZERO)) * weight
            return
        ties_left[j] -= equal
        for i in range(base.shape[0]):
            delta = other[i] - base[i]
            into[i] = (delta * (ONE if abs(delta) >= threshold else ZERO)) * weight
        return
    for i in range(base.shape[0]):
        delta = other[i] - base[i]
        into[i] = (delta * (ONE if abs(delta) > threshold else ZERO)) * weight
