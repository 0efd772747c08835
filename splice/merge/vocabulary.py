"""Vocabulary alignment: every input's embedding and LM-head rows put in the output vocabulary's order, so each merge
method sees tensors of one shape, row r of every input meaning the same token.

Each input is viewed through a `DerivedCheckpoint`: its vocabulary tensors are read, a block of rows at a time, from
the rows of the tokens it has. A token it lacks (or whose row a setting forces) gets mergekit's fallback, the same
row for every input that needs it: the row a `tokenizer.tokens` setting names; else the one input that has the
token; else the base model's; else the average of the inputs that have it (zeros if none has it). Rows past the
tokens (padding) keep the input's own padding row where it has one there (Qwen2.5's 152064 rows for 151665
tokens); else they hold the mean of its token rows, as mergekit pads to `pad_to_multiple_of`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from splice.options import CHUNK_BYTES
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.views import DerivedCheckpoint, DeriveTensor

log = logging.getLogger(__name__)

RowRef = tuple[int, int]
"""(input index, row of that input's tensor)."""

Fallback = tuple[RowRef, ...]
"""The rows averaged into one output row an input lacks; () for zeros."""

_GAP = 16  # rows between two needed rows read through rather than read apart


@dataclass(frozen=True)
class Vocabulary:
    """One input's tokens and the number of rows of its vocabulary tensors."""

    tokens: Mapping[str, int]  # token -> row, only rows < `rows`
    rows: int


@dataclass(frozen=True)
class RowPlan:
    """Where the output rows of every input's vocabulary tensors come from."""

    rows: int  # output rows
    own: torch.Tensor  # int64 [inputs, rows]: the input's own row, or -1
    fallbacks: Mapping[int, Fallback]  # output row -> its shared fallback, for the inputs whose own row is -1
    padded: torch.Tensor  # bool [inputs, rows]: filled with the mean of the input's token rows
    token_rows: torch.Tensor  # int64: the output rows that hold a token (what that mean is over)

    def is_identity(self, index: int, input_rows: int) -> bool:
        """Whether input `index` is already in the output's order (nothing to derive)."""
        return (
            input_rows == self.rows
            and not bool(self.padded[index].any())
            and torch.equal(self.own[index], torch.arange(self.rows))
        )


def plan_rows(
    out_tokens: Mapping[str, int],
    rows: int,
    vocabularies: Sequence[Vocabulary],
    base_index: int | None,
    chosen: Mapping[str, tuple[Fallback, bool]],
) -> RowPlan:
    """The row plan of an output vocabulary (`out_tokens`, over `rows` rows) for the inputs' `vocabularies`.

    `chosen`: token -> (its fallback, force) from the recipe's token settings, used instead of the default
    fallback; `force` gives every input that row, also those that have the token. `base_index`: the input whose
    row a token some inputs lack takes, when that input has it (None: no base)."""
    count = len(vocabularies)
    tokens = list(out_tokens)
    out_rows = torch.tensor([out_tokens[t] for t in tokens], dtype=torch.int64)
    theirs = torch.tensor([[v.tokens.get(t, -1) for t in tokens] for v in vocabularies], dtype=torch.int64)
    own = torch.full((count, rows), -1, dtype=torch.int64)
    own[:, out_rows] = theirs
    lacking = (theirs < 0).any(dim=0).tolist()
    fallbacks: dict[int, Fallback] = {}
    unseen: list[str] = []
    for position, token in enumerate(tokens):
        fallback, force = chosen.get(token, (None, False))
        if not (lacking[position] or force):
            continue
        column = theirs[:, position].tolist()
        present = [i for i in range(count) if column[i] >= 0]
        if fallback is None:
            fallback = default_fallback(present, column, base_index)
            if not fallback:
                unseen.append(token)
        row = out_tokens[token]
        fallbacks[row] = fallback
        if force:
            own[:, row] = -1
    if unseen:
        log.warning("%d tokens are in no input (%r, ...): their rows are zeros", len(unseen), unseen[0])
    token_rows = torch.tensor(sorted(out_tokens.values()), dtype=torch.int64)
    padded = torch.ones((count, rows), dtype=torch.bool)
    padded[:, token_rows] = False
    for index, vocabulary in enumerate(vocabularies):
        # a padding row the input has, and no token of its own sits in, stays its own
        free = torch.zeros(rows, dtype=torch.bool)
        free[: min(rows, vocabulary.rows)] = True
        taken = torch.tensor([r for r in vocabulary.tokens.values() if r < rows], dtype=torch.int64)
        free[taken] = False
        kept = padded[index] & free
        own[index, kept] = torch.arange(rows)[kept]
        padded[index] &= ~kept
    return RowPlan(rows, own, fallbacks, padded, token_rows)


def default_fallback(present: Sequence[int], rows: Sequence[int], base_index: int | None) -> Fallback:
    """mergekit's fallback for a token only the inputs `present` have (at `rows[i]` in input i): the one that has it,
    else the base's row, else the average of those that have it; zeros when none has it."""
    if len(present) == 1:
        return ((present[0], rows[present[0]]),)
    if base_index is not None and base_index in present:
        return ((base_index, rows[base_index]),)
    return tuple((i, rows[i]) for i in present)


def aligned_checkpoints(
    checkpoints: Sequence[Checkpoint], names: Sequence[Sequence[str]], plan: RowPlan
) -> list[Checkpoint]:
    """Each input seen in the output's row order: its vocabulary tensors `names[i]` derived, the rest its own."""
    aligner = _Aligner(checkpoints, plan)
    views: list[Checkpoint] = []
    for index, (checkpoint, tensor_names) in enumerate(zip(checkpoints, names)):
        infos = {name: checkpoint.tensors[name] for name in tensor_names}
        if all(plan.is_identity(index, info.shape[0]) for info in infos.values()):
            views.append(checkpoint)
            continue
        derived = {name: replace(info, shape=(plan.rows, *info.shape[1:])) for name, info in infos.items()}
        views.append(DerivedCheckpoint(checkpoint, derived, aligner.reader(index)))
    return views


def gather_rows(checkpoint: Checkpoint, name: str, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` (any order, repeats allowed) of a stored tensor, read as a few contiguous row ranges."""
    unique, inverse = torch.unique(rows, return_inverse=True)
    starts = [0, *(torch.nonzero(unique.diff() > _GAP).flatten() + 1).tolist()]
    stops = [*starts[1:], len(unique)]
    values = unique.tolist()
    firsts = [values[start] for start in starts]
    spans = [values[stop - 1] + 1 - first for first, stop in zip(firsts, stops)]
    read = torch.cat([checkpoint.read(name, (first, first + span)) for first, span in zip(firsts, spans)])
    # where each unique row sits in `read`: its offset in its range, plus the rows read before that range
    ranges = torch.repeat_interleave(torch.arange(len(starts)), torch.tensor(stops) - torch.tensor(starts))
    before = torch.tensor([0, *spans[:-1]]).cumsum(0)
    return read[(unique - torch.tensor(firsts)[ranges] + before[ranges])[inverse]]


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Aligner:
    """Computes blocks of aligned rows for every input of one plan; a block's shared fallback rows are computed once
    for all inputs (the stream reads one tensor of every input in a row), a padding mean once per input."""

    def __init__(self, checkpoints: Sequence[Checkpoint], plan: RowPlan):
        self.checkpoints = checkpoints
        self.plan = plan
        self.fallback_rows = torch.tensor(sorted(plan.fallbacks), dtype=torch.int64)
        self._lock = threading.Lock()
        self._last_fallbacks: tuple[tuple[str, int, int], dict[int, torch.Tensor]] | None = None
        self._means: dict[tuple[int, str], torch.Tensor] = {}

    def reader(self, index: int) -> DeriveTensor:
        def derive(name: str, rows: tuple[int, int] | None) -> torch.Tensor:
            start, stop = rows or (0, self.plan.rows)
            return self.block(index, name, start, stop, with_padding=True)

        return derive

    def block(self, index: int, name: str, start: int, stop: int, with_padding: bool) -> torch.Tensor:
        info = self.checkpoints[index].tensors[name]
        out = torch.zeros((stop - start, *info.shape[1:]), dtype=info.dtype)
        own = self.plan.own[index, start:stop]
        mine = own >= 0
        if bool(mine.any()):
            out[mine] = gather_rows(self.checkpoints[index], name, own[mine])
        needing = torch.nonzero(~mine & ~self.plan.padded[index, start:stop]).flatten()
        if len(needing):
            shared = self.fallbacks(name, start, stop)
            for offset in needing.tolist():
                out[offset] = shared[start + offset].to(info.dtype)
        if with_padding:
            pads = self.plan.padded[index, start:stop]
            if bool(pads.any()):
                out[pads] = self.padding_mean(index, name).to(info.dtype)
        return out

    def fallbacks(self, name: str, start: int, stop: int) -> dict[int, torch.Tensor]:
        """Output row -> its fallback row's value (in the working precision), for the fallback rows in the block."""
        key = (name, start, stop)
        with self._lock:
            if self._last_fallbacks is not None and self._last_fallbacks[0] == key:
                return self._last_fallbacks[1]
        inside = self.fallback_rows[(self.fallback_rows >= start) & (self.fallback_rows < stop)].tolist()
        wanted: dict[int, list[int]] = {}
        for row in inside:
            for source, source_row in self.plan.fallbacks[row]:
                wanted.setdefault(source, []).append(source_row)
        read = {
            source: dict(zip(rows, gather_rows(self.checkpoints[source], name, torch.tensor(rows))))
            for source, rows in wanted.items()
        }
        info = self.checkpoints[0].tensors[name]
        dtype = _working_dtype(info.dtype)
        values = {}
        for row in inside:
            parts = self.plan.fallbacks[row]
            # mergekit's order: added one by one onto zeros, then divided by the count
            value = torch.zeros(info.shape[1:], dtype=dtype)
            for source, source_row in parts:
                value = value + read[source][source_row].to(dtype)
            values[row] = value / len(parts) if len(parts) > 1 else value
        with self._lock:
            self._last_fallbacks = (key, values)
        return values

    def padding_mean(self, index: int, name: str) -> torch.Tensor:
        """The mean of an input's aligned token rows, read a block at a time."""
        with self._lock:
            cached = self._means.get((index, name))
        if cached is not None:
            return cached
        info = self.checkpoints[index].tensors[name]
        row_bytes = max(1, info.nbytes // max(1, info.shape[0]))
        step = max(1, CHUNK_BYTES // row_bytes)
        token_rows = self.plan.token_rows
        total = torch.zeros(info.shape[1:], dtype=torch.float64)
        for start in range(0, self.plan.rows, step):
            stop = min(start + step, self.plan.rows)
            block = self.block(index, name, start, stop, with_padding=False)
            inside = token_rows[(token_rows >= start) & (token_rows < stop)] - start
            total += block[inside].to(torch.float64).sum(dim=0)
        mean = (total / max(1, len(token_rows))).to(_working_dtype(info.dtype))
        with self._lock:
            self._means[(index, name)] = mean
        return mean
