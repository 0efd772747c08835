"""A task as the registry keeps it, and back: a LayerNorm patch (the tuned norms' values and the head), or, for
Fisher subsets, a mask patch (the changed entries as a sparse delta over the pretrained values, the head as a
dense one). Either way the task's values are the patch's steps applied to the pretrained values, so a run that
goes on from a task continues from exactly what a resumed run reads back."""

from __future__ import annotations

import os

import torch

from splice.adapters.compose import patch_steps
from splice.adapters.fingerprint import fingerprint_base
from splice.adapters.kinds.mask import MASK_SUFFIX, VALUES_SUFFIX, pack_mask
from splice.adapters.meta import PatchKind, PatchMeta
from splice.adapters.patch import Patch
from splice.tensors.checkpoint import Checkpoint

Values = dict[str, torch.Tensor]


def pretrained_values(base: str | os.PathLike, names: list[str]) -> Values:
    with Checkpoint.open(base) as checkpoint:
        return {name: checkpoint.read(name).float() for name in names}


def task_patch(
    base: str | os.PathLike,
    tuned: Values,
    head: Values,
    pretrained: Values,
    masks: dict[str, torch.Tensor] | None,
    settings: dict,
    lineage: str,
) -> Patch:
    """The task's patch (no metrics yet): LayerNorm kind holding `tuned` and `head`, or with `masks` a mask patch
    holding only the masked entries' change over `pretrained` (and the head's change)."""
    if masks is None:
        kind, tensors = PatchKind.layernorm, {**tuned, **head}
        slot = sorted(tuned)
    else:
        kind, tensors, shapes, kept = PatchKind.mask, {}, {}, {}
        full = {name: torch.ones_like(value, dtype=torch.bool) for name, value in head.items()}
        for name, value in {**tuned, **head}.items():
            mask = {**masks, **full}[name]
            if not mask.any():
                continue
            tensors[name + MASK_SUFFIX] = pack_mask(mask)
            tensors[name + VALUES_SUFFIX] = (value.float() - pretrained[name])[mask]
            shapes[name], kept[name] = list(value.shape), int(mask.sum())
        slot = sorted(name for name in tuned if name in shapes)
        settings = {
            **settings,
            "shapes": shapes,
            "values": True,
            "scope": "model",
            "kept": kept,
            "density": sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values()),
        }
    with Checkpoint.open(base) as checkpoint:
        fingerprint = fingerprint_base(checkpoint, [*slot, *head])
    targets = sorted({name.rpartition(".")[0] for name in [*slot, *head]})
    meta = PatchMeta(
        kind=kind,
        targets=targets,
        base=fingerprint,
        lineage=[lineage],
        settings={**settings, "slot": slot, "head": sorted(head)},
    )
    return Patch(tensors, meta)


def task_values(patch: Patch, pretrained: Values) -> Values:
    """Stored name -> the value a task's patch gives each tensor it changes, over the pretrained values."""
    return {name: step.compute(pretrained[name].clone()) for name, step in patch_steps(patch).items()}


def stored_entries(patch: Patch) -> int:
    """LayerNorm entries a task stores (the head and the key not counted)."""
    settings = patch.meta.settings
    if patch.meta.kind is PatchKind.mask:
        return sum(count for name, count in settings["kept"].items() if name in settings["slot"])
    return sum(patch.tensors[name].numel() for name in settings["slot"])
