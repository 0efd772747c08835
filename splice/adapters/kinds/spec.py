"""What a patch kind gives the rest of splice: its options, its extractor, its steps, its description."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from math import prod
from typing import Any

import torch

from splice.adapters.deltas import Extracted
from splice.adapters.steps import PatchContents, Step
from splice.progress import Progress
from splice.tensors.checkpoint import Checkpoint

Rescaler = Callable[[PatchContents, float], "tuple[Mapping[str, torch.Tensor], dict[str, Any]]"]
"""(patch, scale) -> the tensors and settings of the same kind whose additive change is `scale` times the patch's;
tensors the patch replaces whole are returned as they are (porting computes their new values)."""

Extractor = Callable[[Checkpoint, Checkpoint, Any, str, Progress | None], Extracted]
"""(base, tuned, the kind's options or None, device ("auto", "cpu", "cuda"), progress) -> what the patch holds."""


@dataclass(frozen=True)
class PatchSize:
    """What a patch holds: `values`, the numbers it stores (factors, deltas, norm values, a sparse delta's selected
    entries), and `mask_bits`, the entries its bit masks cover (one bit each, packed eight to a byte)."""

    values: int
    mask_bits: int = 0


def count_values(shapes: Mapping[str, Sequence[int]], settings: dict[str, Any]) -> PatchSize:
    """Every stored tensor's entries are values."""
    return PatchSize(sum(prod(shape) for shape in shapes.values()))


@dataclass(frozen=True)
class KindSpec:
    extract: Extractor
    steps: Callable[[PatchContents], dict[str, Step]]  # base tensor name -> the step the patch applies to it
    describe: Callable[[dict[str, Any]], str]  # the kind's settings in one readable line
    rescale: Rescaler  # what porting with --scale keeps of the patch
    options: type | None = None  # the kind's options (a dataclass), None when it takes none
    # (stored tensor shapes, settings) -> what the patch holds
    size: Callable[[Mapping[str, Sequence[int]], dict[str, Any]], PatchSize] = count_values
    # extract_patch's loose keywords that fill the options: keyword -> options field
    keywords: Mapping[str, str] = field(default_factory=dict)


def describe_plain(settings: dict[str, Any]) -> str:
    """Settings as `key=value`, tables summarised by their size; "none" when there are none."""
    return (
        ", ".join(
            f"{key}={value}" if not isinstance(value, dict | list) else f"{key}: {len(value)} entries"
            for key, value in settings.items()
        )
        or "none"
    )


class MappedTensors(Mapping[str, torch.Tensor]):
    """Patch tensors with the named ones computed when they are looked up (`transform(name, tensors)`), the rest
    as they are, so a rescaled or ported patch is never held whole in memory (`splice.adapters.lazy.LazyTensors`)."""

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        shapes: Mapping[str, tuple[int, ...]],
        transform: Callable[[str, Mapping[str, torch.Tensor]], torch.Tensor],
        names: set[str],
    ):
        self.tensors, self.transform, self.names = tensors, transform, names
        self.shapes = dict(shapes)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.transform(name, self.tensors) if name in self.names else self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def read_all(self) -> dict[str, torch.Tensor]:
        return dict(self)


def keep_as_is(patch: PatchContents, scale: float) -> tuple[Mapping[str, torch.Tensor], dict[str, Any]]:
    """For kinds whose every tensor replaces a base tensor: nothing to rescale."""
    return patch.tensors, dict(patch.meta.settings)


def scale_tensors(
    patch: PatchContents, scale: float, names: set[str]
) -> tuple[Mapping[str, torch.Tensor], dict[str, Any]]:
    """The named tensors multiplied by `scale` (in fp32 when they are), the others and the settings kept."""
    return (
        MappedTensors(patch.tensors, patch.shapes, lambda name, tensors: tensors[name] * scale, names),
        dict(patch.meta.settings),
    )
