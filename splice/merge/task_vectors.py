"""A merge method applied to task vectors (each input's change to a shared base) instead of whole models.

Patches are changes, not models: merging them runs the method on the changes over a zero base, which gives
the change the method would make to the base when it merges the patched models (`base + merged change`),
for every method whose result depends on its inputs only through their differences from the base. The
methods that interpolate whole weights (slerp, karcher, nearswap, ...) are refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from splice.errors import RecipeError
from splice.merge.kernels import ELEMENTWISE_METHODS, method_kernel
from splice.merge.methods import BasePolicy, check_ranges, method_rules
from splice.merge.recipe import Conditional, ParameterResolver, parse_recipe
from splice.tensors.stream import Kernel

# Methods whose output is base + f(input - base for each input), checked by tests/test_patch_merge.py;
# linear is one only when it normalises its weights (a weighted average of models is the base plus the
# weighted average of their changes).
TASK_VECTOR_METHODS = (
    "linear",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "sce",
    "model_stock",
    "ram",
    "ramplus_tl",
    "multislerp",
    "nuslerp",
)
BASE_LABEL = "base"


@dataclass(frozen=True)
class TaskVectorMerge:
    """A method over `count` task vectors: `merged(name, changes)` is the merged change of one tensor."""

    method: str
    count: int
    kernel: Kernel
    base_index: int | None
    parameters_for: ParameterResolver

    @property
    def is_weighted_sum(self) -> bool:
        """The merged change is sum_i c_i * change_i, with coefficients that depend on the tensor's name only."""
        return self.method in ELEMENTWISE_METHODS

    def merged(self, name: str, changes: Sequence[torch.Tensor]) -> torch.Tensor:
        """The merged change of tensor `name` (`changes` in input order, zeros where an input leaves it alone;
        the kernel may change them in place)."""
        inputs = list(changes)
        if self.base_index is not None:
            inputs.append(torch.zeros_like(inputs[0]))
        return self.kernel.compute(name, inputs)

    def coefficients(self, name: str) -> list[float]:
        """c_i of a weighted-sum method for tensor `name`: the kernel run on the unit vectors, so the coefficients
        are the kernel's own (weights, normalisation, lambda), not a second copy of its formula."""
        if not self.is_weighted_sum:
            raise RecipeError(f"{self.method} is not a weighted sum of its inputs' changes")
        return self.merged(name, list(torch.eye(self.count, dtype=torch.float32))).tolist()


def _is_gradient(setting: Any) -> bool:
    """Whether a setting takes values across layers (a list of scalars, also as a conditional's value)."""
    if isinstance(setting, Conditional):
        return isinstance(setting.value, list)
    if isinstance(setting, list):
        return any(_is_gradient(item) if isinstance(item, Conditional) else True for item in setting)
    return False


def task_vector_merge(
    method: str,
    count: int,
    tensor_names: Sequence[str],
    weights: Sequence[float] | None = None,
    parameters: Mapping[str, Any] | None = None,
    source: str = "patch merge",
    model_names: Sequence[str] | None = None,
) -> TaskVectorMerge:
    """The method's kernel over `count` task vectors (inputs named "patch 1", "patch 2", ... in its messages),
    `weights` one per input (default 1 each) and `parameters` shared by all (density, lambda, normalize, ...),
    checked as a recipe's are before anything is read. `model_names`: every tensor name of the model the changes are
    to (its depth places a gradient's layers); without it a gradient is refused, since the changed tensors alone do
    not say how deep the model is."""
    if method not in TASK_VECTOR_METHODS:
        try:
            method_rules(method)
        except RecipeError as exc:
            raise RecipeError(f"{source}: {exc}") from None
        raise RecipeError(
            f"{source}: {method} interpolates whole weights, not changes to a base, so it does not merge patches; "
            f"use one of {', '.join(TASK_VECTOR_METHODS)}"
        )
    weights = [1.0] * count if weights is None else list(weights)
    if len(weights) != count:
        raise RecipeError(f"{source}: {len(weights)} `weights` for {count} patches; give one weight per patch")
    parameters = dict(parameters or {})
    if "weight" in parameters:
        raise RecipeError(f"{source}: give the weights as `weights` (one per patch), not as a parameter")
    rules = method_rules(method)
    takes_weight = "weight" in rules.parameters
    if not takes_weight and any(w != 1 for w in weights):
        raise RecipeError(f"{source}: {method} takes no weights; leave `weights` out")
    models = [
        {"model": f"patch {i + 1}", "parameters": {"weight": w} if takes_weight else {}} for i, w in enumerate(weights)
    ]
    base = None if rules.base is BasePolicy.ignored else BASE_LABEL
    recipe = parse_recipe(
        {"merge_method": method, "models": models, "base_model": base, "parameters": parameters}, source
    )
    if model_names is None:
        gradient = next((name for name, setting in recipe.parameters.items() if _is_gradient(setting)), None)
        if gradient is not None:
            raise RecipeError(
                f"{source}: {gradient} is a gradient across layers, which needs the model's depth: give `base` (the "
                "model the patches are made on)"
            )
    resolver = ParameterResolver(recipe, list(model_names or tensor_names))
    for name in tensor_names:
        resolved = resolver(name)
        check_ranges(method, resolved, name)
        if method == "linear" and not resolved["normalize"]:
            raise RecipeError(
                f"{source}: linear with normalize false scales the base too, so it is not a merge of changes; "
                f"use task_arithmetic for a plain weighted sum of the patches"
            )
    _, base_index = recipe.inputs()
    return TaskVectorMerge(method, count, method_kernel(method, resolver, base_index), base_index, resolver)
