"""`registry diff` of two LoRA versions: their effective updates compared per base tensor, not their factors.

A LoRA version changes `<module>.weight` by U = scale * B @ A. Two versions' factors can differ completely (another
rank, another basis) while their updates agree, so the comparison is of U_a and U_b: ||U_a||, ||U_b||,
||U_b - U_a|| / ||U_a|| and cos(U_a, U_b), computed in float64 a block of rows at a time (exact, and never more
than ROWS x cols of a product in memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from splice.adapters.kinds.lora import SUFFIX_A, SUFFIX_B, lora_modules, module_scale
from splice.adapters.patch import Patch

ROWS = 1024  # rows of an update formed at once


@dataclass
class UpdateDiff:
    """One base tensor a LoRA version changes: its update in each version and how the two compare."""

    name: str  # the base tensor, `<module>.weight`
    status: str  # "added", "removed", "changed", "unchanged"
    rank_a: int | None = None
    rank_b: int | None = None
    norm_a: float | None = None  # ||U_a|| (Frobenius)
    norm_b: float | None = None
    relative: float | None = None  # ||U_b - U_a|| / ||U_a|| (inf when U_a is 0 and U_b is not)
    cosine: float | None = None  # <U_a, U_b> / (||U_a|| ||U_b||), clamped to [-1, 1]; None if either is 0


def factor_names(patch: Patch) -> set[str]:
    """The tensors of a LoRA patch that are factors (the others replace base tensors whole)."""
    return {module + suffix for module in lora_modules(patch) for suffix in (SUFFIX_A, SUFFIX_B)}


def _factors(patch: Patch, module: str) -> tuple[float, torch.Tensor, torch.Tensor]:
    scale = module_scale(patch, module)
    return scale, patch.tensors[module + SUFFIX_B].double(), patch.tensors[module + SUFFIX_A].double()


def _norm(scale: float, b: torch.Tensor, a: torch.Tensor) -> float:
    total = 0.0
    for start in range(0, b.shape[0], ROWS):
        total += float((scale * (b[start : start + ROWS] @ a)).square().sum())
    return math.sqrt(total)


def _compare(
    a: tuple[float, torch.Tensor, torch.Tensor], b: tuple[float, torch.Tensor, torch.Tensor], out: UpdateDiff
) -> None:
    (scale_a, b_a, a_a), (scale_b, b_b, a_b) = a, b
    norm_a = norm_b = inner = difference = 0.0
    for start in range(0, b_a.shape[0], ROWS):
        u_a = scale_a * (b_a[start : start + ROWS] @ a_a)
        u_b = scale_b * (b_b[start : start + ROWS] @ a_b)
        norm_a += float(u_a.square().sum())
        norm_b += float(u_b.square().sum())
        inner += float((u_a * u_b).sum())
        difference += float((u_b - u_a).square().sum())
    out.norm_a, out.norm_b = math.sqrt(norm_a), math.sqrt(norm_b)
    out.relative = math.sqrt(difference) / out.norm_a if out.norm_a else (0.0 if difference == 0 else math.inf)
    if out.norm_a and out.norm_b:
        out.cosine = max(-1.0, min(1.0, inner / (out.norm_a * out.norm_b)))


def diff_updates(a: Patch, b: Patch) -> list[UpdateDiff]:
    """Per base tensor either LoRA version changes (in a's order, then b's new ones): the two updates compared."""
    modules_a, modules_b = lora_modules(a), lora_modules(b)
    out = []
    for module in modules_a + [m for m in modules_b if m not in modules_a]:
        entry = UpdateDiff(f"{module}.weight", "changed")
        factors_a = _factors(a, module) if module in modules_a else None
        factors_b = _factors(b, module) if module in modules_b else None
        if factors_a is not None:
            entry.rank_a = factors_a[2].shape[0]
        if factors_b is not None:
            entry.rank_b = factors_b[2].shape[0]
        if factors_a is not None and factors_b is not None:
            if factors_a[1].shape[0] != factors_b[1].shape[0] or factors_a[2].shape[1] != factors_b[2].shape[1]:
                entry.status = "reshaped"  # the two versions were made for differently shaped base tensors
                entry.norm_a, entry.norm_b = _norm(*factors_a), _norm(*factors_b)
            else:
                _compare(factors_a, factors_b, entry)
                if entry.relative == 0.0:
                    entry.status = "unchanged"
        elif factors_a is not None:
            entry.status, entry.norm_a = "removed", _norm(*factors_a)
        elif factors_b is not None:
            entry.status, entry.norm_b = "added", _norm(*factors_b)
        out.append(entry)
    return out
