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
    sums = _scratch()
    misfits = np.int32(0)
    for start in range(0, base.shape[0], BLOCK):
        size = min(BLOCK, base.shape[0] - start)
        b = base[start : start + size]
        for j in range(count):
            _trim_and_weigh(others[j][start : start + size], b, thresholds, ties_left, j, weights[j], deltas[j])
        misfits |= _elect_and_add(
            deltas, size, weights, normalize, scale, scaled, b, out[start : start + size], sums, largest
        )
    return misfits == 0


@njit(nogil=True, cache=True, inline="always")
def _scratch():
    """Three blocks of fp32 scratch, as three arrays, not rows of one: LLVM then knows they do not overlap."""
    return np.empty(BLOCK, dtype=np.float32), np.empty(BLOCK, dtype=np.float32), np.empty(BLOCK, dtype=np.float32)


@njit(nogil=True, cache=True, error_model="numpy", inline="always")
def _elect_and_add(deltas, size, weights, normalize, scale, scaled, base, out, sums, largest):
    """TIES's sign consensus over a block of trimmed, weighted deltas (the rows of `deltas`), added onto the base
    into out: 1 where a value does not fit +-largest, else 0. sums: three arrays of a block's scratch."""
    total, merged, divisor = sums
    _summed(deltas, size, total)
    for i in range(size):
        merged[i] = ZERO
        divisor[i] = ZERO
    for j in range(deltas.shape[0]):
        delta, weight = deltas[j], weights[j]
        for i in range(size):
            agrees = ONE if ((delta[i] > ZERO) == (total[i] >= ZERO)) & (delta[i] != ZERO) else ZERO
            merged[i] = merged[i] + delta[i] * agrees
            divisor[i] = divisor[i] + weight * agrees
    if normalize:  # the conditions out of the loops: with them inside, LLVM left the loop scalar
        for i in range(size):
            merged[i] = merged[i] / (divisor[i] + (ONE if divisor[i] == ZERO else ZERO))
    return _scaled_onto_base(merged, size, scale, scaled, base, out, largest)


@njit(nogil=True, cache=True, error_model="numpy", inline="always")
def _summed(deltas, size, total):
    """total[:size] = the rows of `deltas` summed in order."""
    first = deltas[0]
    for i in range(size):  # explicit loops: numba's slice assignments are not vectorized
        total[i] = first[i]
    for j in range(1, deltas.shape[0]):
        delta = deltas[j]
        for i in range(size):
            total[i] = total[i] + delta[i]


@njit(nogil=True, cache=True, error_model="numpy", inline="always")
def _scaled_onto_base(merged, size, scale, scaled, base, out, largest):
    """out = base + merged (times scale if scaled), stored in out's dtype: 1 where a value does not fit +-largest."""
    if scaled:
        for i in range(size):
            merged[i] = merged[i] * scale
    misfits = np.int32(0)
    for i in range(size):
        value = widened(base, i) + merged[i]
        misfits |= outside(value, largest)
        stored(out, i, value)
    return misfits


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


# --- torch's CPU generator: mt19937, and its uniform floats -----------------------------------------------------------

STATE_WORDS = 624  # mt19937's state, as torch's engine keeps it
SHIFT_WORDS = 397
UNIFORM_BITS = np.uint32((1 << 24) - 1)  # torch's uniform float in [0, 1): a draw's low 24 bits times 2^-24
UNIFORM_STEP = np.float32(2.0**-24)


def window(probability, start, size):
    """The probabilities of entries start..start+size: a view of an array, or the one value for all."""


@overload(window)
def _window(probability, start, size):
    if isinstance(probability, types.Array):
        return lambda probability, start, size: probability[start : start + size]
    return lambda probability, start, size: probability


def entry(probability, i):
    """probability[i] of a window, or the one value."""


@overload(entry)
def _entry(probability, i):
    if isinstance(probability, types.Array):
        return lambda probability, i: probability[i]
    return lambda probability, i: probability


@njit(nogil=True, cache=True, error_model="numpy", inline="always")
def _twisted(state):
    """mt19937's next state, in place."""
    upper, lower, matrix = np.uint32(0x80000000), np.uint32(0x7FFFFFFF), np.uint32(0x9908B0DF)
    for k in range(STATE_WORDS - SHIFT_WORDS):
        y = (state[k] & upper) | (state[k + 1] & lower)
        state[k] = state[k + SHIFT_WORDS] ^ (y >> np.uint32(1)) ^ (matrix * (state[k + 1] & np.uint32(1)))
    for k in range(STATE_WORDS - SHIFT_WORDS, STATE_WORDS - 1):
        y = (state[k] & upper) | (state[k + 1] & lower)
        state[k] = state[k + SHIFT_WORDS - STATE_WORDS] ^ (y >> np.uint32(1)) ^ (matrix * (state[k + 1] & np.uint32(1)))
    y = (state[STATE_WORDS - 1] & upper) | (state[0] & lower)
    last = state[SHIFT_WORDS - 1] ^ (y >> np.uint32(1)) ^ (matrix * (state[0] & np.uint32(1)))
    state[STATE_WORDS - 1] = last


@njit(nogil=True, cache=True, error_model="numpy")
def draw_below(state, place, probability, out):
    """out[i] = whether torch's next uniform float, drawn by its CPU generator, is below probability (one fp32
    value, or one per entry), for every entry in order: mt19937 as torch's engine runs it from `state` (its 624
    words) and `place` ([left, next], torch's countdown to the next twist and index of the next word), both left
    where torch's would be after as many draws. The state's words of a stretch tempered and compared in a loop LLVM
    vectorizes."""
    left, following = place[0], place[1]
    i = 0
    while i < out.shape[0]:
        left -= 1
        if left == 0:
            _twisted(state)
            left, following = STATE_WORDS, 0
        size = min(left, out.shape[0] - i)  # the words left in this state, the one just counted down included
        words, kept, below = state[following : following + size], out[i : i + size], window(probability, i, size)
        for j in range(size):
            y = words[j]
            y ^= y >> np.uint32(11)
            y ^= (y << np.uint32(7)) & np.uint32(0x9D2C5680)
            y ^= (y << np.uint32(15)) & np.uint32(0xEFC60000)
            y ^= y >> np.uint32(18)
            kept[j] = np.float32(y & UNIFORM_BITS) * UNIFORM_STEP < entry(below, j)
        following += size
        left -= size - 1
        i += size
    place[0], place[1] = left, following


# --- DARE: entries kept by draws from torch's generator, then TIES's consensus ----------------------------------------

SUM_BLOCKS = 128
"""Blocks whose magnitudes are summed into one fp64 partial sum (128K entries, as a slice of the torch path): the
caller adds the partial sums exactly."""
LANES = 8  # fp64 accumulators summed side by side (one chain would wait on each add)


@njit(nogil=True, cache=True, error_model="numpy")
def draw_trim(base, other, state, place, probability, packed, before, after):
    """DARE's trim of other - base: each entry kept where torch's next uniform draw (`draw_below`, in entry order)
    is below `probability`, the kept entries' bits packed into `packed` (entry e in bit e % 8 of byte e // 8). Where
    `before` has room (one fp64 per SUM_BLOCKS blocks), the sums of |other - base| over the entries and over the kept
    ones, for the rescale's L1 norms, in LANES fp64 sums side by side (the same order on every CPU)."""
    kept = np.zeros(BLOCK, dtype=np.bool_)
    magnitudes, kept_magnitudes, _ = _scratch()
    summed = before.shape[0] > 0
    lanes_before, lanes_after = np.zeros(LANES, dtype=np.float64), np.zeros(LANES, dtype=np.float64)
    for block, start in enumerate(range(0, base.shape[0], BLOCK)):  # BLOCK is a multiple of 8: a block starts a byte
        size = min(BLOCK, base.shape[0] - start)
        draw_below(state, place, probability, kept[:size])
        kept[size:] = False
        first = start >> 3
        for k in range((size + 7) >> 3):
            byte = np.uint8(0)
            for bit in range(8):
                byte |= np.uint8(kept[8 * k + bit]) << np.uint8(bit)
            packed[first + k] = byte
        if not summed:
            continue
        b, o = base[start : start + size], other[start : start + size]
        for i in range(size):
            magnitudes[i] = abs(widened(o, i) - widened(b, i))
        magnitudes[size:] = ZERO
        for i in range(BLOCK):
            kept_magnitudes[i] = magnitudes[i] * np.float32(kept[i])  # x 1 or x 0: exact, as torch's mask
        for group in range(0, BLOCK, LANES):
            for lane in range(LANES):
                lanes_before[lane] += np.float64(magnitudes[group + lane])
                lanes_after[lane] += np.float64(kept_magnitudes[group + lane])
        if (block + 1) % SUM_BLOCKS == 0 or start + size == base.shape[0]:
            before[block // SUM_BLOCKS], after[block // SUM_BLOCKS] = lanes_before.sum(), lanes_after.sum()
            lanes_before[:], lanes_after[:] = 0.0, 0.0


@njit(nogil=True, cache=True, error_model="numpy")
def drawn_merge(
    base, others, packed, offset, rescales, consensus, divisor, weights, normalize, scale, scaled, out, largest
):
    """DARE on entries in order, the first being the tensor's entry `offset`: each delta kept where its drawn mask
    (packed[j], as `draw_trim` packs it) holds a 1, then multiplied by rescales[j] (1: unscaled) and its weight; then
    with `consensus` TIES's sign election (dare_ties: `ties_merge`'s), else their sum divided by `divisor` if
    normalize (dare_linear), scaled, onto the base. Whether every value fits +-largest."""
    deltas = np.empty((len(others), BLOCK), dtype=np.float32)
    keep = np.empty(BLOCK, dtype=np.float32)
    sums = _scratch()
    misfits = np.int32(0)
    for start in range(0, base.shape[0], BLOCK):
        size = min(BLOCK, base.shape[0] - start)
        b = base[start : start + size]
        for j in range(len(others)):
            other, rescale, weight, into = others[j][start : start + size], rescales[j], weights[j], deltas[j]
            _unpacked(packed[j], offset + start, size, keep)
            for i in range(size):
                into[i] = (((widened(other, i) - widened(b, i)) * keep[i]) * rescale) * weight
        out_block = out[start : start + size]
        if consensus:
            misfits |= _elect_and_add(deltas, size, weights, normalize, scale, scaled, b, out_block, sums, largest)
        else:
            misfits |= _sum_and_add(deltas, size, normalize, divisor, scale, scaled, b, out_block, sums, largest)
    return misfits == 0


@njit(nogil=True, cache=True, error_model="numpy", inline="always")
def _sum_and_add(deltas, size, normalize, divisor, scale, scaled, base, out, sums, largest):
    """The deltas' sum in order (divided by `divisor` if normalize, scaled if scaled) onto the base into out: 1
    where a value does not fit +-largest, else 0."""
    total = sums[0]
    _summed(deltas, size, total)
    if normalize:
        for i in range(size):
            total[i] = total[i] / divisor
    return _scaled_onto_base(total, size, scale, scaled, base, out, largest)


@njit(nogil=True, cache=True, error_model="numpy", inline="always")
def _unpacked(bits, first, size, keep):
    """keep[:size] = the bits of entries first..first+size as fp32 1s and 0s (a byte at a time where first starts a
    byte: a loop LLVM vectorizes; entry by entry otherwise, as a slice of rows may start)."""
    if first & 7 == 0:
        whole = bits[first >> 3 : (first >> 3) + ((size + 7) >> 3)]
        for k in range(size >> 3):
            byte = whole[k]
            for bit in range(8):
                keep[8 * k + bit] = np.float32((byte >> np.uint8(bit)) & np.uint8(1))
        for i in range(size & ~7, size):
            keep[i] = np.float32((whole[i >> 3] >> np.uint8(i & 7)) & np.uint8(1))
        return
    for i in range(size):
        entry_at = first + i
        keep[i] = np.float32((bits[entry_at >> 3] >> (entry_at & 7)) & 1)
