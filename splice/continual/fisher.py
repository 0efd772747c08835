"""Fisher-selected LayerNorm subsets (ValizadehAslani and Liang 2024; algorithms.md E3): the diagonal empirical
Fisher information of a slot's LayerNorm entries on a task's training data, and the top (or a random) share of
them as 0/1 gradient masks."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from splice.continual.bank import LayerNormBank
from splice.continual.data import TaskData, batches
from splice.continual.train import inputs_of, masked_logits
from splice.values import FiniteFloat


class FisherSubset(BaseModel):
    """Tune only the top `fraction` of the LayerNorm entries (or whole norm modules) by diagonal empirical Fisher
    information on the task's training data (ValizadehAslani and Liang 2024); `random`: a random subset of the same
    size, the control. Each slot then starts from the pretrained norms and is stored as a sparse delta (a mask
    patch) over them."""

    model_config = ConfigDict(extra="forbid")
    fraction: FiniteFloat = Field(gt=0, le=1)
    granularity: Literal["entries", "modules"] = "entries"
    random: bool = False


def fisher_diagonal(
    bank: LayerNormBank, slot: int, tuned: dict[str, torch.nn.Parameter], data: TaskData
) -> dict[str, torch.Tensor]:
    """F_i = mean_n (d log p(y_n | x_n) / d theta_i)^2 over the task's training samples, one sample at a time,
    with the slot's current values, the oracle slot and logits masked to the task's classes (eval mode)."""
    names, parameters = list(tuned), list(tuned.values())
    squares = [torch.zeros_like(p) for p in parameters]
    for parameter in parameters:
        parameter.requires_grad_(True)
    bank.model.eval()
    count = 0
    try:
        for sample in batches(data.train, 1, device=bank.keys.device):
            logits = bank(task_ids=torch.full((1,), slot, dtype=torch.long), **inputs_of(sample)).logits
            loss = torch.nn.functional.cross_entropy(masked_logits(logits, data.classes), sample["labels"])
            for square, grad in zip(squares, torch.autograd.grad(loss, parameters)):
                square += grad.detach() ** 2
            count += 1
    finally:
        for parameter in parameters:
            parameter.requires_grad_(False)
    return {name: square / count for name, square in zip(names, squares)}


def subset_masks(
    fisher: dict[str, torch.Tensor], subset: FisherSubset, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Per tensor, the bool mask of the entries that train: the top `fraction` of all entries by Fisher, or whole
    norm modules by summed Fisher until that many entries are in; `random` draws the same number at random."""
    total = sum(value.numel() for value in fisher.values())
    keep = max(1, math.ceil(subset.fraction * total))
    if subset.granularity == "modules":
        return _module_masks(fisher, keep, subset.random, generator)
    flat = torch.cat([value.reshape(-1) for value in fisher.values()])
    chosen = torch.randperm(total, generator=generator)[:keep] if subset.random else flat.topk(keep).indices
    selected = torch.zeros(total, dtype=torch.bool)
    selected[chosen] = True
    return dict(
        zip(
            fisher,
            (
                part.reshape(v.shape)
                for part, v in zip(selected.split([v.numel() for v in fisher.values()]), fisher.values())
            ),
        )
    )


def _module_masks(
    fisher: dict[str, torch.Tensor], keep: int, random: bool, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    modules: dict[str, list[str]] = {}
    for name in fisher:
        modules.setdefault(name.rpartition(".")[0], []).append(name)
    order = list(modules)
    if random:
        order = [order[i] for i in torch.randperm(len(order), generator=generator).tolist()]
    else:
        order.sort(key=lambda module: -float(sum(fisher[n].sum() for n in modules[module])))
    masks = {name: torch.zeros_like(value, dtype=torch.bool) for name, value in fisher.items()}
    kept = 0
    for module in order:
        if kept >= keep:
            break
        for name in modules[module]:
            masks[name][:] = True
            kept += masks[name].numel()
    return masks
