"""What a patch does to each base tensor it touches, and how several patches compose.

Every patch kind turns into steps, one per base tensor: a step says how it composes (`replace`,
`add`, `multiply`) and computes the new value from the current one. Patch tensors are read only
when a step runs, so a streamed apply never holds a whole patch in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import torch

from splice.adapters.patch import Patch, PatchError, PatchKind


class Effect(str, Enum):
    replace = "replace"  # the patch's value wins: composes with nothing else on the same tensor
    add = "add"  # value + something (delta, LoRA product, sparse delta)
    multiply = "multiply"  # value * something (a bare mask)


@dataclass(frozen=True)
class Step:
    effect: Effect
    shape: tuple[int, ...]  # the shape of the base tensor this step was made for
    # current value (fp32, on the compute device) -> new value; may update the value it is given in place
    compute: Callable[[torch.Tensor], torch.Tensor]


def _replace(patch: Patch) -> dict[str, Step]:
    return {name: Step(Effect.replace, patch.shapes[name], lambda value, name=name: patch.tensors[name].to(value))
            for name in patch.tensors}


def _add(patch: Patch) -> dict[str, Step]:
    return {name: Step(Effect.add, patch.shapes[name], lambda value, name=name: value + patch.tensors[name].to(value))
            for name in patch.tensors}


def patch_steps(patch: Patch) -> dict[str, Step]:
    """Base tensor name -> the step this patch applies to it."""
    kind = patch.meta.kind
    if kind is PatchKind.layernorm:
        return _replace(patch)
    if kind is PatchKind.delta:
        return _add(patch)
    if kind is PatchKind.lora:
        from splice.adapters.kinds.lora import lora_steps

        return lora_steps(patch)
    from splice.adapters.kinds.mask import mask_steps

    return mask_steps(patch)


def composition_plan(patches: Sequence[Patch]) -> dict[str, list[Step]]:
    """Per base tensor, the steps to run in order; refuses overlaps that do not compose."""
    plan: dict[str, list[Step]] = {}
    kinds: dict[str, list[str]] = {}
    for index, patch in enumerate(patches):
        for name, step in patch_steps(patch).items():
            earlier = plan.setdefault(name, [])
            if earlier and (step.effect is Effect.replace or any(s.effect is Effect.replace for s in earlier)):
                raise PatchError(f"patch {index + 1} ({patch.meta.kind.value}) and an earlier one "
                                 f"({', '.join(kinds[name])}) both change {name}, and a replacement does not compose "
                                 f"with another change; apply one of them")
            if earlier and earlier[0].shape != step.shape:
                raise PatchError(f"patch {index + 1} ({patch.meta.kind.value}) changes {name} as shape "
                                 f"{list(step.shape)}, an earlier patch as {list(earlier[0].shape)}")
            earlier.append(step)
            kinds.setdefault(name, []).append(patch.meta.kind.value)
    return plan


def check_plan_shapes(plan: dict[str, list[Step]], shape_of: Callable[[str], tuple[int, ...] | None],
                      where: str) -> None:
    """Every planned tensor exists in the target with the shape the patches were made for."""
    for name, steps in plan.items():
        shape = shape_of(name)
        if shape is None:
            raise PatchError(f"{where} has no tensor {name}, which a patch changes")
        if tuple(shape) != steps[0].shape:
            raise PatchError(f"a patch changes {name} as shape {list(steps[0].shape)}, {where} has {list(shape)}")


def patched_value(value: torch.Tensor, steps: Sequence[Step]) -> torch.Tensor:
    """A base tensor after its steps, computed in the value's dtype and device."""
    for step in steps:
        value = step.compute(value)
    return value
