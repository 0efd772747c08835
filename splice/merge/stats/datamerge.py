"""RegMean and Fisher merges on the stream: each output tensor is read with its own statistics only (a linear
layer's weight with each model's Gram matrix of that layer's inputs, a parameter with each model's Fisher diagonal)
and solved on the compute device; tensors without statistics (embeddings, norms, biases) take the fallback.

A model's statistics are a `StoredStats`: a stored artifact (a statistics directory or a registry version) opened
by the caller, who has checked that it was collected on that model. Everything that can be checked from the
tensors' headers (every model has statistics for the same tensors, each of the right shape) is checked when the
plan is made, before any tensor is read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from splice.errors import RecipeError
from splice.merge.kernels import TensorParameters, weighted_average
from splice.merge.stats.solve import WeightLayout, check_alpha, check_epsilon, fisher_average, regmean
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.stream import Kernel, StreamItem, all_finite

DATA_METHODS = {"regmean": "gram", "fisher": "fisher"}  # method -> the statistic each model gives it


@dataclass(frozen=True)
class StoredStats:
    """One model's statistics as a merge reads them: `checkpoint` holds the tensors; `shared` maps a layer's weight
    to the stored Gram matrix it shares; `transposed` lists the weights stored in x out (GPT-2's Conv1D)."""

    checkpoint: Checkpoint
    statistic: str
    label: str  # how messages name the statistics (their reference)
    shared: Mapping[str, str] = field(default_factory=dict)
    transposed: frozenset[str] = frozenset()

    def key(self, tensor: str) -> str | None:
        """Where the statistic of model tensor `tensor` is stored, or None when there is none."""
        key = self.shared.get(tensor, tensor)
        return key if key in self.checkpoint.tensors else None


StatsOpener = Callable[[str, Checkpoint, str, "dict | None"], StoredStats]
"""(the `stats:` reference, the checkpoint of the model it is for, the statistic the method needs, storage options)
-> the statistics, refused unless they are that statistic, collected on that model."""


class Rule(str, Enum):
    regmean = "regmean"
    fisher = "fisher"
    fallback = "fallback"  # no statistics: the `fallback` parameter's method


@dataclass(frozen=True)
class LayerSolve:
    tensor: str
    condition: float
    pseudo_inverse: bool


@dataclass(frozen=True)
class DataMergeReport:
    """What a RegMean / Fisher merge did: how many tensors each rule covered and, for RegMean, each layer's solve
    (the condition number of its system and whether the pseudo-inverse was used)."""

    method: str
    rules: dict[str, int]
    solves: tuple[LayerSolve, ...] = ()

    @property
    def pseudo_inverse_layers(self) -> list[str]:
        return [solve.tensor for solve in self.solves if solve.pseudo_inverse]


@dataclass(frozen=True)
class DataPlan:
    plan: list[StreamItem]
    rules: dict[str, Rule]  # output tensor -> its rule
    kernel: Kernel
    solves: list[LayerSolve]  # the kernel's, in the order it solved them

    def report(self, method: str) -> DataMergeReport:
        """The merge's report, once the kernel has run over the plan."""
        counted: dict[str, int] = {}
        for rule in self.rules.values():
            counted[rule.value] = counted.get(rule.value, 0) + 1
        return DataMergeReport(method, counted, tuple(self.solves))


def plan_data_merge(
    method: str,
    plan: Sequence[StreamItem],
    stats: Sequence[StoredStats],
    merged: Sequence[int],
    parameters_for: TensorParameters,
    base_index: int | None,
) -> DataPlan:
    """`plan` (output tensors from the same-name inputs) with each tensor's statistics appended to its sources:
    `stats[k]` are those of input `merged[k]`. A tensor some models have statistics for and others not, or whose
    statistic has the wrong shape, is refused by name."""
    rule_of = Rule(method)
    items, rules, layouts = [], {}, {}
    for item in plan:
        name = item.output.name
        keys = [s.key(name) if item.output.dtype.is_floating_point else None for s in stats]
        found = [(s, key) for s, key in zip(stats, keys) if key is not None]
        if len(found) < len(stats):
            if found:
                lacking = next(s.label for s, key in zip(stats, keys) if key is None)
                raise RecipeError(
                    f"{method}: {lacking} has no statistic for tensor {name}, which {found[0][0].label} has; collect "
                    "every model's statistics the same way (on models of one architecture)"
                )
            rules[name] = Rule.fallback
            items.append(item)
            continue
        _check_range(method, parameters_for(name))
        layout = _layout(method, name, stats)
        if layout is not None:
            layouts[name] = layout
        for s, key in found:
            _check_shape(method, name, item.output.shape, tuple(s.checkpoint.tensors[key].shape), layout, s.label)
        rules[name] = rule_of
        items.append(StreamItem(item.output, (*item.sources, *((s.checkpoint, key) for s, key in found))))
    solves: list[LayerSolve] = []
    labels = [s.label for s in stats]
    kernel = _kernel(method, rules, merged, parameters_for, base_index, layouts, labels, solves)
    return DataPlan(items, rules, kernel, solves)


def _check_range(method: str, parameters: Mapping[str, Any]) -> None:
    """The method's one parameter its kernel would otherwise refuse mid-merge."""
    if method == "regmean":
        check_alpha(parameters["alpha"])
    else:
        check_epsilon(parameters["epsilon"])


def _layout(method: str, name: str, stats: Sequence[StoredStats]) -> WeightLayout | None:
    if method != "regmean":
        return None
    transposed = {name in s.transposed for s in stats}
    if len(transposed) > 1:
        raise RecipeError(f"{method}: the statistics disagree on how {name} is stored (Linear or Conv1D)")
    return WeightLayout.in_out if transposed.pop() else WeightLayout.out_in


def _check_shape(
    method: str, name: str, shape: tuple[int, ...], stored: tuple[int, ...], layout: WeightLayout | None, label: str
) -> None:
    if layout is None:
        expected = shape
    elif len(shape) != 2:
        raise RecipeError(f"{method}: {label} holds a Gram matrix for {name}, which is not a 2-d weight {list(shape)}")
    else:
        features = shape[1] if layout is WeightLayout.out_in else shape[0]
        expected = (features, features)
    if stored != expected:
        raise RecipeError(
            f"{method}: {label}: the statistic for {name} has shape {list(stored)}, but the model's tensor "
            f"{list(shape)} needs {list(expected)}; were the statistics collected on another model?"
        )


def _kernel(
    method: str,
    rules: Mapping[str, Rule],
    merged: Sequence[int],
    parameters_for: TensorParameters,
    base_index: int | None,
    layouts: Mapping[str, WeightLayout],  # each regmean weight's, from the statistics (checked when planned)
    labels: Sequence[str],
    solves: list[LayerSolve],
) -> Kernel:
    count = len(merged)

    def compute(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        parameters = parameters_for(name)
        rule = rules[name]
        inputs = len(tensors) - (count if rule is not Rule.fallback else 0)
        models, statistics = [tensors[i] for i in merged], tensors[inputs:]
        weights = [parameters["weight"][i] for i in merged]
        if rule is Rule.fallback:
            return _fallback(name, tensors, models, weights, parameters["fallback"], base_index)
        for statistic, label in zip(statistics, labels):
            if not all_finite(statistic):
                raise RecipeError(
                    f"{method}: {label}: the statistic for {name} holds NaN or Inf; collect the statistics again"
                )
        if rule is Rule.fisher:
            return fisher_average(models, statistics, weights, parameters["epsilon"], name)
        solved = regmean(models, statistics, parameters["alpha"], layouts[name], name)
        solves.append(LayerSolve(name, solved.condition, solved.pseudo_inverse))
        return solved.weight

    return Kernel(compute, elementwise=method == "fisher")


def _fallback(
    name: str,
    tensors: list[torch.Tensor],
    models: list[torch.Tensor],
    weights: list[float],
    fallback: str,
    base_index: int | None,
) -> torch.Tensor:
    if fallback == "base":
        assert base_index is not None  # the recipe's checks refuse `fallback: base` without base_model
        return tensors[base_index]
    return weighted_average(weights).compute(name, models)
