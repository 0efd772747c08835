"""Per-tensor merge kernels: `(name, tensors) -> tensor`, run by the stream on the compute device.

splice computes soups, linear, task arithmetic and TIES itself (the magnitude trim uses a kthvalue
threshold where mergekit sorts the whole tensor; on the CPU, TIES finds each threshold by counting the magnitudes'
bits over cache-sized slices and then merges slice by slice); every other mergekit method runs through mergekit's
own per-tensor API, `mergekit.merge_methods.api.merge_tensors`, inside splice's stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import torch

from splice.errors import SpliceError, first_line
from splice.sparsify import SlicedMagnitudeMask, sliced_magnitude_masks, top_magnitude_mask
from splice.tensors.stream import Compute, Kernel, Slices

TensorParameters = Callable[[str], dict[str, Any]]
"""Tensor name -> resolved method parameters (shared values, and per-input values keyed by input index)."""
Trim = Callable[[torch.Tensor], None]
"""What trims a weighted delta in place (zeroes the entries a sparsifying method drops)."""


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
    name: str,
    tensors: list[torch.Tensor],
    params: Mapping[str, Any],
    base_index: int,
    trims: Sequence[Trim | None],
    sign_consensus: bool,
) -> torch.Tensor:
    """base + lambda * (weighted deltas, each trimmed in place by its `trims` entry (one per non-base input, in
    order; None: kept whole), optionally filtered by sign consensus), normalised by the weights that contributed. One
    delta at a time, in place, to keep passes and memory low."""
    base = tensors[base_index]
    others = [i for i in range(len(tensors)) if i != base_index]
    if not others:
        return base
    weights = [params["weight"][i] for i in others]
    deltas = []
    for i, weight, trim in zip(others, weights, trims):
        delta = tensors[i] - base
        if trim is not None:
            trim(delta)
        delta.mul_(weight)
        deltas.append(delta)
    if sign_consensus:
        # the elected sign, that of the summed weighted deltas: +1 where the sum is >= 0, else -1
        elected = (sum(deltas[1:], deltas[0]) >= 0).to(base.dtype).mul_(2).sub_(1)
        merged = torch.zeros_like(base)
        divisor = torch.zeros_like(base)
        for delta, weight in zip(deltas, weights):
            agrees = (torch.sign(delta) == elected).to(base.dtype)  # 1 where the delta has the elected sign, else 0
            merged.addcmul_(delta, agrees)  # delta * 0 or 1 is exact: fused or not, one rounding in the add
            divisor.add_(agrees, alpha=weight)
        divisor.add_(divisor == 0)  # 0 -> 1, every other value unchanged
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


def _magnitude_trims(params: Mapping[str, Any], base_index: int, count: int) -> list[Trim | None]:
    """TIES's trim of each non-base input's delta over the whole tensor: its top `density` by magnitude."""
    others = [i for i in range(count) if i != base_index]
    return [partial(_trim_in_place, density=params["density"][i], rescale=params["rescale"]) for i in others]


def _ties(name: str, tensors: list[torch.Tensor], params: Mapping[str, Any], base_index: int) -> torch.Tensor:
    return _task_arithmetic_family(
        name, tensors, params, base_index, _magnitude_trims(params, base_index, len(tensors)), True
    )


def _ties_in_slices(
    params: Mapping[str, Any], base_index: int, inputs: Sequence[torch.Tensor], slices: Slices
) -> Compute | None:
    """TIES on a tensor's slices: each delta's magnitude threshold found over the whole tensor first (two passes
    over the slices: sparsify.sliced_magnitude_masks), then the slices trimmed against it and merged in order, the
    same arithmetic on every entry as `_ties` on the whole tensor. None with `rescale` (it sums whole deltas)."""
    others = [i for i in range(len(inputs)) if i != base_index]
    if params["rescale"] or not others:
        return None

    def magnitudes() -> Iterator[list[torch.Tensor]]:
        for part in slices():
            yield [(part[i] - part[base_index]).abs_() for i in others]

    masks = sliced_magnitude_masks(magnitudes, inputs[0].numel(), [params["density"][i] for i in others])
    if masks is None:
        return None
    trims = [None if mask is None else partial(_trim_by, mask) for mask in masks]
    return lambda name, part: _task_arithmetic_family(name, part, params, base_index, trims, True)


def _trim_by(mask: SlicedMagnitudeMask, delta: torch.Tensor) -> None:
    delta.mul_(mask.keep(delta.abs()))


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
    "task_arithmetic": lambda n, t, p, b: _task_arithmetic_family(n, t, p, b, [None] * (len(t) - 1), False),
    "ties": _ties,
}


# Methods whose output entries depend on the same entries of the inputs once per-tensor statistics are known: on
# the CPU they are computed in slices (Kernel.prepare), with the same result as on whole tensors.
SLICED_METHODS: dict[str, Callable[..., Compute | None]] = {"ties": _ties_in_slices}


def method_kernel(
    method: str, parameters_for: TensorParameters, base_index: int | None, prefer_own: bool = True
) -> Kernel:
    """A kernel for a named merge method: splice's own implementation where it has one, else mergekit's."""
    if prefer_own and method in OWN_METHODS:
        implementation = OWN_METHODS[method]

        def own(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
            return implementation(name, tensors, parameters_for(name), base_index)

        in_slices = SLICED_METHODS.get(method)
        prepare = None
        if in_slices is not None and base_index is not None:
            base = base_index

            def prepare(name: str, inputs: Sequence[torch.Tensor], slices: Slices) -> Compute | None:
                return in_slices(parameters_for(name), base, inputs, slices)

        return Kernel(own, elementwise=method in ELEMENTWISE_METHODS, prepare=prepare)

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
