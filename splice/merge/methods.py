"""The catalogue of merge methods (mergekit's registry) and checks of a method's inputs and parameters."""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass
from enum import Enum
from functools import cache
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError

from splice.errors import RecipeError


@cache
def mergekit_method(name: str) -> Any:
    from mergekit import merge_methods

    try:
        return merge_methods.get(name)
    except (KeyError, ValueError, RuntimeError):
        known = sorted({*method_names(), *SPLICE_METHODS})
        near = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise RecipeError(f"unknown merge method {name!r}{hint}; known: {', '.join(known)}") from None


@cache
def method_names() -> tuple[str, ...]:
    """The methods mergekit's registry has (what a mergekit config can name)."""
    from mergekit import merge_methods

    return tuple(sorted(m.spec.name for m in merge_methods.registered_methods()))


class ParameterScope(str, Enum):
    """Along which inputs a method's parameter takes values (mergekit's scopes)."""

    shared = "shared"  # one value for the whole merge
    input = "input"  # a value per input model
    non_base = "non_base"  # a value per input model other than the base


class BasePolicy(str, Enum):
    """What a method does with `base_model` (mergekit's policies)."""

    required = "required"
    optional = "optional"
    ignored = "ignored"  # the method merges only the listed models
    forbidden = "forbidden"


@dataclass(frozen=True)
class ParameterRule:
    name: str
    value_type: Any
    scope: ParameterScope
    required: bool
    default: Any


@dataclass(frozen=True)
class MethodRules:
    name: str
    parameters: dict[str, ParameterRule]
    base: BasePolicy
    min_inputs: int
    max_inputs: int | None


_WEIGHT = ParameterRule("weight", float, ParameterScope.input, False, 1.0)


def _data_method(name: str, statistic: ParameterRule) -> MethodRules:
    """A merge that uses a little data: splice's own (mergekit's methods are all data-free). `weight`: each model's
    weight in the fallback average (and Fisher's model weights); `fallback`: what a tensor without statistics gets,
    `average` (weighted by `weight`) or `base` (the base model's tensor)."""
    parameters = [
        statistic,
        _WEIGHT,
        ParameterRule("fallback", Literal["average", "base"], ParameterScope.shared, False, "average"),
    ]
    return MethodRules(name, {p.name: p for p in parameters}, BasePolicy.optional, 2, None)


_ALPHA = ParameterRule("alpha", float, ParameterScope.shared, False, 0.9)  # RegMean's shrinkage, the paper's default
SPLICE_METHODS: dict[str, MethodRules] = {
    "regmean": _data_method("regmean", _ALPHA),
    # epsilon: FusionBench's floor (`minimal_fisher_weight`)
    "fisher": _data_method("fisher", ParameterRule("epsilon", float, ParameterScope.shared, False, 1e-6)),
    # RegMean++ walks the model block by block: one alpha, one weight per model (the averaged tensors'), and at most
    # `samples` inputs from each model's `data` hook (its activations are held at each block boundary)
    "regmean_plusplus": MethodRules(
        "regmean_plusplus",
        {
            "alpha": _ALPHA,
            "weight": _WEIGHT,
            "samples": ParameterRule("samples", int, ParameterScope.shared, False, 256),
        },
        BasePolicy.forbidden,  # the walk merges the task models from their own data; a base would be unused
        2,
        None,
    ),
    # Localize-and-Stitch: each fine-tune's change on its own region (its `mask:`, or one learned from its `data:`)
    # grafted onto the base; no model weights (the paper has none: overlapping regions are averaged). The parameters
    # are how a region is learned from `data:` (splice.localize's; those not given take its defaults), for the whole
    # merge
    "localize_stitch": MethodRules(
        "localize_stitch",
        {
            rule.name: rule
            for rule in (
                ParameterRule("density", float, ParameterScope.shared, False, 0.01),
                ParameterRule("steps", int, ParameterScope.shared, False, None),
                ParameterRule("lr", float, ParameterScope.shared, False, None),
                ParameterRule("l1", float, ParameterScope.shared, False, None),
                ParameterRule("candidates", float, ParameterScope.shared, False, None),
                ParameterRule("head", Literal["fine-tuned", "pretrained"], ParameterScope.shared, False, None),
            )
        },
        BasePolicy.required,
        2,
        None,
    ),
}


@cache
def method_rules(name: str) -> MethodRules:
    if name in SPLICE_METHODS:
        return SPLICE_METHODS[name]
    from mergekit.merge_methods.base import MISSING

    spec = mergekit_method(name).spec
    parameters = {
        p.name: ParameterRule(
            p.name,
            p.value_type,
            ParameterScope(p.scope.value),
            p.default is MISSING,
            None if p.default is MISSING else p.default,
        )
        for p in spec.parameters
    }
    contract = spec.contract
    return MethodRules(name, parameters, BasePolicy(contract.base.value), contract.min_inputs, contract.max_inputs)


def coerce_parameter(method: str, rule: ParameterRule, value: Any) -> Any:
    """One value read as the parameter's declared type, as mergekit reads it (pydantic's lax validation: a quoted
    number `"5e-1"` is 0.5, `"true"` a bool), or a one-line error naming the parameter."""
    try:
        return _reader(rule.value_type).validate_python(value)
    except ValidationError:
        expected = rule.value_type
        if typing.get_origin(expected) is typing.Union:
            expected = next(a for a in typing.get_args(expected) if a is not type(None))
        name = getattr(expected, "__name__", str(expected))
        raise RecipeError(f"{method}: parameter {rule.name!r} must be {name}, got {value!r}") from None


@cache
def _reader(value_type: Any) -> TypeAdapter:
    return TypeAdapter(value_type)


def _della_window(method: str, parameters: dict[str, Any], tensor: str) -> None:
    """della prunes with probabilities in density +/- epsilon, which must stay inside (0, 1)."""
    epsilons = parameters.get("epsilon") or {}
    for index, density in (parameters.get("density") or {}).items():
        epsilon = epsilons.get(index)
        if epsilon is not None and 0 < density < 1 and not (0 < density - epsilon and density + epsilon < 1):
            raise RecipeError(
                f"{method}: density {density:g} +/- epsilon {epsilon:g} must stay inside (0, 1) "
                f"(input {index}, tensor {tensor}); lower epsilon below "
                f"{min(density, 1 - density):g}"
            )


RANGE_CHECKS = {"della": _della_window, "della_linear": _della_window}


def check_ranges(method: str, parameters: dict[str, Any], tensor: str) -> None:
    """Value ranges a method's kernel would otherwise refuse mid-merge, checked for one tensor's resolved
    parameters before anything is read."""
    check = RANGE_CHECKS.get(method)
    if check is not None:
        check(method, parameters, tensor)
