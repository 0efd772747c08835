"""What a patch does to each base tensor it touches, and how several patches compose.

Every patch kind turns into steps (`splice.adapters.steps`), one per base tensor; here the steps of several
patches become one plan per base tensor, with the overlaps that do not compose refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from splice.adapters.fingerprint import fingerprint_base
from splice.adapters.kinds import KINDS
from splice.adapters.patch import Patch
from splice.adapters.steps import Effect, Step
from splice.errors import PatchError
from splice.tensors.checkpoint import Checkpoint


def patch_steps(patch: Patch) -> dict[str, Step]:
    """Base tensor name -> the step this patch applies to it."""
    return KINDS[patch.meta.kind].steps(patch)


def composition_plan(patches: Sequence[Patch]) -> dict[str, list[Step]]:
    """Per base tensor, the steps to run in order; refuses overlaps that do not compose."""
    plan: dict[str, list[Step]] = {}
    kinds: dict[str, list[str]] = {}
    for index, patch in enumerate(patches):
        for name, step in patch_steps(patch).items():
            earlier = plan.setdefault(name, [])
            if earlier and (step.effect is Effect.replace or any(s.effect is Effect.replace for s in earlier)):
                raise PatchError(
                    f"patch {index + 1} ({patch.meta.kind.value}) and an earlier one "
                    f"({', '.join(kinds[name])}) both change {name}, and a replacement does not compose "
                    f"with another change; apply one of them"
                )
            if earlier and earlier[0].shape != step.shape:
                raise PatchError(
                    f"patch {index + 1} ({patch.meta.kind.value}) changes {name} as shape "
                    f"{list(step.shape)}, an earlier patch as {list(earlier[0].shape)}"
                )
            earlier.append(step)
            kinds.setdefault(name, []).append(patch.meta.kind.value)
    return plan


def check_plan_shapes(
    plan: dict[str, list[Step]], shape_of: Callable[[str], tuple[int, ...] | None], where: str
) -> None:
    """Every planned tensor exists in the target with the shape the patches were made for."""
    for name, steps in plan.items():
        shape = shape_of(name)
        if shape is None:
            raise PatchError(f"{where} has no tensor {name}, which a patch changes")
        if tuple(shape) != steps[0].shape:
            raise PatchError(f"a patch changes {name} as shape {list(steps[0].shape)}, {where} has {list(shape)}")


def base_steps(patches: Sequence[Patch], base: Checkpoint) -> dict[str, list[Step]]:
    """Per tensor of `base`, the steps of `patches` in order: overlaps resolved, every tensor they change there in
    the shape they were made for."""
    plan = composition_plan(patches)
    check_plan_shapes(plan, lambda name: base.tensors[name].shape if name in base.tensors else None, base.location)
    return plan


def patched_value(value: torch.Tensor, steps: Sequence[Step], rows: tuple[int, int] | None = None) -> torch.Tensor:
    """A base tensor after its steps, computed in the value's dtype and device; with `rows=(a, b)`, `value` is rows
    a..b of the tensor and so is the result (for steps that compute rows apart: `computes_rows`)."""
    for step in steps:
        if rows is None:
            value = step.compute(value)
        elif step.compute_rows is not None:
            value = step.compute_rows(value, rows)
        else:
            raise ValueError("a step that needs the whole tensor was given a block of rows")
    return value


def computes_rows(steps: Sequence[Step]) -> bool:
    """Whether a block of rows of the patched tensor comes from the same rows of the base tensor alone."""
    return all(step.compute_rows is not None for step in steps)


def with_base_record(patch: Patch, base: Checkpoint) -> Patch:
    """`patch` with a fingerprint of the `base` tensors it touches where it has no record of its base; where it has
    one, `patch` itself, once `base` is checked to be the base it records."""
    if patch.meta.base is not None:
        patch.check_base(base)
        return patch
    fingerprint = fingerprint_base(base, patch_steps(patch).keys())
    return Patch(patch.tensors, patch.meta.model_copy(update={"base": fingerprint}))
