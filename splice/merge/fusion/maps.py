"""Solving the transport maps of one model onto the anchor: the points that describe each neuron (activations,
or input-aligned weights), the costs and solves under the Q/K, head and residual policies, and one `MapStat`
per map made."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splice.errors import SpliceError
from splice.merge.fusion import transport
from splice.merge.fusion.activations import input_key
from splice.merge.fusion.architectures import STREAM, Linear, Residual, Step, Table
from splice.merge.fusion.options import FusionOptions
from splice.merge.fusion.plan import ModelPlan
from splice.merge.fusion.report import MapStat
from splice.merge.fusion.streams import stream_taps, stream_writers
from splice.merge.fusion.timing import Clock

Tensors = dict[str, torch.Tensor]


def read_linear(state: Tensors, node: Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [out, in, *kernel], bias [out] or None) through the node's layout."""
    weight = state[node.weight]
    if node.conv1d:
        weight = weight.transpose(0, 1)
    bias = state.get(node.bias)
    if node.part is not None:
        k, n = node.part
        weight = weight.chunk(n)[k]
        bias = bias.chunk(n)[k] if bias is not None else None
    return weight, bias


def projection(step: Step) -> tuple[Linear, str]:
    """A Q, K or V projection's Linear and the space it defines: the steps a `role` finds (only those Linears
    have one, and each defines its space)."""
    node = step.node
    assert isinstance(node, Linear) and node.out is not None
    return node, node.out


def align_inputs(weight: torch.Tensor, in_map: torch.Tensor) -> torch.Tensor:
    return torch.einsum("oi...,ij->oj...", weight, in_map.to(weight.dtype))


def align_outputs(tensor: torch.Tensor, out_map: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,i...->j...", out_map.to(tensor.dtype), tensor)


@dataclass
class Pair:
    """One model and the anchor, with their tensors and (for activation alignment) their activations."""

    index: int  # the model's position among the inputs
    model: ModelPlan
    anchor: ModelPlan
    state_m: Tensors
    state_a: Tensors
    feats_m: Tensors | None = None
    feats_a: Tensors | None = None
    magnitudes: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # the weighted residual policies'

    def activations(self) -> tuple[Tensors, Tensors]:
        """(the model's, the anchor's): collected whenever activation alignment or `--residual stream` asks."""
        assert self.feats_m is not None and self.feats_a is not None
        return self.feats_m, self.feats_a


class MapSolver:
    """The maps of one model onto the anchor, one per space, made in data-flow order; solves are charged to the
    clock's "ot" phase by the caller."""

    def __init__(self, pair: Pair, options: FusionOptions, clock: Clock):
        self.pair, self.options, self.clock = pair, options, clock
        self.maps: dict[str, torch.Tensor] = {}
        self.stats: list[MapStat] = []
        self.partners = {(step.scope, step.node.role): step for step in pair.anchor.steps if step.node.role}
        self.writers = stream_writers(pair.model) if options.residual == "stream" else set()

    def input_map(self, step: Step, space: str) -> torch.Tensor:
        return transport.input_map(self.maps[step.space(space)])

    def output_map(self, step: Step, space: str) -> torch.Tensor:
        return transport.output_map(self.maps[step.space(space)])

    def stream_map(self) -> None:
        """`--residual stream`: one map for the residual stream, its neurons compared by their standardised
        values wherever the stream enters a block, all depths side by side."""
        taps = stream_taps(self.pair.anchor)
        points = [
            torch.cat([transport.standardize(feats[input_key(tap)]).T for tap in taps], 1)
            for feats in self.pair.activations()
        ]
        self.maps[STREAM] = self.solve("all layers", STREAM, points[0], points[1], 0)

    # points describing each neuron: activations over the sampled tokens, or (input-aligned) weights
    def linear_points(self, step: Step, node: Linear) -> tuple[torch.Tensor, torch.Tensor]:
        if self.options.align == "activations":
            return self.activation_points(node.module, node.part)
        weight_m, _ = read_linear(self.pair.state_m, node)
        weight_a, _ = read_linear(self.pair.state_a, node)
        if node.inp is not None:
            weight_m = align_inputs(weight_m, self.input_map(step, node.inp))
        return transport.unit_rows(weight_m.flatten(1)), transport.unit_rows(weight_a.flatten(1))

    def activation_points(self, module: str, part: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        points = []
        for feats in self.pair.activations():
            acts = feats[module]
            if part is not None:
                acts = acts.chunk(part[1], dim=1)[part[0]]
            points.append(transport.standardize(acts).T)
        return points[0], points[1]

    def table_points(self, node: Table) -> tuple[torch.Tensor, torch.Tensor]:
        if node.source == "activations" and self.options.align == "activations":
            return self.activation_points(node.module, None)
        rows_m, rows_a = (
            state[node.tensor].reshape(-1, state[node.tensor].shape[-1])
            for state in (self.pair.state_m, self.pair.state_a)
        )
        if self.options.align == "activations":  # the columns are the activations (the authors')
            return transport.standardize(rows_m).T, transport.standardize(rows_a).T
        return transport.unit_rows(rows_m.T), transport.unit_rows(rows_a.T)

    def solve(self, scope: str, space: str, points_m: torch.Tensor, points_a: torch.Tensor, heads: int) -> torch.Tensor:
        cost = transport.ground_cost(points_m, points_a)
        coupling = transport.solve(cost, self.options.solver, self.options.reg)
        self.record(scope, space, "ot", coupling, cost, heads)
        return coupling

    def record(
        self,
        scope: str,
        space: str,
        kind: str,
        coupling: torch.Tensor,
        cost: torch.Tensor | None = None,
        heads: int = 0,
        skip_weight: float | None = None,
    ) -> None:
        """`heads`: how many head blocks the map's spaces hold per model (0: not head-structured)."""
        cross = split = None
        if heads:
            cross, split = transport.head_mass(coupling, heads * self.pair.model.heads, heads * self.pair.anchor.heads)
        self.stats.append(
            MapStat(
                self.pair.index,
                scope,
                space,
                kind,
                (coupling.shape[0], coupling.shape[1]),
                transport.permutation_closeness(coupling),
                None if cost is None else transport.transport_cost(coupling, cost),
                cross,
                split,
                skip_weight,
            )
        )

    def qk_partner(self, step: Step, node: Linear) -> Step | None:
        """The key projection of a query projection (and the other way round) in the same scope."""
        other = {"q": "k", "k": "q"}.get(node.role or "")
        return self.partners.get((step.scope, other)) if other else None

    def linear_map(self, step: Step, node: Linear, out: str, partner: Step | None) -> None:
        """The map of the space a Linear defines (`out`, its `node.out`), unless it has one already (a shared or
        whole-head map)."""
        space = step.space(out)
        if space in self.writers:
            self.maps[space] = self.maps[STREAM]
        elif space not in self.maps:
            with self.clock.timed("ot"):
                if self.options.heads == "whole" and node.heads:
                    self.whole_head_maps(step)
                else:
                    self.maps[space] = self._map_for(step, node, out, partner)

    def _map_for(self, step: Step, node: Linear, out: str, partner: Step | None) -> torch.Tensor:
        if self.options.qk == "shared" and partner is not None:
            partner_node, partner_out = projection(partner)
            q_m, q_a = self.linear_points(step, node)
            k_m, k_a = self.linear_points(partner, partner_node)
            coupling = self.solve(step.scope, "qk", torch.cat([q_m, k_m], 1), torch.cat([q_a, k_a], 1), int(node.heads))
            self.maps[partner.space(partner_out)] = coupling
            return coupling
        points_m, points_a = self.linear_points(step, node)
        return self.solve(step.scope, out, points_m, points_a, int(node.heads))

    def whole_head_maps(self, step: Step) -> None:
        """`--heads whole`: the Q, K and V maps of one attention block from one head assignment (heads move as
        units, so every head keeps its queries, keys and values together); within a head Q and K share a
        map with `--qk shared`."""
        found = [self.partners.get((step.scope, role)) for role in ("q", "k", "v")]
        block = [member for member in found if member is not None]
        if len(block) < len(found):
            raise SpliceError(
                f"{self.pair.model.location}: {step.scope} has no query, key and value projections "
                "to move whole heads with; use `heads='mixed'`"
            )
        points = [self.linear_points(member, projection(member)[0]) for member in block]
        groups: list[tuple[str, list[Step], torch.Tensor, torch.Tensor]]
        if self.options.qk == "shared":
            groups = [
                (
                    "qk",
                    block[:2],
                    torch.cat([points[0][0], points[1][0]], 1),
                    torch.cat([points[0][1], points[1][1]], 1),
                ),
                ("v", block[2:], *points[2]),
            ]
        else:
            groups = [(projection(member)[1], [member], *pair) for member, pair in zip(block, points)]
        costs = [transport.ground_cost(points_m, points_a) for _, _, points_m, points_a in groups]
        couplings, _ = transport.head_couplings(
            costs, self.pair.model.heads, self.pair.anchor.heads, self.options.solver, self.options.reg
        )
        for (name, members, _, _), coupling, cost in zip(groups, couplings, costs):
            for member in members:
                self.maps[member.space(projection(member)[1])] = coupling
            self.record(step.scope, name, "ot", coupling, cost, 1)

    def joint_map(self, step: Step, node: Linear, partner: Step) -> tuple[torch.Tensor, int]:
        """`--qk joint`: one map over the query and the key neurons together ([2 n_m, 2 n_a]), set for both
        spaces; also the number of the anchor's own (first-half) neurons."""
        partner_node, partner_out = projection(partner)
        with self.clock.timed("ot"):
            own_m, own_a = self.linear_points(step, node)
            other_m, other_a = self.linear_points(partner, partner_node)
            coupling = self.solve(
                step.scope, "qk", torch.cat([own_m, other_m]), torch.cat([own_a, other_a]), 2 * int(node.heads)
            )
        self.maps[step.space(projection(step)[1])] = self.maps[partner.space(partner_out)] = coupling
        return coupling, own_a.shape[0]

    def table_map(self, step: Step, node: Table) -> None:
        """The map of a table's space: the stream's (a stream writer), solved (a defining table) or as it is."""
        space = step.space(node.space)
        if space in self.writers:
            self.maps[space] = self.maps[STREAM]
        elif node.source is not None:
            with self.clock.timed("ot"):
                points_m, points_a = self.table_points(node)
                self.maps[space] = self.solve(step.scope, node.space, points_m, points_a, 0)

    def residual_map(self, step: Step, node: Residual) -> None:
        magnitudes = self.pair.magnitudes.get(step.id)
        coupling = transport.combine(self.options.residual, [self.maps[step.space(n)] for n in node.inputs], magnitudes)
        self.maps[step.space(node.out)] = coupling
        skip = None
        if magnitudes is not None and self.options.weighted:
            skip = float(transport.residual_weights(self.options.residual, magnitudes)[0].mean())
        self.record(step.scope, node.out, "residual", coupling, skip_weight=skip)
