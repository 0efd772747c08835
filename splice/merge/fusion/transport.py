"""Ground costs, optimal transport (POT) and what is measured on the maps, all on torch tensors.

A map between a model's space (n_m neurons) and the anchor's (n_a neurons) is kept as the *coupling* T
[n_m, n_a] that the solver returns: non-negative, uniform marginals 1/n_m and 1/n_a, total mass 1.
Two normalisations of it are applied to weights:
- `output_map`: columns sum to 1. Outgoing weights, biases, LayerNorm parameters and embedding columns of
  anchor neuron j become the T-weighted *average* of the matched neurons: `W_al = output_map.T @ W`.
- `input_map`: rows sum to 1. The next layer's incoming weights *sum* the contributions of the neurons
  merged into j: `W_in = W @ input_map`.
With equal widths both equal n * T (the authors' `T / (1/n)`), a permutation matrix when T is one. With
unequal widths the authors' code uses the row-normalised form for both; averaging outputs and summing inputs
is what keeps the function when k identical neurons are merged into one (see docs of `engine.fuse`).
"""

from __future__ import annotations

import operator
import warnings
from functools import reduce

import torch

from splice.errors import SpliceError

SOLVERS = ("emd", "sinkhorn")
LOG_DOMAIN_BELOW = 0.05  # Sinkhorn's plain iterations stall (or under-flow) for smaller reg on max-normalised costs
EPS_STD = 1e-9


def standardize(acts: torch.Tensor) -> torch.Tensor:
    """Per-neuron standardisation over samples: acts [samples, neurons] -> (acts - mean) / (std + 1e-9)."""
    acts = acts.to(torch.float64, copy=True)
    std, mean = torch.std_mean(acts, 0, correction=0)
    return acts.sub_(mean).div_(std.add_(EPS_STD))


def unit_rows(points: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (the weight-based cost's normalisation)."""
    points = points.to(torch.float64)
    return points / points.norm(dim=1, keepdim=True).clamp_min(1e-12)


def ground_cost(points_m: torch.Tensor, points_a: torch.Tensor) -> torch.Tensor:
    """Euclidean (not squared) distances between the neurons as points [n, coords], divided by their max."""
    if points_m.shape[1] != points_a.shape[1]:
        raise SpliceError(
            f"cannot compare neurons described by {points_m.shape[1]} and {points_a.shape[1]} coordinates"
        )
    cost = torch.cdist(points_m.to(torch.float64), points_a.to(torch.float64))
    top = cost.max()
    return cost / top if top > 0 else cost


def solve(cost: torch.Tensor, solver: str = "emd", reg: float = 0.08) -> torch.Tensor:
    """Coupling [n_m, n_a] with uniform marginals: exact (network simplex) or entropic (Sinkhorn with `reg`,
    log-domain below reg 0.05). Runs where `cost` lives (POT's torch backend; EMD itself runs on the CPU)."""
    import ot

    n_m, n_a = cost.shape
    mu = torch.full((n_m,), 1.0 / n_m, dtype=torch.float64, device=cost.device)
    nu = torch.full((n_a,), 1.0 / n_a, dtype=torch.float64, device=cost.device)
    if solver == "emd":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan = ot.emd(mu, nu, cost, numItermax=10_000_000)
        for warning in caught:  # "numItermax reached before optimality" must not pass silently
            if "numItermax" in str(warning.message):
                raise SpliceError(f"exact OT did not converge on a {n_m}x{n_a} cost; try `solver='sinkhorn'`")
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    elif solver == "sinkhorn":
        method = "sinkhorn_log" if reg < LOG_DOMAIN_BELOW else "sinkhorn"
        plan = ot.sinkhorn(mu, nu, cost, reg, method=method, numItermax=5000, stopThr=1e-9, warn=False)
        if not torch.isfinite(plan).all() and method == "sinkhorn":
            plan = ot.sinkhorn(mu, nu, cost, reg, method="sinkhorn_log", numItermax=5000, stopThr=1e-9, warn=False)
        if not torch.isfinite(plan).all() or plan.sum() <= 0:
            raise SpliceError(
                f"Sinkhorn failed with reg {reg} on a {n_m}x{n_a} cost; use a larger `reg` or `solver='emd'`"
            )
    else:
        raise SpliceError(f"unknown solver {solver!r}: use one of {', '.join(SOLVERS)}")
    plan = plan.to(torch.float64)
    return plan / plan.sum()


def identity_coupling(n: int, device: torch.device) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64, device=device) / n


def output_map(coupling: torch.Tensor) -> torch.Tensor:
    """Columns sum to 1: W_al = output_map.T @ W averages the neurons matched to each anchor neuron."""
    return coupling / coupling.sum(0, keepdim=True).clamp_min(1e-300)


def input_map(coupling: torch.Tensor) -> torch.Tensor:
    """Rows sum to 1: W @ input_map sums, per anchor neuron, the inputs coming from the neurons merged into it."""
    return coupling / coupling.sum(1, keepdim=True).clamp_min(1e-300)


def head_couplings(
    costs: list[torch.Tensor], heads_m: int, heads_a: int, solver: str = "emd", reg: float = 0.08
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Maps that move attention heads whole (`--heads whole`): one coupling per head-structured space.

    `costs`: one max-normalised cost [n_m, n_a] per space of one attention block (e.g. Q/K and V). For every
    pair of heads (h, g) each space gets a within-head map solved on its block of the cost, and the pair costs
    the sum of those maps' transport costs; a head coupling H [heads_m, heads_a] is solved on that (normalised
    by its max). Each space's coupling is then sum over (h, g) of H[h, g] times the within-head map of (h, g)
    placed in block (h, g): uniform marginals, a permutation that never splits a head when both solves are
    exact and the heads and widths match. Returns (couplings, H)."""
    n_m, n_a = costs[0].shape
    size_m, size_a = n_m // heads_m, n_a // heads_a
    inner: list[list[list[torch.Tensor]]] = [[[] for _ in range(heads_m)] for _ in costs]  # [k][h][g]
    pair_cost = torch.zeros(heads_m, heads_a, dtype=torch.float64, device=costs[0].device)
    for h in range(heads_m):
        for g in range(heads_a):
            for k, cost in enumerate(costs):
                block = cost[h * size_m : (h + 1) * size_m, g * size_a : (g + 1) * size_a]
                coupling = solve(block, solver, reg)
                inner[k][h].append(coupling)
                pair_cost[h, g] += transport_cost(coupling, block)
    top = pair_cost.max()
    heads = solve(pair_cost / top if top > 0 else pair_cost, solver, reg)
    couplings = []
    for k in range(len(costs)):
        full = torch.zeros(n_m, n_a, dtype=torch.float64, device=costs[0].device)
        for h in range(heads_m):
            for g in range(heads_a):
                full[h * size_m : (h + 1) * size_m, g * size_a : (g + 1) * size_a] = heads[h, g] * inner[k][h][g]
        couplings.append(full)
    return couplings, heads


# -- residual policies (Imfeld et al. `resid_policy`): how maps combine where streams are added -----------------

RESIDUAL_POLICIES = ("average", "skip", "branch", "identity", "weighted_scalar", "weighted_matrix", "stream")
WEIGHTED_POLICIES = ("weighted_scalar", "weighted_matrix")


def stream_magnitudes(acts: torch.Tensor) -> torch.Tensor:
    """Mean |activation| per neuron over the sampled tokens: acts [tokens, neurons] -> [neurons]."""
    return acts.to(torch.float64).abs().mean(0)


def residual_weights(policy: str, magnitudes: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per input stream, the weight of its map for each anchor neuron ([n_a] each; they sum to 1 per neuron).

    `weighted_scalar`: one number per stream, its mean |activation| over tokens and neurons, normalised to
    sum to 1 over the streams. `weighted_matrix`: the same per neuron (the diagonals of D_skip, D_branch).
    Where every stream is silent the streams weigh equally."""
    if policy == "weighted_scalar":
        magnitudes = [m.mean().expand_as(m) for m in magnitudes]
    stacked = torch.stack([m.to(torch.float64) for m in magnitudes])  # [streams, n_a]
    total = stacked.sum(0, keepdim=True)
    even = torch.full_like(stacked, 1.0 / len(magnitudes))
    weights = torch.where(total > 0, stacked / total.clamp_min(1e-300), even)
    return list(weights)


def combine(policy: str, couplings: list[torch.Tensor], magnitudes: list[torch.Tensor] | None = None) -> torch.Tensor:
    """`average` (the authors' `mean`): the mean of the maps; `skip` (`only_resid`): the skip stream's map;
    `branch` (`no_resid`): the last branch's map; `identity` (`resid_as_identity`): no re-ordering;
    `weighted_scalar` / `weighted_matrix`: T = sum_k T_k D_k with the weights of `residual_weights`, from
    `magnitudes`, each stream's mean |activation| per anchor neuron (`stream_magnitudes`). Column sums (the
    anchor's marginal) are kept: each column is a convex combination of the maps' columns."""
    if policy == "average":
        return reduce(operator.add, couplings) / len(couplings)
    if policy in ("skip", "stream"):  # with `stream` every input already carries the stream's one map
        return couplings[0]
    if policy == "branch":
        return couplings[-1]
    if policy == "identity":
        n_m, n_a = couplings[0].shape
        if n_m != n_a:
            raise SpliceError("`residual='identity'` needs models of the same width")
        return identity_coupling(n_a, couplings[0].device)
    if policy in WEIGHTED_POLICIES:
        if magnitudes is None or len(magnitudes) != len(couplings):
            raise SpliceError(f"`residual={policy!r}` needs the activations of every stream added")
        weights = residual_weights(policy, magnitudes)
        return reduce(
            operator.add, (coupling * weight.to(coupling)[None, :] for coupling, weight in zip(couplings, weights))
        )
    raise SpliceError(f"unknown residual policy {policy!r}: use one of {', '.join(RESIDUAL_POLICIES)}")


# -- what the report measures ------------------------------------------------------------------------------------


def transport_cost(coupling: torch.Tensor, cost: torch.Tensor) -> float:
    """<T, M> with T of total mass 1 and M max-normalised: 0 when every neuron has an exact match."""
    return float((coupling * cost).sum())


def permutation_closeness(coupling: torch.Tensor) -> float:
    """The share of mass each neuron of the wider side sends to its single best partner: 1 for a permutation
    (or, between unequal widths, a hard many-to-one assignment); 1/n for the uniform map."""
    n_m, n_a = coupling.shape
    top = coupling.max(1).values if n_m >= n_a else coupling.max(0).values
    return float(top.sum() / coupling.sum())


def head_mass(coupling: torch.Tensor, heads_m: int, heads_a: int) -> tuple[float, float]:
    """(cross-head mass, head-split mass) of a map between head-structured spaces.

    cross-head: the share of mass that moves a neuron of head h to a neuron of a head with another index.
    head-split: the share that does not follow its source head's main destination head, i.e. what breaks
    heads apart (0 when whole heads are permuted, however far)."""
    n_m, n_a = coupling.shape
    size_m, size_a = n_m // heads_m, n_a // heads_a
    blocks = coupling.reshape(heads_m, size_m, heads_a, size_a).sum((1, 3))  # [heads_m, heads_a]
    total = blocks.sum()
    if heads_m == heads_a:
        cross = float((total - blocks.diagonal().sum()) / total)
    else:  # head indices of different head counts: compare relative positions
        owner_m = torch.arange(heads_m, device=blocks.device)[:, None] * heads_a // heads_m
        owner_a = torch.arange(heads_a, device=blocks.device)[None, :]
        cross = float(blocks[owner_m != owner_a].sum() / total)
    split = float((total - blocks.max(1).values.sum()) / total)
    return cross, split
