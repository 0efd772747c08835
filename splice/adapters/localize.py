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

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from math import prod

import torch

from splice.errors import PatchError
from splice.sparsify import top_k_over

GraftLoss = Callable[[dict[str, torch.Tensor]], Iterable[torch.Tensor]]
"""(the grafted model's parameters by name, eligible ones only) -> the task loss in parts that sum to it (one per
batch of examples), each differentiable in the parameters. Each part is differentiated before the next is computed,
so only one batch's activations are held at a time."""

SIGMOID_BIAS = 10.0
STEP = 30.0  # the largest score move of a step, in the sigmoid's units


@dataclass(frozen=True)
class Candidates:
    """Where one tensor's region may lie: the entries at the sorted flat `index` (None: every entry, in order), with
    the fine-tune's change on them (`change`, flat); `shape` is the tensor's."""

    change: torch.Tensor
    index: torch.Tensor | None
    shape: torch.Size

    @classmethod
    def every(cls, change: torch.Tensor) -> Candidates:
        return cls(change.reshape(-1), None, change.shape)

    @classmethod
    def where(cls, change: torch.Tensor, mask: torch.Tensor) -> Candidates:
        """The entries of `change` that the boolean `mask` selects."""
        index = mask.reshape(-1).nonzero().squeeze(1)
        return cls(change.reshape(-1)[index], index, change.shape)

    def grafted(self, pretrained: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """theta_pre + gamma * change, gamma given on the candidates (flat)."""
        if self.index is None:
            return pretrained + (gamma * self.change).view(self.shape)
        return pretrained.reshape(-1).index_add(0, self.index, gamma * self.change).view(self.shape)

    def spread(self, selected: torch.Tensor) -> torch.Tensor:
        """A boolean mask over the candidates as one over the whole tensor."""
        if self.index is None:
            return selected.view(self.shape)
        whole = torch.zeros(prod(self.shape), dtype=torch.bool, device=selected.device)
        whole[self.index] = selected
        return whole.view(self.shape)


@dataclass(frozen=True)
class LearnedMask:
    """The learned region (a boolean mask per eligible tensor, `selected` entries in all; `on_candidates`: the same
    over each tensor's candidates, flat), the task loss of the rounded graft at the start (the magnitude mask) and
    after each step, and the step whose region was kept (0: the magnitude mask's)."""

    masks: dict[str, torch.Tensor]
    on_candidates: dict[str, torch.Tensor]
    selected: int
    losses: list[float]
    best_step: int


def region_size(changes: Mapping[str, torch.Tensor | Candidates], density: float) -> int:
    """How many entries a region of `density` holds: round(density x eligible entries), at least 1."""
    if not 0 < density <= 1:
        raise PatchError(f"`density` must be in (0, 1], got {density:g}")
    total = sum(prod(change.shape) for change in changes.values())
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
    changes: Mapping[str, torch.Tensor | Candidates],
    loss: GraftLoss,
    *,
    density: float,
    steps: int = 10,
    lr: float = STEP,
    l1: float = 0.0,
    seed: int = 0,
) -> LearnedMask:
    """The region of `changes` (theta_ft - theta_pre per eligible tensor, whole or on its `Candidates` entries) whose
    graft onto `pretrained` minimises `loss`, with exactly round(density x entries) entries, all among the
    candidates (see the module)."""
    if steps < 0:
        raise PatchError(f"`steps` must be >= 0, got {steps}")
    if not lr > 0:
        raise PatchError(f"`lr` must be > 0, got {lr:g}")
    candidates = {n: c if isinstance(c, Candidates) else Candidates.every(c) for n, c in changes.items()}
    k = region_size(candidates, density)
    offered = sum(c.change.numel() for c in candidates.values())
    if k > offered:
        raise PatchError(
            f"the region of {k} entries is larger than the {offered} candidate entries it is learned among: lower "
            "`density`, or raise `candidates`"
        )
    base = top_k_over({name: c.change.detach().abs() for name, c in candidates.items()}, k)
    generator = torch.Generator().manual_seed(seed)
    scores = {
        name: torch.rand(c.change.shape, generator=generator, dtype=c.change.dtype).to(c.change.device)
        for name, c in candidates.items()
    }
    for score in scores.values():
        score.requires_grad_(True)
    best = base
    losses = [_rounded_loss(pretrained, candidates, base, loss)]
    for _ in range(steps):
        gamma = _relaxed(base, scores)
        grafted = {name: c.grafted(pretrained[name], gamma[name]) for name, c in candidates.items()}
        # dL/dS by the chain rule in two halves: dL/dtheta of the grafted model (batch by batch), then back through
        # the graft, theta = theta_pre + gamma(S) * change
        by_parameter = _parameter_gradients(loss, grafted)
        objective = torch.stack([(grafted[name] * by_parameter[name]).sum() for name in grafted]).sum()
        del by_parameter
        if l1:
            entries = sum(g.numel() for g in gamma.values())
            objective = objective + l1 * torch.stack([g.sum() for g in gamma.values()]).sum() / entries
        gradients = torch.autograd.grad(objective, list(scores.values()))
        del grafted, gamma, objective
        largest = max((float(gradient.abs().max()) for gradient in gradients if gradient.numel()), default=0.0)
        if largest == 0 or largest != largest:  # nothing moves the loss (or it is not a number): no step can help
            break
        with torch.no_grad():
            for score, gradient in zip(scores.values(), gradients):
                score.sub_(gradient, alpha=lr / largest)
        del gradients
        region = _rounded(base, scores, k)
        losses.append(_rounded_loss(pretrained, candidates, region, loss))
        if losses[-1] < min(losses[:-1]):
            best = region
    masks = {name: c.spread(best[name]) for name, c in candidates.items()}
    return LearnedMask(masks, best, k, losses, _best(losses))


def _parameter_gradients(loss: GraftLoss, grafted: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """d loss / d parameter at the grafted parameters, summed over the loss's parts."""
    leaves = {name: tensor.detach().requires_grad_(True) for name, tensor in grafted.items()}
    for part in loss(leaves):
        part.backward()
    return {name: leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for name, leaf in leaves.items()}


def _best(losses: list[float]) -> int:
    """The first step with the lowest loss."""
    return min(range(len(losses)), key=losses.__getitem__)


def _relaxed(base: Mapping[str, torch.Tensor], scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """gamma_base + (1 - 2 gamma_base) * sigmoid(S - bias): 1 - sigmoid inside the base mask, sigmoid outside it."""
    relaxed = {}
    for name, score in scores.items():
        flip = torch.sigmoid(score - SIGMOID_BIAS)
        relaxed[name] = torch.where(base[name], 1 - flip, flip)
    return relaxed


def _rounded(base: Mapping[str, torch.Tensor], scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """The top k entries of the relaxed mask: the region, rounded to exactly k entries."""
    with torch.no_grad():
        return top_k_over(_relaxed(base, scores), k)


def graft_on(
    pretrained: Mapping[str, torch.Tensor], candidates: Mapping[str, Candidates], selected: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """theta_pre + gamma * change with gamma the boolean `selected` over each tensor's candidates (flat)."""
    return {name: c.grafted(pretrained[name], selected[name].to(c.change.dtype)) for name, c in candidates.items()}


def _rounded_loss(
    pretrained: Mapping[str, torch.Tensor],
    candidates: Mapping[str, Candidates],
    selected: Mapping[str, torch.Tensor],
    loss: GraftLoss,
) -> float:
    with torch.no_grad():
        return sum(float(part) for part in loss(graft_on(pretrained, candidates, selected)))
