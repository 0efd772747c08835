"""Per-tensor merge kernels: `(name, tensors) -> tensor`, run by the stream on the compute device.

splice computes soups, linear, task arithmetic and TIES itself (the magnitude trim uses a kthvalue
threshold where mergekit sorts the whole tensor); every other mergekit method runs through mergekit's
own per-tensor API, `mergekit.merge_methods.api.merge_tensors`, inside splice's stream.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from splice.errors import RecipeError
from splice.tensors.stream import Kernel, elementwise

TensorParameters = Callable[[str], dict[str, Any]]
"""Tensor name -> resolved method parameters (shared values, and per-input values keyed by input index)."""


def weighted_average(weights: Sequence[float]) -> Kernel:
    """sum_i (w_i / sum w) * x_i, multiplied then added in input order, so it is reproducible exactly."""
    total = float(sum(weights))
    if total == 0:
        raise RecipeError(f"weights {list(weights)} sum to zero; a weighted average needs a non-zero sum")
    coefficients = [float(w) / total for w in weights]

    @elementwise
    def kernel(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        merged = tensors[0] * coefficients[0]
        for tensor, coefficient in zip(tensors[1:], coefficients[1:]):
            merged += tensor * coefficient
        return merged

    return kernel


def keep_top_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the k = max(1, int(density * n)) largest-magnitude entries.

    The k-th largest magnitude is found with kthvalue (linear time) instead of a full sort; only when
    magnitudes tie at the threshold does it fall back to topk so that exactly k entries survive.
    """
    if density >= 1:
        return delta
    count = delta.numel()
    if density <= 0 or count == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * count))
    magnitudes = delta.abs().reshape(-1)
    threshold = magnitudes.kthvalue(count - k + 1).values
    keep = magnitudes >= threshold
    if int(keep.sum()) != k:
        keep = torch.zeros_like(keep)
        keep[magnitudes.topk(k).indices] = True
    return delta * keep.view_as(delta)


def _rescale_l1(original: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    before, after = original.abs().sum(), kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def _task_arithmetic_family(name: str, tensors: list[torch.Tensor], params: Mapping[str, Any], base_index: int,
                            trim: bool, sign_consensus: bool) -> torch.Tensor:
    base = tensors[base_index]
    others = [i for i in range(len(tensors)) if i != base_index]
    if not others:
        return base
    deltas = []
    for i in others:
        delta = tensors[i] - base
        if trim:
            trimmed = keep_top_magnitude(delta, params["density"][i])
            delta = _rescale_l1(delta, trimmed) if params["rescale"] else trimmed
        deltas.append(delta)
    stacked = torch.stack(deltas)
    weights = torch.tensor([params["weight"][i] for i in others], dtype=stacked.dtype, device=stacked.device)
    weights = weights.reshape((-1,) + (1,) * base.dim())
    stacked.mul_(weights)
    if sign_consensus:
        majority = torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0).to(stacked.dtype)
        agrees = stacked.sign() == majority
        merged = (stacked * agrees).sum(dim=0)
        divisor = (weights * agrees).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        merged = stacked.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if params["normalize"]:
        merged /= divisor
    if params["lambda"] != 1:
        merged *= params["lambda"]
    return base + merged


def _linear(name: str, tensors: list[torch.Tensor], params: Mapping[str, Any], base_index: int | None
            ) -> torch.Tensor:
    weights = [params["weight"][i] for i in range(len(tensors))]
    merged = tensors[0] * weights[0]
    for tensor, weight in zip(tensors[1:], weights[1:]):
        merged += tensor * weight
    if params["normalize"]:
        merged /= sum(weights)
    return merged


# Methods whose output entry depends only on the same entry of each input (no per-tensor statistics).
ELEMENTWISE_METHODS = frozenset({"linear", "task_arithmetic"})

OWN_METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "linear": _linear,
    "task_arithmetic": lambda n, t, p, b: _task_arithmetic_family(n, t, p, b, trim=False, sign_consensus=False),
    "ties": lambda n, t, p, b: _task_arithmetic_family(n, t, p, b, trim=True, sign_consensus=True),
}


def method_kernel(method: str, parameters_for: TensorParameters, base_index: int | None,
                  prefer_own: bool = True) -> Kernel:
    """A kernel for a named merge method: splice's own implementation where it has one, else mergekit's."""
    if prefer_own and method in OWN_METHODS:
        implementation = OWN_METHODS[method]

        def own(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
            return implementation(name, tensors, parameters_for(name), base_index)

        return elementwise(own) if method in ELEMENTWISE_METHODS else own

    from mergekit.merge_methods.api import merge_tensors

    from splice.merge.methods import mergekit_method

    mergekit_impl = mergekit_method(method)

    def through_mergekit(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        return merge_tensors(tensors, mergekit_impl, parameters=parameters_for(name), ids=list(range(len(tensors))),
                             base_index=base_index, name=name)

    return through_mergekit
