"""The per-tensor math of the data-dependent merges, on tensors already on the compute device.

RegMean (Jin et al., ICLR 2023): for a linear layer `y = x W^T` (W: out x in) and each model's input Gram matrix
`G_i = X_i^T X_i`, the merged weight minimises sum_i ||X_i W^T - X_i W_i^T||^2:

    W = (sum_i W_i G~_i) (sum_i G~_i)^-1,   G~_i = alpha G_i + (1 - alpha) diag(G_i)

where alpha < 1 shrinks the off-diagonal entries (the paper's default 0.9). GPT-2's Conv1D stores W transposed
(in x out, `y = x W`): W = (sum_i G~_i)^-1 (sum_i G~_i W_i).

An ill-conditioned system S = sum_i G~_i (an input feature no calibration token used: a zero row and column) has
no one solution: the data say nothing of W along S's null space. There W keeps the models' mean W_bar, and the
pseudo-inverse solves the rest: W = W_bar + (R - W_bar S) S^+ (Conv1D: W_bar + S^+ (R - S W_bar)), which is the
least-squares solution closest to the mean (the bare pseudo-inverse would set those directions to zero).

Fisher merging (Matena and Raffel, NeurIPS 2022): each parameter averaged with its diagonal Fisher as weights,
theta = sum_i w_i F_i theta_i / sum_i w_i F_i, with a floor `epsilon` added to every F_i so a parameter no model
is sensitive to becomes the weighted average rather than 0/0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

import torch

from splice.errors import SpliceError

# above this condition number a solve is done with the pseudo-inverse, and the layer is reported
CONDITION_LIMIT = 1e12


class WeightLayout(str, Enum):
    """How a linear layer stores its weight: transformers' Linear (out x in) or GPT-2's Conv1D (in x out)."""

    out_in = "out_in"
    in_out = "in_out"


@dataclass(frozen=True)
class Solved:
    """A merged weight and how its system was solved."""

    weight: torch.Tensor
    condition: float  # of sum_i G~_i, in the solve's dtype
    pseudo_inverse: bool  # the system was ill-conditioned: solved by pinv


def check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise SpliceError(f"regmean: alpha must be in [0, 1], got {alpha:g}")


def check_epsilon(epsilon: float) -> None:
    if epsilon < 0:
        raise SpliceError(f"fisher: epsilon must be >= 0, got {epsilon:g}")


class RegMeanSystem:
    """RegMean's sums for the layers fed one input, accumulated one model at a time: S = sum_i G~_i (shared by
    those layers) and, per layer, R = sum_i W_i G~_i (Linear) or sum_i G~_i W_i (Conv1D). Memory: one [in, in]
    matrix and one weight per layer, whatever the number of models (RegMean++ sees one model's block at a time).

    Solved in fp64 (the systems' condition numbers reach 1e6 and more: fp32 would lose the solution) on the weights'
    device; each merged weight comes back in its models' dtype."""

    def __init__(self, alpha: float = 0.9):
        check_alpha(alpha)
        self.alpha = alpha
        self.system: torch.Tensor | None = None
        self.rights: dict[str, torch.Tensor] = {}
        self.layouts: dict[str, WeightLayout] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.sums: dict[str, torch.Tensor] = {}  # of the models' weights: their mean anchors an ill-posed solve
        self.models = 0

    def add(self, gram: torch.Tensor, weights: Mapping[str, tuple[torch.Tensor, WeightLayout]]) -> None:
        """One model's Gram matrix and its weights ({name: (weight, layout)}) of the layers that Gram feeds."""
        first = next(iter(weights.values()))[0]
        dtype = torch.float64
        for name, (weight, layout) in weights.items():
            features = weight.shape[1] if layout is WeightLayout.out_in else weight.shape[0]
            if weight.dim() != 2 or gram.shape != (features, features):
                raise SpliceError(
                    f"regmean: {name}: a Gram matrix of shape {list(gram.shape)} does not fit a weight of shape "
                    f"{list(weight.shape)} (it needs {features} x {features})"
                )
        # S += G~ and R += W G~ with G~ = alpha G + (1 - alpha) diag(G), without forming G~: a Gram matrix is the
        # largest thing a layer's merge holds (GPT-2's MLP output: 3072 x 3072 in fp64, 75 MB, more than that layer's
        # weights of three models), so every temporary of its size shows in the merge's peak memory
        g = gram.to(device=first.device, dtype=dtype)
        diagonal, kept = torch.diagonal(g), 1.0 - self.alpha
        if self.system is None:
            self.system = torch.zeros_like(g)
        self.system.add_(g, alpha=self.alpha).diagonal().add_(diagonal, alpha=kept)
        for name, (weight, layout) in weights.items():
            w = weight.to(dtype)
            right = self.rights.setdefault(name, torch.zeros_like(w))
            if layout is WeightLayout.out_in:  # W G~ = alpha W G + (1 - alpha) W diag(G)
                right.addmm_(w, g, alpha=self.alpha).addcmul_(w, diagonal[None, :], value=kept)
            else:  # G~ W = alpha G W + (1 - alpha) diag(G) W
                right.addmm_(g, w, alpha=self.alpha).addcmul_(diagonal[:, None], w, value=kept)
            self.sums[name] = w.clone() if name not in self.sums else self.sums[name].add_(w)
            self.layouts[name] = layout
            self.dtypes[name] = weight.dtype
        self.models += 1

    def solve(self) -> dict[str, Solved]:
        """{layer: its merged weight}, W = R S^-1 (Conv1D: S^-1 R); above CONDITION_LIMIT, anchored on the models'
        mean and solved by the pseudo-inverse (see the module), which is refused without shrinkage (alpha 1): the
        user asked for the exact least-squares merge, and the data do not determine one."""
        if self.system is None:
            raise SpliceError("regmean: no model was added to the system")
        condition = condition_number(self.system)
        singular = not condition < CONDITION_LIMIT  # also NaN / inf
        if singular and self.alpha == 1:
            raise SpliceError(
                f"regmean: the system of {', '.join(self.rights)} is singular (condition number {condition:.3g}) and "
                "alpha is 1 (no shrinkage of the Gram matrices): set alpha below 1 (the paper's 0.9) or use more data"
            )
        inverse = torch.linalg.pinv(self.system, hermitian=True) if singular else None
        solved = {}
        for name, right in self.rights.items():
            out_in = self.layouts[name] is WeightLayout.out_in
            if out_in:  # W S = R  <=>  S W^T = R^T (S symmetric): solved as the Conv1D form, transposed
                right = right.T
            if inverse is None:
                merged = torch.linalg.solve(self.system, right)
            else:
                mean = self.sums[name] / self.models
                mean = mean.T if out_in else mean
                merged = mean + inverse @ (right - self.system @ mean)
            solved[name] = Solved((merged.T if out_in else merged).to(self.dtypes[name]), condition, singular)
        return solved


def condition_number(system: torch.Tensor) -> float:
    """The condition number of a symmetric positive semi-definite matrix (a sum of Gram matrices): the ratio of its
    extreme eigenvalues (an eigendecomposition: ~6x cheaper than the SVD `torch.linalg.cond` does); inf when it is
    singular or holds NaN/Inf."""
    if not bool(torch.isfinite(system).all()):
        return float("inf")
    eigenvalues = torch.linalg.eigvalsh(system)
    smallest, largest = float(eigenvalues[0]), float(eigenvalues[-1])
    return largest / smallest if smallest > 0 else float("inf")


def regmean(
    weights: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor],
    alpha: float = 0.9,
    layout: WeightLayout = WeightLayout.out_in,
    name: str = "weight",
) -> Solved:
    """The RegMean merge of one linear layer's weights given each model's input Gram matrix (see the module)."""
    if not weights or len(weights) != len(grams):
        raise SpliceError(f"regmean: {name}: {len(weights)} weights for {len(grams)} Gram matrices")
    system = RegMeanSystem(alpha)
    for weight, gram in zip(weights, grams):
        system.add(gram, {name: (weight, layout)})
    return system.solve()[name]


def fisher_average(
    tensors: Sequence[torch.Tensor],
    fishers: Sequence[torch.Tensor],
    model_weights: Sequence[float] | None = None,
    epsilon: float = 1e-8,
    name: str = "tensor",
) -> torch.Tensor:
    """sum_i w_i (F_i + epsilon) theta_i / sum_i w_i (F_i + epsilon), elementwise (see the module)."""
    if not tensors or len(tensors) != len(fishers):
        raise SpliceError(f"fisher: {name}: {len(tensors)} tensors for {len(fishers)} Fisher diagonals")
    check_epsilon(epsilon)
    model_weights = [1.0] * len(tensors) if model_weights is None else list(model_weights)
    if len(model_weights) != len(tensors):
        raise SpliceError(f"fisher: {len(model_weights)} model weights for {len(tensors)} models")
    numerator = torch.zeros_like(tensors[0])
    denominator = torch.zeros_like(tensors[0])
    for tensor, fisher, weight in zip(tensors, fishers, model_weights):
        if fisher.shape != tensor.shape:
            raise SpliceError(
                f"fisher: {name}: a Fisher diagonal of shape {list(fisher.shape)} for a tensor of shape "
                f"{list(tensor.shape)}"
            )
        scaled = weight * (fisher.to(tensor.dtype) + epsilon)
        numerator += scaled * tensor
        denominator += scaled
    if not bool((denominator > 0).all()):
        raise SpliceError(
            f"fisher: {name}: some entries have no weight (every Fisher is 0 there and epsilon is 0, or the model "
            "weights cancel): give epsilon > 0 or positive model weights"
        )
    return numerator / denominator
