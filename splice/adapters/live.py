"""Apply a patch to a model in memory; the returned handle takes it off again, restoring the exact values."""

from __future__ import annotations

import os

import torch

from splice.adapters.apply import REPLACING, composition_plan
from splice.adapters.patch import Patch, PatchError, TensorFingerprint, tensor_sha256
from splice.tensors.device import dtype_name
from splice.tensors.names import stored_to_module_names


class PatchHandle:
    """What `apply_patch` changed; `remove()` (or leaving a `with` block) restores the original values."""

    def __init__(self, model: torch.nn.Module, originals: dict[str, torch.Tensor]):
        self.model = model
        self._originals = originals

    def remove(self) -> None:
        state = self.model.state_dict(keep_vars=True)
        with torch.no_grad():
            for name, original in self._originals.items():
                state[name].copy_(original)
        self._originals = {}

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _live_mismatches(expected: list[TensorFingerprint], state: dict[str, torch.Tensor], names: dict[str, str]
                     ) -> list[str]:
    problems = []
    for entry in expected:
        tensor = state.get(names.get(entry.name, entry.name))
        if tensor is None:
            problems.append(f"{entry.name}: not in this model")
        elif tuple(tensor.shape) != tuple(entry.shape) or dtype_name(tensor.dtype) != entry.dtype:
            problems.append(f"{entry.name}: {list(tensor.shape)} {dtype_name(tensor.dtype)}, patch made on "
                            f"{list(entry.shape)} {entry.dtype}")
        elif tensor_sha256(tensor) != entry.sha256:
            norm = float(tensor.detach().double().norm())
            change = f" ({(norm - entry.norm) / entry.norm:+.2%})" if entry.norm else ""
            problems.append(f"{entry.name}: values differ: L2 norm {norm:.6g}, {entry.norm:.6g} when the patch "
                            f"was made{change}")
    return problems


def apply_patch(model: torch.nn.Module, patch: Patch | str | os.PathLike, allow_base_drift: bool = False
                ) -> PatchHandle:
    """Patch a loaded model in place (deltas add, LayerNorm patches replace), after checking that it is the
    base the patch was made for. Patch tensor names are the stored ones; transformers' renamings are mapped."""
    patch = patch if isinstance(patch, Patch) else Patch.load(patch)
    names = stored_to_module_names(model)
    state = model.state_dict(keep_vars=True)
    problems = _live_mismatches(patch.meta.base.tensors, state, names)
    if problems and not allow_base_drift:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise PatchError(f"this model is not the base this {patch.meta.kind.value} patch was made for: "
                         f"{'; '.join(problems[:3])}{more}; pass allow_base_drift=True to apply it anyway")
    plan = composition_plan([patch])
    missing = [name for name in plan if names.get(name, name) not in state]
    if missing:
        raise PatchError(f"the model has no parameter for {missing[0]}" + (
            f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    originals = {}
    with torch.no_grad():
        for stored, steps in plan.items():
            target = state[names.get(stored, stored)]
            originals[names.get(stored, stored)] = target.detach().clone()
            for kind, tensor in steps:
                tensor = tensor.to(device=target.device, dtype=target.dtype)
                if kind in REPLACING:
                    target.copy_(tensor)
                else:
                    target.add_(tensor)
    return PatchHandle(model, originals)
