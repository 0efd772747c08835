"""Sparse masks and sparse deltas: built from a fine-tune's delta, stored bit-packed, applied per tensor.

A mask patch holds, for each tensor it touches, `<name>.mask` (one bit per entry, packed eight to a
byte, entry 8i+j in bit j of byte i) and, for a sparse delta, `<name>.values` (the selected delta
entries in fp32, in index order). Applied, a sparse delta adds its values where the mask is set; a
mask alone prunes: entries outside it become zero.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from math import prod
from typing import Any

import torch

from splice.adapters.deltas import Extracted, deltas
from splice.adapters.kinds.spec import KindSpec, PatchSize, describe_plain, scale_tensors
from splice.adapters.steps import Effect, PatchContents, Step
from splice.errors import PatchError
from splice.progress import Progress
from splice.sparsify import pack_mask, top_magnitude_mask, unpack_mask
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.device import resolve_device

MASK_SUFFIX = ".mask"
VALUES_SUFFIX = ".values"
SCOPES = ("tensor", "model")


@dataclass(frozen=True)
class MaskOptions:
    """Keep the `density` share of entries per tensor or over the whole model (`scope`), with the selected
    delta values (a sparse delta) unless `values` is False (a mask alone)."""

    density: float | None = None
    scope: str = "tensor"
    values: bool = True

    def __post_init__(self) -> None:
        if self.density is None or not 0 < self.density <= 1:
            raise PatchError("a mask patch needs `density` in (0, 1], e.g. 0.01 to keep 1% of the entries")
        if self.scope not in SCOPES:
            raise PatchError(f"`mask_scope` must be one of {', '.join(SCOPES)}, not {self.scope!r}")


def sparse_entry(name: str, mask: torch.Tensor, values: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """One tensor's entries of a mask patch: its packed mask, and the `values` it selects (in index order) for a
    sparse delta."""
    entry = {name + MASK_SUFFIX: pack_mask(mask).cpu()}
    if values is not None:
        entry[name + VALUES_SUFFIX] = values.float().cpu()
    return entry


def _nonzero_top_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """The k = max(1, int(density * n)) largest |delta| entries, never an unchanged (zero) one."""
    keep = top_magnitude_mask(delta, density)
    keep = torch.ones_like(delta, dtype=torch.bool) if keep is None else keep
    return keep & delta.ne(0)


@dataclass
class ModelTopK:
    """The model-wide top `count` |delta| entries, found in one pass (`find`): those above `threshold`, then the
    first `ties` equal to it in storage order. `select` picks them out of each tensor's delta in a second pass, in
    storage order (it counts the ties down)."""

    threshold: float
    ties: int

    @classmethod
    def find(
        cls,
        base: Checkpoint,
        tuned: Checkpoint,
        count: int,
        device: torch.device,
        progress: Progress | None,
        among: Callable[[str], bool] = lambda name: True,
    ) -> ModelTopK:
        """Over the tensors `among` accepts; holds at most `count` magnitudes plus one tensor."""
        best = torch.empty(0, device=device)
        for name, delta in deltas(base, tuned, device, progress):
            if not among(name):
                continue
            magnitudes = delta.abs().reshape(-1)
            magnitudes = magnitudes[magnitudes.ne(0)]
            pool = torch.cat([best, magnitudes])
            best = pool if pool.numel() <= count else pool.topk(count, sorted=False).values
        if best.numel() == 0:
            return cls(0.0, 0)
        threshold = float(best.min())
        return cls(threshold, int(best.eq(threshold).sum()))

    def select(self, delta: torch.Tensor) -> torch.Tensor:
        """This tensor's entries of the top count (a boolean mask of its shape)."""
        magnitudes = delta.abs()
        mask = magnitudes.gt(self.threshold)
        at_threshold = magnitudes.eq(self.threshold).reshape(-1).nonzero().squeeze(1)
        if self.ties and self.threshold > 0 and at_threshold.numel():
            taken = at_threshold[: self.ties]
            mask.view(-1)[taken] = True
            self.ties -= taken.numel()
        return mask


def extract_mask(
    base: Checkpoint, tuned: Checkpoint, options: MaskOptions, device: str = "auto", progress: Progress | None = None
) -> Extracted:
    """Keep the `density` share of entries with the largest |tuned - base|: per tensor (`scope="tensor"`,
    k of each changed tensor) or over the whole model (`scope="model"`, k of all float entries, LT-SFT style).
    Ties at the threshold are kept lowest index (then storage order) first, so the result is deterministic."""
    density, scope, values = options.density, options.scope, options.values
    assert density is not None  # MaskOptions refuses None
    compute = resolve_device(device)
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    kept: dict[str, int] = {}
    if scope == "model":
        total = sum(info.numel for info in base.tensors.values() if info.dtype.is_floating_point)
        top = ModelTopK.find(base, tuned, max(1, int(density * total)), compute, progress)
    for name, delta in deltas(base, tuned, compute, progress):
        mask = _nonzero_top_mask(delta, density) if scope == "tensor" else top.select(delta)
        if not mask.any():
            continue
        tensors.update(sparse_entry(name, mask, delta.reshape(-1)[mask.reshape(-1)] if values else None))
        shapes[name] = list(delta.shape)
        kept[name] = int(mask.sum())
    if not tensors:
        raise PatchError(f"{tuned.location} is identical to {base.location}: the mask would be empty")
    settings = {"density": density, "scope": scope, "values": values, "shapes": shapes, "kept": kept}
    return Extracted(tensors, list(shapes), sorted(shapes), settings)


def covered_shapes(patch: PatchContents) -> dict[str, tuple[int, ...]]:
    """The tensors a mask patch covers and their shapes (its settings' `shapes`), each checked to have its mask."""
    shapes = patch.meta.settings.get("shapes")
    if not isinstance(shapes, dict):
        raise PatchError("this mask patch's settings have no tensor shapes; it was not written by splice")
    present = set(patch.shapes)
    for name in shapes:
        if name + MASK_SUFFIX not in present:
            raise PatchError(f"the mask patch lists {name} but holds no {name + MASK_SUFFIX}")
    return {name: tuple(shape) for name, shape in shapes.items()}


def mask_steps(patch: PatchContents) -> dict[str, Step]:
    """A sparse delta adds its values where its mask is set; a bare mask zeroes everything outside it."""
    present = set(patch.shapes)
    steps: dict[str, Step] = {}
    for name, shape in covered_shapes(patch).items():
        if name + VALUES_SUFFIX in present:
            steps[name] = Step(Effect.add, shape, partial(_add_sparse, patch, name, shape))
        else:
            steps[name] = Step(Effect.multiply, shape, partial(_multiply_mask, patch, name, shape))
    return steps


def _multiply_mask(patch: PatchContents, name: str, shape: tuple[int, ...], value: torch.Tensor) -> torch.Tensor:
    return value * unpack_mask(patch.tensors[name + MASK_SUFFIX].to(value.device), shape).to(value.dtype)


def _add_sparse(patch: PatchContents, name: str, shape: tuple[int, ...], value: torch.Tensor) -> torch.Tensor:
    mask = unpack_mask(patch.tensors[name + MASK_SUFFIX].to(value.device), shape).reshape(-1)
    selected = patch.tensors[name + VALUES_SUFFIX].to(device=value.device, dtype=value.dtype)
    if selected.numel() != int(mask.sum()):
        raise PatchError(
            f"{name}: the mask selects {int(mask.sum())} entries but the patch holds {selected.numel()} values"
        )
    result = value.reshape(-1).clone()
    result[mask] += selected
    return result.reshape(value.shape)


def describe_mask(settings: dict[str, Any]) -> str:
    """Density and scope, sparse delta or mask, and how many entries were kept where, in one line."""
    if "density" not in settings:
        return describe_plain(settings)
    kept: dict[str, int] = settings.get("kept") or {}
    learned = settings.get("localized")
    if isinstance(learned, dict) and {"selected", "eligible", "carried", "best_step", "steps"} <= set(learned):
        carried = learned["carried"]
        head = f", and the head carried whole ({len(carried)} tensors)" if carried else ""
        return (
            f"a learned skill region: {learned['selected']:,} of {learned['eligible']:,} changed layer entries "
            f"(density {settings['density']:g}){head}; best of {learned['steps']} steps at step {learned['best_step']}"
        )
    return (
        f"density {settings['density']:g} per {settings.get('scope', 'tensor')}, "
        f"{'sparse delta' if settings.get('values') else 'mask only'}; "
        f"{sum(kept.values()):,} entries kept in {len(kept)} tensors"
    )


def mask_size(shapes: Mapping[str, Sequence[int]], settings: dict[str, Any]) -> PatchSize:
    """The selected values a sparse delta holds (none for a bare mask), and one mask bit per entry of each tensor
    it covers (its shape from the settings)."""
    listed = settings.get("shapes")
    covered = listed if isinstance(listed, dict) else {}
    bits = sum(
        prod(shape)
        for name, shape in covered.items()
        if name + MASK_SUFFIX in shapes and isinstance(shape, list | tuple) and all(isinstance(n, int) for n in shape)
    )
    return PatchSize(sum(prod(shape) for name, shape in shapes.items() if not name.endswith(MASK_SUFFIX)), bits)


def rescale_mask(patch: PatchContents, scale: float) -> tuple[Mapping[str, torch.Tensor], dict[str, Any]]:
    """A sparse delta's values scaled; its mask bits kept (a bare mask has no change to scale: porting refuses it)."""
    return scale_tensors(patch, scale, {name for name in patch.shapes if name.endswith(VALUES_SUFFIX)})


SPEC = KindSpec(
    extract=extract_mask,
    steps=mask_steps,
    describe=describe_mask,
    rescale=rescale_mask,
    options=MaskOptions,
    size=mask_size,
    keywords={"density": "density", "mask_scope": "scope", "mask_values": "values"},
)
