"""Aligning one model onto the anchor: the description walked in data-flow order, each node's tensors
transported by the maps of the spaces they sit between (the maps come from `maps.MapSolver`)."""

from __future__ import annotations

import torch

from splice.merge.fusion.architectures import Linear, NodeWalker, Norm, Residual, Step, Table
from splice.merge.fusion.maps import MapSolver, Pair, Tensors, align_inputs, align_outputs, projection, read_linear
from splice.merge.fusion.options import FusionOptions
from splice.merge.fusion.report import MapStat
from splice.merge.fusion.timing import Clock
from splice.progress import Progress

Block = tuple[torch.Tensor, torch.Tensor | None]  # (weight, bias or None) of one Linear


class PairAligner(NodeWalker):
    """Returns one model's tensors in the anchor's shapes and order, and the statistics of the maps used."""

    def __init__(self, pair: Pair, options: FusionOptions, clock: Clock):
        self.pair, self.options, self.clock = pair, options, clock
        self.solver = MapSolver(pair, options, clock)
        self.out: Tensors = {}
        self.pending: dict[str, list[Block | None]] = {}  # row blocks of a fused weight until all are aligned
        self.joint: dict[str, Block] = {}  # `--qk joint`: the partner's aligned half, until its step comes

    def run(self, progress: Progress) -> tuple[Tensors, list[MapStat]]:
        """Aligns every step; `progress` counts the maps made (and the bytes of the tensors aligned)."""
        model = self.pair.model
        stream = self.options.residual == "stream"
        progress.start(
            f"transport maps {model.location}",
            sum(1 for s in model.steps if s.node.defines) + stream,
            sum(model.step_bytes(step) for step in model.steps),
            unit="maps",
        )
        try:
            if stream:
                with self.clock.timed("ot"):
                    self.solver.stream_map()
                progress.advance(1, 0)
            for step in model.steps:
                step.node.visit(self, step)
                progress.advance(1 if step.node.defines else 0, model.step_bytes(step))
        finally:
            progress.finish()
        return self.out, self.solver.stats

    def linear(self, step: Step, node: Linear) -> None:
        if step.id in self.joint:  # aligned with its Q/K partner (`--qk joint`)
            self._put_linear(node, *self.joint.pop(step.id))
            return
        weight, bias = self._input_aligned(step, node)
        if node.out is not None:
            partner = self.solver.qk_partner(step, node)
            if self.options.qk == "joint" and partner is not None:
                self._joint_qk(step, node, (weight, bias), partner)
                return
            self.solver.linear_map(step, node, node.out, partner)
            out_map = self.solver.output_map(step, node.out)
            weight = align_outputs(weight, out_map)
            bias = align_outputs(bias, out_map) if bias is not None else None
        self._put_linear(node, weight, bias)

    def table(self, step: Step, node: Table) -> None:
        table = self.pair.state_m[node.tensor]
        self.solver.table_map(step, node)
        rows = table.reshape(-1, table.shape[-1])
        aligned = rows @ self.solver.output_map(step, node.space).to(rows.dtype)
        self.out[node.tensor] = aligned.reshape(self.pair.state_a[node.tensor].shape)

    def norm(self, step: Step, node: Norm) -> None:
        out_map = self.solver.output_map(step, node.space)
        for name in (node.weight, node.bias):
            if name in self.pair.state_m:
                self.out[name] = align_outputs(self.pair.state_m[name], out_map)

    def residual(self, step: Step, node: Residual) -> None:
        self.solver.residual_map(step, node)

    def _input_aligned(self, step: Step, node: Linear) -> Block:
        weight, bias = read_linear(self.pair.state_m, node)
        if node.inp is not None:
            weight = align_inputs(weight, self.solver.input_map(step, node.inp))
        return weight, bias

    def _joint_qk(self, step: Step, node: Linear, own: Block, partner: Step) -> None:
        """`--qk joint` (the authors' `joint`): [W_Q; W_K] fused as one layer under one map; the partner's
        aligned half is kept until its step comes."""
        (weight, bias), (other_weight, other_bias) = own, self._input_aligned(partner, projection(partner)[0])
        _, n_a = self.solver.joint_map(step, node, partner)
        out_map = self.solver.output_map(step, projection(step)[1])
        stacked = align_outputs(torch.cat([weight, other_weight]), out_map)
        biases = None
        if bias is not None and other_bias is not None:  # the described models have both biases or neither
            biases = align_outputs(torch.cat([bias, other_bias]), out_map)
        self.joint[partner.id] = (stacked[n_a:], None if biases is None else biases[n_a:])
        self._put_linear(node, stacked[:n_a], None if biases is None else biases[:n_a])

    def _put_linear(self, node: Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        if node.part is not None:
            k, n = node.part
            blocks = self.pending.setdefault(node.weight, [None] * n)
            blocks[k] = (weight, bias)
            done = [block for block in blocks if block is not None]
            if len(done) < n:
                return
            weight = torch.cat([block_weight for block_weight, _ in done])
            biases = [block_bias for _, block_bias in done if block_bias is not None]  # all or none: a shared bias
            bias = torch.cat(biases) if bias is not None else None
            del self.pending[node.weight]
        if node.conv1d:
            weight = weight.transpose(0, 1)
        self.out[node.weight] = weight.contiguous()
        if bias is not None:
            self.out[node.bias] = bias
