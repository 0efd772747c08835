"""Apply a patch to a model in memory; the returned handle takes it off again, restoring the exact values."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from splice.adapters.compose import check_plan_shapes, composition_plan, patched_value
from splice.adapters.fingerprint import StoredTensor, compare_fingerprint, refuse_drift
from splice.adapters.patch import Patch, PatchError
from splice.adapters.sources import PatchSource, load_patch
from splice.arch.names import stored_to_module_names
from splice.tensors.checkpoint import Checkpoint

APPLIED_ATTRIBUTE = "_splice_applied_patches"  # on the model: the handles of the patches it carries, in order


def applied_handles(model: torch.nn.Module) -> list[PatchHandle]:
    return model.__dict__.setdefault(APPLIED_ATTRIBUTE, [])


def unpatched_values(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Module name -> value before any applied patch changed it (the base a later patch is checked against)."""
    values: dict[str, torch.Tensor] = {}
    for handle in reversed(applied_handles(model)):
        values.update(handle._originals)
    return values


class PatchHandle:
    """What `apply_patch` changed; `remove()` (or leaving a `with` block) restores the values it found.
    Patches stacked on one model come off in reverse order."""

    def __init__(self, model: torch.nn.Module, originals: dict[str, torch.Tensor], identity: str = ""):
        self.model = model
        self._originals = originals
        self.identity = identity  # the patch's manifest, to refuse applying one patch twice
        applied_handles(model).append(self)

    def remove(self) -> None:
        applied = applied_handles(self.model)
        if self not in applied:
            return
        if applied[-1] is not self:
            raise PatchError("remove the patches applied after this one first (patches come off in reverse order)")
        state = self.model.state_dict(keep_vars=True)
        with torch.no_grad():
            for name, original in self._originals.items():
                state[name].copy_(original)
        self._originals = {}
        applied.pop()

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def apply_patch(model: torch.nn.Module, patch: PatchSource, allow_base_drift: bool = False) -> PatchHandle:
    """Patch a loaded model in place (deltas add, LayerNorm patches replace), after checking that it is the
    base the patch was made for. Patch tensor names are the stored ones; transformers' renamings are mapped."""
    patch = load_patch(patch, base=model)
    names = stored_to_module_names(model)
    state = model.state_dict(keep_vars=True)

    identity = patch.meta.model_dump_json()
    if any(handle.identity == identity for handle in applied_handles(model)):
        raise PatchError("this patch is already applied to this model; remove it first or apply another")
    unpatched = unpatched_values(model)

    def live(name: str) -> StoredTensor | None:
        module_name = names.get(name, name)
        tensor = unpatched.get(module_name, state.get(module_name))
        return None if tensor is None else (tuple(tensor.shape), tensor.dtype, lambda sample=False: tensor)

    if not allow_base_drift and patch.meta.base is not None:
        refuse_drift(
            compare_fingerprint(patch.meta.base, live), "this model", patch.meta.kind.value, "`allow_base_drift=True`"
        )
    plan = composition_plan([patch])
    check_plan_shapes(
        plan,
        lambda name: tuple(state[names.get(name, name)].shape) if names.get(name, name) in state else None,
        "the model",
    )
    originals = {}
    with torch.no_grad():
        for stored, steps in plan.items():
            target = state[names.get(stored, stored)]
            originals[names.get(stored, stored)] = target.detach().clone()
            target.copy_(patched_value(target.detach().float().clone(), steps))  # steps may work in place
    return PatchHandle(model, originals, identity)


def patched_state(base: Checkpoint, patches: Sequence[Patch]) -> dict[str, torch.Tensor]:
    """A stored base's tensors (stored names) with patches applied in memory, in the base's dtypes: what an
    evaluation hook scores when no patched model was written."""
    state = base.state_dict()
    plan = composition_plan(list(patches))
    check_plan_shapes(plan, lambda name: tuple(state[name].shape) if name in state else None, base.location)
    for name, steps in plan.items():
        state[name] = patched_value(state[name].float().clone(), steps).to(state[name].dtype)
    return state
