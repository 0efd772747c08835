"""Per-tensor merge kernels: `(name, tensors) -> tensor`, run by the stream on the compute device.

splice computes soups, linear, task arithmetic and TIES itself (the magnitude trim uses a kthvalue
threshold where mergekit sorts the whole tensor); every other mergekit method runs through mergekit's
own per-tensor API, `mergekit.merge_methods.api.merge_tensors`, inside splice's stream.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from splice.errors import SpliceError, first_line
from splice.sparsify import top_magnitude_mask
from splice.tensors.stream import Kernel

TensorParameters = Callable[[str], dict[str, Any]]
"""Tensor name -> resolved method parameters (shared values, and per-input values keyed by input index)."""


def average_coefficients(weights: Sequence[float]) -> list[float]:
    """w_i / sum w: what a weighted average multiplies each input by."""
    total = float(sum(weights))
    if total == 0:
        raise SpliceError(f"weights {list(weights)} sum to zero; a weighted average needs a non-zero sum")
    return [float(w) / total for w in weights]


def weighted_average(weights: Sequence[float]) -> Kernel:
    """sum_i (w_i / sum w) * x_i, multiplied then added in input order, so it is reproducible exactly."""
    coefficients = average_coefficients(weights)

    def average(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        merged = tensors[0] * coefficients[0]
        for tensor, coefficient in zip(tensors[1:], coefficients[1:]):
            merged += tensor * coefficient
        return merged

    return Kernel(average, elementwise=True)


def _trim_in_place(delta: torch.Tensor, density: float, rescale: bool, eps: float = 1e-7) -> None:
    keep = top_magnitude_mask(delta, density)
    if keep is None:
        return
    if not rescale:
        delta.mul_(keep)
        return
    before = delta.abs().sum()
    delta.mul_(keep)
    after = delta.abs().sum()
    if before >= eps and after >= eps:
        delta.mul_(before / after)


def _task_arithmetic_family(
    name: str, tensors: list[torch.Tensor], params: Mapping[str, Any], base_index: int, trim: bool, sign_consensus: bool
) -> torch.Tensor:
    """base + lambda * (weighted deltas, optionally trimmed by magnitude and filtered by sign consensus),
    normalised by the weights that contributed. One delta at a time, in place, to keep passes and memory low."""
    base = tensors[base_index]
    others = [i for i in range(len(tensors)) if i != base_index]
    if not others:
        return base
    weights = [params["weight"][i] for i in others]
    deltas = []
    for i, weight in zip(others, weights):
        delta = tensors[i] - base
        if trim:
            _trim_in_place(delta, params["density"][i], params["rescale"])
        delta.mul_(weight)
        deltas.append(delta)
    if sign_consensus:
        positive = sum(deltas[1:], deltas[0]) >= 0  # the elected sign: that of the summed weighted deltas
        merged = torch.zeros_like(base)
        divisor = torch.zeros_like(base)
        for delta, weight in zip(deltas, weights):
            agrees = torch.where(positive, delta > 0, delta < 0)
            merged += delta * agrees
            divisor.add_(agrees, alpha=weight)
        divisor[divisor == 0] = 1
    else:
        merged = sum(deltas[1:], deltas[0])
        divisor = torch.tensor(weights, dtype=base.dtype, device=base.device).sum()
        if divisor.abs() < 1e-8:
            divisor.fill_(1)
    if params["normalize"]:
        merged /= divisor
    if params["lambda"] != 1:
        merged *= params["lambda"]
    return base + merged


def _linear(name: str, tensors: list[torch.Tensor], params: Mapping[str, Any], base_index: int | None) -> torch.Tensor:
    weights = [params["weight"][i] for i in range(len(tensors))]
    merged = tensors[0] * weights[0]
    for tensor, weight in zip(tensors[1:], weights[1:]):
        merged += tensor * weight
    if params["normalize"]:
        merged /= sum(weights)
    return merged


def _passthrough(
    name: str, tensors: list[torch.Tensor], params: Mapping[str, Any], base_index: int | None
) -> torch.Tensor:
    scale = params["scale"][0]
    return tensors[0] if scale is None else tensors[0] * scale


# Methods whose output entry depends only on the same entry of each input (no per-tensor statistics).
ELEMENTWISE_METHODS = frozenset({"linear", "task_arithmetic", "passthrough"})

OWN_METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "linear": _linear,
    "passthrough": _passthrough,
    "task_arithmetic": lambda n, t, p, b: _task_arithmetic_family(n, t, p, b, trim=False, sign_consensus=False),
    "ties": lambda n, t, p, b: _task_arithmetic_family(n, t, p, b, trim=True, sign_consensus=True),
}


def method_kernel(
    method: str, parameters_for: TensorParameters, base_index: int | None, prefer_own: bool = True
) -> Kernel:
    """A kernel for a named merge method: splice's own implementation where it has one, else mergekit's."""
    if prefer_own and method in OWN_METHODS:
        implementation = OWN_METHODS[method]

        def own(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
            return implementation(name, tensors, parameters_for(name), base_index)

        return Kernel(own, elementwise=method in ELEMENTWISE_METHODS)

    from mergekit.merge_methods.api import merge_tensors

    from splice.merge.methods import mergekit_method

    mergekit_impl = mergekit_method(method)

    def through_mergekit(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        try:
            return merge_tensors(
                tensors,
                mergekit_impl,
                parameters=parameters_for(name),
                ids=list(range(len(tensors))),
                base_index=base_index,
                name=name,
            )
        except Exception as exc:  # mergekit raises many types; the user needs the method and the tensor
            raise SpliceError(f"{method} failed on tensor {name}: {first_line(exc)}") from exc

    return Kernel(through_mergekit)
