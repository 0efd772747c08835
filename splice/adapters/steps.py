"""Steps: what a patch does to one base tensor, and how it composes with other patches' steps there.

A step says how it composes (`replace`, `add`, `multiply`) and computes the new value from the current
one. Patch tensors are read only when a step runs, so a streamed apply never holds a whole patch in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import Protocol

import torch

from splice.adapters.meta import PatchMeta
from splice.tensors.stream import Rows


class Effect(Enum):
    replace = "replace"  # the patch's value wins: composes with nothing else on the same tensor
    add = "add"  # value + something (delta, LoRA product, sparse delta)
    multiply = "multiply"  # value * something (a bare mask)


@dataclass(frozen=True)
class Step:
    effect: Effect
    shape: tuple[int, ...]  # the shape of the base tensor this step was made for
    # current value (fp32, on the compute device) -> new value; may update the value it is given in place
    compute: Callable[[torch.Tensor], torch.Tensor]
    # (rows a..b of the current value, (a, b)) -> those rows of the new value, as `compute` would give them; None
    # where a block of rows needs more of the tensor than the same rows
    compute_rows: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor] | None = None


class PatchContents(Protocol):
    """What a kind's steps read of a patch (a `Patch` is one); kinds sit below `patch.py`, so they name this."""

    tensors: Mapping[str, torch.Tensor]
    meta: PatchMeta

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]: ...


def replace_steps(patch: PatchContents) -> dict[str, Step]:
    """Every patch tensor replaces the base tensor of its name."""
    return {name: replace_step(patch, name) for name in patch.tensors}


def replace_step(patch: PatchContents, name: str) -> Step:
    """The patch tensor `name` replaces the base tensor of its name."""
    replaced = partial(_replaced, patch, name)
    return Step(Effect.replace, tuple(patch.shapes[name]), replaced, replaced)


def _replaced(patch: PatchContents, name: str, value: torch.Tensor, rows: Rows = None) -> torch.Tensor:
    return rows_of(patch.tensors[name], rows).to(value)


def add_steps(patch: PatchContents) -> dict[str, Step]:
    """Every patch tensor is added to the base tensor of its name."""
    steps = {}
    for name in patch.tensors:
        added = partial(_added, patch, name)
        steps[name] = Step(Effect.add, patch.shapes[name], added, added)
    return steps


def _added(patch: PatchContents, name: str, value: torch.Tensor, rows: Rows = None) -> torch.Tensor:
    return value + rows_of(patch.tensors[name], rows).to(value)


def rows_of(tensor: torch.Tensor, rows: Rows) -> torch.Tensor:
    """Rows a..b of dim 0 (all of them for None)."""
    return tensor if rows is None else tensor[rows[0] : rows[1]]
