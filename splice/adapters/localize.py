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

Memory: beside the pretrained tensors (a live model's own) and what the loss holds (one batch's activations), the
learning holds candidate-sized tensors only: the change on the candidates, the scores, the relaxed mask and their
gradients. Each pass writes the graft into the pretrained tensors themselves, on the candidates, and writes their own
values back, exactly, when it ends; the loss's gradient is taken on the candidates tensor by tensor as backward
produces it, so no whole gradient outlives its tensor's backward step. With every entry a candidate, those are whole
tensors, and so are the values set aside.

This module is the math over tensors: the caller gives the loss of a grafted model as a function of its parameters
(a live model run with `torch.func.functional_call` over the task's batches).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
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
STEPS = 20


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

    def graft_into(self, pretrained: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """Writes theta_pre + gamma * change into `pretrained` itself (the same sum `grafted` computes); returns the
        values it overwrote, for `restore`."""
        flat = pretrained.view(-1)
        if self.index is None:
            kept = flat.clone()
            flat.add_(gamma * self.change)
        else:
            kept = flat[self.index]
            flat.index_add_(0, self.index, gamma * self.change)
        return kept

    def restore(self, pretrained: torch.Tensor, kept: torch.Tensor) -> None:
        """Writes back the values `graft_into` overwrote."""
        flat = pretrained.view(-1)
        if self.index is None:
            flat.copy_(kept)
        else:
            flat.index_copy_(0, self.index, kept)

    def on(self, whole: torch.Tensor) -> torch.Tensor:
        """A tensor's entries at the candidates (flat)."""
        flat = whole.reshape(-1)
        return flat if self.index is None else flat[self.index]

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


def check_learning(density: float, steps: int, lr: float, l1: float) -> None:
    """The learning's settings, each refused in one line when out of range."""
    if not 0 < density <= 1:
        raise PatchError(f"`density` must be in (0, 1], got {density:g} (e.g. 0.0001 for 0.01% of the entries)")
    if steps < 0:
        raise PatchError(f"`steps` must be >= 0, got {steps}")
    if not lr > 0:
        raise PatchError(f"`lr` must be > 0, got {lr:g}")
    if not l1 >= 0:
        raise PatchError(f"`l1` must be >= 0, got {l1:g}")


def region_size(changes: Mapping[str, torch.Tensor | Candidates], density: float) -> int:
    """How many entries a region of `density` (checked by `check_learning`) holds: round(density x eligible
    entries), at least 1."""
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
    steps: int = STEPS,
    lr: float = STEP,
    l1: float = 0.0,
    seed: int = 0,
) -> LearnedMask:
    """The region of `changes` (theta_ft - theta_pre per eligible tensor, whole or on its `Candidates` entries) whose
    graft onto `pretrained` minimises `loss`, with exactly round(density x entries) entries, all among the
    candidates (see the module)."""
    check_learning(density, steps, lr, l1)
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
        # dL/dS by the chain rule in two halves: dL/dtheta of the grafted model on the candidates (batch by batch),
        # then back through the graft, theta = theta_pre + gamma(S) * change
        with _grafted_in_place(pretrained, candidates, {name: g.detach() for name, g in gamma.items()}) as grafted:
            by_parameter = _candidate_gradients(loss, grafted, candidates)
        objective = torch.stack(
            [(gamma[name] * (by_parameter[name] * c.change)).sum() for name, c in candidates.items()]
        ).sum()
        del by_parameter
        if l1:
            entries = sum(g.numel() for g in gamma.values())
            objective = objective + l1 * torch.stack([g.sum() for g in gamma.values()]).sum() / entries
        gradients = torch.autograd.grad(objective, list(scores.values()))
        del gamma, objective
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


@contextmanager
def _grafted_in_place(
    pretrained: Mapping[str, torch.Tensor], candidates: Mapping[str, Candidates], gamma: Mapping[str, torch.Tensor]
) -> Iterator[dict[str, torch.Tensor]]:
    """The pretrained tensors holding theta_pre + gamma * change on their candidates while the block runs (given to
    it by name), then their own values again, exactly."""
    kept: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, c in candidates.items():
                kept[name] = c.graft_into(pretrained[name], gamma[name])
        yield {name: pretrained[name] for name in candidates}
    finally:
        with torch.no_grad():
            for name, values in kept.items():
                candidates[name].restore(pretrained[name], values)


def _candidate_gradients(
    loss: GraftLoss, grafted: Mapping[str, torch.Tensor], candidates: Mapping[str, Candidates]
) -> dict[str, torch.Tensor]:
    """d loss / d parameter at the grafted parameters on each tensor's candidates (flat), summed over the loss's
    parts: each tensor's gradient is taken at its candidates as soon as backward has it, and dropped."""
    summed = {name: torch.zeros_like(c.change) for name, c in candidates.items()}
    leaves = {}
    for name, tensor in grafted.items():
        leaf = tensor.detach().requires_grad_(True)
        leaf.register_post_accumulate_grad_hook(partial(_gather, candidates[name], summed[name]))
        leaves[name] = leaf
    for part in loss(leaves):
        part.backward()
    return summed


def _gather(candidates: Candidates, summed: torch.Tensor, leaf: torch.Tensor) -> None:
    assert leaf.grad is not None
    summed.add_(candidates.on(leaf.grad))
    leaf.grad = None


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
    """The loss of the graft of the boolean `selected` (over each tensor's candidates), made in place."""
    gamma = {name: selected[name].to(c.change.dtype) for name, c in candidates.items()}
    with torch.no_grad(), _grafted_in_place(pretrained, candidates, gamma) as grafted:
        return sum(float(part) for part in loss(grafted))
