"""What every kind's extraction shares: tuned - base per tensor, read ahead, and what an extractor returns."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from splice.adapters.fingerprint import first_names
from splice.progress import NoProgress, Progress
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.stream import read_ahead


@dataclass
class Extracted:
    """What one kind's extractor found: the patch tensors, the base tensors they change, their settings."""

    tensors: dict[str, torch.Tensor]
    touched: list[str]  # base tensors the patch changes (fingerprinted)
    targets: list[str]  # what a user reads as "the targets": modules or tensors
    settings: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # what a user should know the patch leaves out


def deltas(
    base: Checkpoint, tuned: Checkpoint, device: torch.device | None = None, progress: Progress | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tuned - base in fp32) for every float tensor that changed, in storage order, read ahead.
    `progress` counts every float tensor compared (both sides' bytes), changed or not."""
    progress = progress or NoProgress()
    names = [name for name, info in base.tensors.items() if info.dtype.is_floating_point]
    reads = [((base, name, None), (tuned, name, None)) for name in names]
    progress.start(
        "comparing the fine-tune with its base",
        len(names),
        sum(base.tensors[name].nbytes + tuned.tensors[name].nbytes for name in names),
    )
    try:
        for position, (before, after) in read_ahead(reads, depth=2):
            name = names[position]
            delta = after.to(device=device, dtype=torch.float32) - before.to(device=device, dtype=torch.float32)
            if delta.any():
                yield name, delta
            progress.advance(1, base.tensors[name].nbytes + tuned.tensors[name].nbytes)
    finally:
        progress.finish()


def left_out_warnings(left_out: dict[str, str], patch: str, because: str, remedy: str) -> list[str]:
    """The one line that says which changed tensors a `patch` leaves out, why, and how to carry them; none if
    none."""
    if not left_out:
        return []
    return [
        f"{len(left_out)} changed tensors are not in the {patch}, {because} ({first_names(list(left_out))}); {remedy}"
    ]
