"""Apply a patch to a model in memory; the returned handle takes it off again, restoring the exact values."""

from __future__ import annotations

import torch

from splice.adapters.apply import PatchSource, load_patch
from splice.adapters.patch import compare_fingerprint, refuse_drift
from splice.adapters.steps import check_plan_shapes, composition_plan, patched_value
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


def apply_patch(model: torch.nn.Module, patch: PatchSource, allow_base_drift: bool = False) -> PatchHandle:
    """Patch a loaded model in place (deltas add, LayerNorm patches replace), after checking that it is the
    base the patch was made for. Patch tensor names are the stored ones; transformers' renamings are mapped."""
    patch = load_patch(patch, base=model)
    names = stored_to_module_names(model)
    state = model.state_dict(keep_vars=True)

    def live(name: str):
        tensor = state.get(names.get(name, name))
        return None if tensor is None else (tuple(tensor.shape), tensor.dtype, lambda: tensor)

    if not allow_base_drift and patch.meta.base is not None:
        refuse_drift(compare_fingerprint(patch.meta.base, live), "this model", patch.meta.kind,
                     "allow_base_drift=True")
    plan = composition_plan([patch])
    check_plan_shapes(plan, lambda name: tuple(state[names.get(name, name)].shape)
                      if names.get(name, name) in state else None, "the model")
    originals = {}
    with torch.no_grad():
        for stored, steps in plan.items():
            target = state[names.get(stored, stored)]
            originals[names.get(stored, stored)] = target.detach().clone()
            target.copy_(patched_value(target.detach().float(), steps))
    return PatchHandle(model, originals)
