"""Skill localization (Panigrahi et al., ICML 2023): the sparse region gamma of a fine-tune's change that, grafted onto
the pretrained model, `theta_pre + gamma * (theta_ft - theta_pre)`, keeps what the fine-tune learned.

The region is learned as the paper's code does (`graft_trainer.py` of Skill-Localization-by-grafting, read, not
copied): real scores S (uniform in [0, 1), seeded) give the relaxed mask

    gamma(S) = gamma_base + (1 - 2 gamma_base) * sigmoid(S - bias),   bias = 10,

which starts at gamma_base, the top-`density` entries by |theta_ft - theta_pre| over every eligible tensor together,
and can flip any entry either way. S takes gradient steps on the task loss of the grafted model, plus `l1` times the
mean of gamma (a sparsity penalty the paper's scripts leave at 0: sparsity comes from the base mask and the bias).

One departure, in the step's size: the paper's plain step `S -= lr * dL/dS` with lr = 1e7 is tuned to its loss (summed
over 128 minibatches), its models and its fine-tunes' change sizes; dL/dS scales with all three (on splice's tiny test
models the paper's lr moves nothing, on a small ViT it overshoots). Here each step is normalised by its largest
entry, `S -= lr * dL/dS / max|dL/dS|`: `lr` is how far the score with the largest gradient moves, in the sigmoid's
units (a move of `bias` = 10 takes an entry half way to flipped), and the other scores move in proportion, as in the
paper's step.

After each step the region is rounded to exactly `density` of the entries (the top k of gamma) and scored by the task
loss of its graft; the region of the best step is kept (the paper keeps its best step too). With no steps, or when no
step improves on it, that is gamma_base: the magnitude mask.

This module is the math over tensors: the caller gives the loss of a grafted model as a function of its parameters
(a live model run with `torch.func.functional_call` over the task's batches).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from splice.errors import PatchError
from splice.sparsify import top_k_over

GraftLoss = Callable[[dict[str, torch.Tensor]], torch.Tensor]
"""(the grafted model's parameters by name, eligible ones only) -> the task loss, differentiable in them."""

SIGMOID_BIAS = 10.0
STEP = 30.0  # the largest score move of a step, in the sigmoid's units


@dataclass(frozen=True)
class LearnedMask:
    """The learned region (a boolean mask per eligible tensor, `selected` entries in all), the task loss of the
    rounded graft at the start (the magnitude mask) and after each step, and the step whose region was kept (0: the
    magnitude mask's)."""

    masks: dict[str, torch.Tensor]
    selected: int
    losses: list[float]
    best_step: int


def region_size(changes: Mapping[str, torch.Tensor], density: float) -> int:
    """How many entries a region of `density` holds: round(density x eligible entries), at least 1."""
    if not 0 < density <= 1:
        raise PatchError(f"`density` must be in (0, 1], got {density:g}")
    total = sum(change.numel() for change in changes.values())
    if total == 0:
        raise PatchError("no eligible entries to localize a region in")
    return max(1, round(density * total))


def graft(
    pretrained: Mapping[str, torch.Tensor], changes: Mapping[str, torch.Tensor], gamma: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """theta_pre + gamma * (theta_ft - theta_pre) for each eligible tensor (gamma boolean or relaxed)."""
    return {name: pretrained[name] + gamma[name] * changes[name] for name in changes}


def learn_graft_mask(
    pretrained: Mapping[str, torch.Tensor],
    changes: Mapping[str, torch.Tensor],
    loss: GraftLoss,
    *,
    density: float,
    steps: int = 10,
    lr: float = STEP,
    l1: float = 0.0,
    seed: int = 0,
) -> LearnedMask:
    """The region of `changes` (theta_ft - theta_pre per eligible tensor) whose graft onto `pretrained` minimises
    `loss`, with exactly round(density x entries) entries (see the module)."""
    if steps < 0:
        raise PatchError(f"`steps` must be >= 0, got {steps}")
    if not lr > 0:
        raise PatchError(f"`lr` must be > 0, got {lr:g}")
    k = region_size(changes, density)
    base = {name: mask.to(changes[name].dtype) for name, mask in top_k_over(_magnitudes(changes), k).items()}
    generator = torch.Generator().manual_seed(seed)
    scores = {
        name: torch.rand(change.shape, generator=generator, dtype=change.dtype).to(change.device).requires_grad_(True)
        for name, change in changes.items()
    }
    best = {name: mask.bool() for name, mask in base.items()}
    losses = [_rounded_loss(pretrained, changes, base, loss)]
    for _ in range(steps):
        gamma = _relaxed(base, scores)
        objective = loss(graft(pretrained, changes, gamma))
        if l1:
            objective = objective + l1 * sum(g.sum() for g in gamma.values()) / sum(g.numel() for g in gamma.values())
        gradients = torch.autograd.grad(objective, list(scores.values()))
        largest = max(float(gradient.abs().max()) for gradient in gradients)
        if largest == 0 or largest != largest:  # nothing moves the loss (or it is not a number): no step can help
            break
        with torch.no_grad():
            for score, gradient in zip(scores.values(), gradients):
                score.sub_(gradient, alpha=lr / largest)
        region = _rounded(base, scores, k)
        losses.append(_rounded_loss(pretrained, changes, region, loss))
        if losses[-1] < min(losses[:-1]):
            best = region
    return LearnedMask(best, k, losses, _best(losses))


def _best(losses: list[float]) -> int:
    """The first step with the lowest loss."""
    return min(range(len(losses)), key=losses.__getitem__)


def _magnitudes(changes: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: change.detach().abs() for name, change in changes.items()}


def _relaxed(base: Mapping[str, torch.Tensor], scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: base[name] + (1 - 2 * base[name]) * torch.sigmoid(scores[name] - SIGMOID_BIAS) for name in scores}


def _rounded(base: Mapping[str, torch.Tensor], scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """The top k entries of the relaxed mask: the region, rounded to exactly k entries."""
    with torch.no_grad():
        return top_k_over(_relaxed(base, scores), k)


def _rounded_loss(
    pretrained: Mapping[str, torch.Tensor],
    changes: Mapping[str, torch.Tensor],
    gamma: Mapping[str, torch.Tensor],
    loss: GraftLoss,
) -> float:
    with torch.no_grad():
        return float(loss(graft(pretrained, changes, {n: g.to(changes[n].dtype) for n, g in gamma.items()})))
