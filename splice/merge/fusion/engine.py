"""Optimal-transport fusion of transformers (Imfeld et al., ICLR 2024), one generic engine over the
declarative descriptions in `architectures.py`.

For each model other than the anchor, the engine walks the description in data-flow order and keeps one
transport map per space: a `Linear` aligns its input with the map of its input space, solves a map for its
output space (from activations or from its input-aligned weights) and aligns its outputs with it; LayerNorms
and embedding tables are transported by the map of their space; residual adds combine maps by the residual
policy. The aligned models and the anchor are then averaged with weights 1/N (for N > 2 this is the
authors' average of the N-1 pairwise fusions). Models of other widths are aligned into the anchor's width,
so the output always has the anchor's shapes and config.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from splice.errors import IncompatibleModelsError, SpliceError
from splice.merge.fusion import transport
from splice.merge.fusion.activations import DataSource, Inputs, build_model, collect, input_key, load_inputs
from splice.merge.fusion.architectures import (
    ARCHITECTURES,
    STREAM,
    Architecture,
    Linear,
    Norm,
    Residual,
    Step,
    Table,
    is_copied,
    required_names,
    steps,
    supported,
    tensor_names,
)
from splice.merge.fusion.report import FusionReport, MapStat
from splice.progress import NoProgress, Progress
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.device import resolve_device
from splice.tensors.stream import open_all, read_floats
from splice.tensors.writer import (
    DEFAULT_SHARD_SIZE,
    copy_side_files,
    ensure_output_free,
    staged_output,
    write_state_dict,
)

ALIGNMENTS = ("activations", "weights")
QK_POLICIES = ("separate", "shared", "joint")
HEAD_POLICIES = ("mixed", "whole")
DEFAULT_TOKENS = 4096
TIMED = ("read", "activations", "ot", "transport", "write")  # the report's `timings`, besides "total"
EMD_ON_CPU = ("exact OT (POT's network simplex) runs on the CPU: costs are built on {device}, copied to the CPU "
              "for each EMD solve and the map copied back")


class _Clock:
    """Wall time per phase; synchronises the GPU at the edges so queued kernels are charged to their phase."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = dict.fromkeys(TIMED, 0.0)

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        self._sync()
        started = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[phase] += time.perf_counter() - started

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@dataclass
class ModelPlan:
    """One input model as the description sees it."""

    location: str
    checkpoint: Checkpoint
    config: dict[str, Any]
    arch: Architecture
    class_name: str
    steps: list[Step]
    widths: dict[str, int]  # space -> number of neurons
    heads: int
    copied: list[str]  # stored tensors taken from the anchor as they are (buffers, integer tensors)


# -- planning: every check that can fail happens here, before any tensor is read ----------------------------------

def _shape_of_linear(node: Linear, shapes: dict[str, tuple[int, ...]], where: str) -> tuple[int, ...]:
    shape = shapes[node.weight]
    if len(shape) < 2:
        raise SpliceError(f"{where}: {node.weight} has shape {shape}; a linear layer's weight has 2 or more dims")
    if node.conv1d:
        shape = (shape[1], shape[0], *shape[2:])
    if node.part is not None:
        k, n = node.part
        if shape[0] % n:
            raise SpliceError(f"{where}: {node.weight} has {shape[0]} outputs, not divisible into {n} blocks")
        shape = (shape[0] // n, *shape[1:])
    bias = shapes.get(node.bias)
    if bias is not None and bias != ((shape[0] * (node.part[1] if node.part else 1)),):
        raise SpliceError(f"{where}: {node.bias} has shape {bias}, which does not fit {node.weight}")
    return shape


def _plan_widths(plan_steps: list[Step], shapes: dict[str, tuple[int, ...]], where: str) -> dict[str, int]:
    widths: dict[str, int] = {}

    def need(space: str, size: int, tensor: str) -> None:
        if space not in widths:
            raise SpliceError(f"{where}: the fusion description uses space {space} before defining it")
        if widths[space] != size:
            raise SpliceError(f"{where}: {tensor} has {size} features where {widths[space]} are expected; "
                              "the checkpoint does not match its config")

    for step in plan_steps:
        node = step.node
        if isinstance(node, Linear):
            shape = _shape_of_linear(node, shapes, where)
            if node.inp is not None:
                need(step.space(node.inp), shape[1], node.weight)
            if node.out is not None:
                widths[step.space(node.out)] = shape[0]
        elif isinstance(node, Table):
            width = shapes[node.tensor][-1]
            if node.source is None:
                need(step.space(node.space), width, node.tensor)
            else:
                widths[step.space(node.space)] = width
        elif isinstance(node, Norm):
            for name in (node.weight, node.bias):
                if name in shapes:
                    need(step.space(node.space), shapes[name][0], name)
        elif isinstance(node, Residual):
            sizes = {widths[step.space(name)] for name in node.inputs}
            if len(sizes) != 1:
                raise SpliceError(f"{where}: {step.scope}: residual inputs {node.inputs} have widths {sizes}")
            widths[step.space(node.out)] = sizes.pop()
    return widths


def _plan_model(checkpoint: Checkpoint) -> ModelPlan:
    location = checkpoint.location
    config = checkpoint.config()
    if config is None:
        raise SpliceError(f"{location}: no config.json; fusion needs the model's config")
    arch = ARCHITECTURES.get(config.get("model_type"))
    if arch is None:
        raise SpliceError(f"{location}: fuse does not support model_type {config.get('model_type')!r}; "
                          f"supported: {supported()}")
    present = set(checkpoint.tensors)
    declared = config.get("architectures") or []
    if declared:
        class_name = declared[0]
        if class_name not in arch.classes:
            raise SpliceError(f"{location}: fuse does not support {class_name}; supported: {supported()}")
    else:  # no class recorded: the backbone prefix of the stored names decides
        first = next(node for node in arch.embeddings if required_names(node))
        candidates = [cls for cls, base in arch.classes.items()
                      if {name.format(base=base) for name in required_names(first)} <= present]
        if not candidates:
            raise SpliceError(f"{location}: not a {arch.name} checkpoint fuse can read; supported: {supported()}")
        class_name = candidates[0]
    layers = config.get(arch.layers_key)
    heads = config.get(arch.heads_key)
    if not isinstance(layers, int) or not isinstance(heads, int) or layers < 1 or heads < 1:
        raise SpliceError(f"{location}: config.json lacks {arch.layers_key} or {arch.heads_key}")
    plan_steps = steps(arch, arch.classes[class_name], layers, present)
    covered: set[str] = set()
    for step in plan_steps:
        missing = sorted(required_names(step.node) - present)
        if missing:
            raise SpliceError(f"{location}: tensor {missing[0]} is missing; this is not a standard {class_name} "
                              f"checkpoint with {layers} layers")
        covered |= tensor_names(step.node) & present
    copied = []
    for name in sorted(present - covered):
        if is_copied(arch, name) or not checkpoint.tensors[name].dtype.is_floating_point:
            copied.append(name)
        else:
            raise SpliceError(f"{location}: fuse does not know where tensor {name} sits in a {class_name}; "
                              "only the standard layout is supported")
    shapes = {name: info.shape for name, info in checkpoint.tensors.items()}
    widths = _plan_widths(plan_steps, shapes, location)
    for step in plan_steps:
        node = step.node
        if isinstance(node, Linear) and node.heads and widths[step.space(node.out)] % heads:
            raise SpliceError(f"{location}: {node.weight}: {widths[step.space(node.out)]} outputs do not split "
                              f"into {heads} heads")
    return ModelPlan(location, checkpoint, config, arch, class_name, plan_steps, widths, heads, copied)


def _check_compatible(plans: list[ModelPlan]) -> None:
    first = plans[0]
    for other in plans[1:]:
        pair = f"{first.location} and {other.location}"
        if other.class_name != first.class_name:
            raise IncompatibleModelsError(f"{pair} are different architectures ({first.class_name} vs "
                                          f"{other.class_name}); fusion needs one architecture")
        arch = first.arch
        depth_a, depth_b = first.config[arch.layers_key], other.config[arch.layers_key]
        if depth_a != depth_b:
            raise IncompatibleModelsError(f"{pair} have different depths ({depth_a} vs {depth_b} layers); fusion "
                                          "pairs layers one to one, so the depths must agree")
        for key in arch.must_match:
            value_a, value_b = first.config.get(key), other.config.get(key)
            if value_a != value_b:
                if key == "vocab_size":
                    raise IncompatibleModelsError(f"{pair} have different vocabularies ({value_a} vs {value_b} "
                                                  "tokens); fusion needs the same tokenizer")
                raise IncompatibleModelsError(f"{pair} disagree on config {key} ({value_a!r} vs {value_b!r}); "
                                              "only widths may differ between fused models")
        if [s.id for s in other.steps] != [s.id for s in first.steps]:
            extra = sorted({s.id for s in first.steps} ^ {s.id for s in other.steps})
            raise IncompatibleModelsError(f"{pair} have different parts ({extra[0]} is in only one of them)")
        shape_a = {name: info.shape for name, info in first.checkpoint.tensors.items()}
        shape_b = {name: info.shape for name, info in other.checkpoint.tensors.items()}
        for step in first.steps:
            _check_fixed_dims(step.node, shape_a, shape_b, pair)


def _check_fixed_dims(node, shape_a: dict[str, tuple[int, ...]], shape_b: dict[str, tuple[int, ...]],
                      pair: str) -> None:
    """Axes that no transport map re-orders must agree: class count, vocabulary, positions, kernels."""
    if isinstance(node, Linear):
        a, b = _shape_of_linear(node, shape_a, pair), _shape_of_linear(node, shape_b, pair)
        if node.out is None and a[0] != b[0]:
            raise IncompatibleModelsError(f"{pair} disagree on {node.weight}: {a[0]} vs {b[0]} outputs "
                                          "(a different number of labels?)")
        if node.inp is None and a[1:] != b[1:]:
            raise IncompatibleModelsError(f"{pair} disagree on the input of {node.weight}: {a[1:]} vs {b[1:]}")
        if (node.bias in shape_a) != (node.bias in shape_b):
            raise IncompatibleModelsError(f"{pair}: only one of them has {node.bias}")
    elif isinstance(node, Table):
        if shape_a[node.tensor][:-1] != shape_b[node.tensor][:-1]:
            raise IncompatibleModelsError(f"{pair} disagree on {node.tensor}: {shape_a[node.tensor]} vs "
                                          f"{shape_b[node.tensor]}")
    elif isinstance(node, Norm) and (node.bias in shape_a) != (node.bias in shape_b):
        raise IncompatibleModelsError(f"{pair}: only one of them has {node.bias}")


def plan(models: Sequence[str | os.PathLike], storage_options: dict | None = None) -> list[ModelPlan]:
    """Open and check the models: supported architecture, same depth, vocabulary and config but for widths."""
    plans = [_plan_model(checkpoint) for checkpoint in open_all([str(m) for m in models], storage_options)]
    _check_compatible(plans)
    return plans


# -- aligning one model onto the anchor -----------------------------------------------------------------------------

def _read_linear(state: dict[str, torch.Tensor], node: Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
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


def _align_inputs(weight: torch.Tensor, in_map: torch.Tensor) -> torch.Tensor:
    return torch.einsum("oi...,ij->oj...", weight, in_map.to(weight.dtype))


def _align_outputs(tensor: torch.Tensor, out_map: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,i...->j...", out_map.to(tensor.dtype), tensor)


@dataclass
class FusionOptions:
    align: str = "activations"
    solver: str = "emd"
    reg: float = 0.08
    residual: str = "average"
    qk: str = "separate"
    heads: str = "mixed"


# -- where the activation-weighted residual policies read each stream -------------------------------------------

@dataclass(frozen=True)
class _Source:
    """One stream's values at a residual add: a module's output ("output"), what enters a module ("input"),
    or the rows of an embedding table ("rows")."""

    kind: str
    name: str
    part: tuple[int, int] | None = None


def _stream_sources(model: ModelPlan) -> dict[str, list[_Source]]:
    """{residual step id: one source per input stream}, from the description's taps and defining nodes."""
    definers: dict[str, _Source | None] = {}
    sources: dict[str, list[_Source]] = {}
    for step in model.steps:
        node = step.node
        if isinstance(node, Linear) and node.out is not None:
            definers[step.space(node.out)] = _Source("output", node.module, node.part)
        elif isinstance(node, Table) and node.source is not None:
            definers[step.space(node.space)] = (_Source("output", node.module) if node.source == "activations"
                                                else _Source("rows", node.tensor))
        elif isinstance(node, Residual):
            found = []
            for position, name in enumerate(node.inputs):
                tap = node.taps[position] if position < len(node.taps) else None
                source = _Source("input", tap) if tap is not None else definers.get(step.space(name))
                if source is None:
                    raise SpliceError(f"{model.location}: the {model.arch.name} description gives no activations "
                                      f"for stream {name!r} at {step.id}; use another --residual policy")
                found.append(source)
            sources[step.id] = found
            definers[step.space(node.out)] = None
    return sources


def _stream_taps(model: ModelPlan) -> list[str]:
    """Modules whose input is the residual stream (the skip input of every add that has one), in order."""
    return list(dict.fromkeys(step.node.taps[0] for step in model.steps
                              if isinstance(step.node, Residual) and step.node.taps and step.node.taps[0]))


def _stream_writers(model: ModelPlan) -> set[str]:
    """The spaces added into the residual stream (embeddings, attention outputs, MLP outputs)."""
    return {step.space(name) for step in model.steps if isinstance(step.node, Residual)
            for name in step.node.inputs if name != STREAM}


def _stream_magnitudes(sources: dict[str, list[_Source]], feats: dict[str, torch.Tensor],
                       state: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """{residual step id: per input stream, its mean |activation| per neuron} in the anchor."""
    out = {}
    for step_id, found in sources.items():
        magnitudes = []
        for source in found:
            if source.kind == "rows":
                table = state[source.name]
                acts = table.reshape(-1, table.shape[-1])
            else:
                acts = feats[source.name if source.kind == "output" else input_key(source.name)]
                if source.part is not None:
                    acts = acts.chunk(source.part[1], dim=1)[source.part[0]]
            magnitudes.append(transport.stream_magnitudes(acts))
        out[step_id] = magnitudes
    return out


class _PairAligner:
    """Aligns one model onto the anchor: returns its tensors in the anchor's shapes, and the map statistics."""

    def __init__(self, index: int, model: ModelPlan, anchor: ModelPlan, state_m: dict[str, torch.Tensor],
                 state_a: dict[str, torch.Tensor], feats_m: dict[str, torch.Tensor] | None,
                 feats_a: dict[str, torch.Tensor] | None, options: FusionOptions,
                 magnitudes: dict[str, list[torch.Tensor]] | None = None, clock: _Clock | None = None):
        self.index, self.model, self.anchor = index, model, anchor
        self.state_m, self.state_a = state_m, state_a
        self.feats_m, self.feats_a = feats_m, feats_a
        self.options = options
        self.magnitudes = magnitudes or {}
        self.clock = clock or _Clock(torch.device("cpu"))
        self.maps: dict[str, torch.Tensor] = {}
        self.out: dict[str, torch.Tensor] = {}
        self.pending: dict[str, list[tuple[torch.Tensor, torch.Tensor | None] | None]] = {}
        self.stats: list[MapStat] = []
        self.joint: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.partners = {(step.scope, step.node.role): step for step in anchor.steps
                         if isinstance(step.node, Linear) and step.node.role}
        self.writers = _stream_writers(model) if options.residual == "stream" else set()

    def run(self) -> tuple[dict[str, torch.Tensor], list[MapStat]]:
        if self.options.residual == "stream":
            with self.clock.timed("ot"):
                self.maps[STREAM] = self._stream_map()
        for step in self.model.steps:
            node = step.node
            if isinstance(node, Linear):
                self._linear(step, node)
            elif isinstance(node, Table):
                self._table(step, node)
            elif isinstance(node, Norm):
                out_map = transport.output_map(self.maps[step.space(node.space)])
                for name in (node.weight, node.bias):
                    if name in self.state_m:
                        self.out[name] = _align_outputs(self.state_m[name], out_map)
            elif isinstance(node, Residual):
                magnitudes = self.magnitudes.get(step.id)
                coupling = transport.combine(self.options.residual, [self.maps[step.space(n)] for n in node.inputs],
                                             magnitudes)
                self.maps[step.space(node.out)] = coupling
                skip = None
                if magnitudes is not None and self.options.residual in transport.WEIGHTED_POLICIES:
                    skip = float(transport.residual_weights(self.options.residual, magnitudes)[0].mean())
                self._record(step.scope, node.out, "residual", coupling, skip_weight=skip)
        return self.out, self.stats

    def _stream_map(self) -> torch.Tensor:
        """`--residual stream`: one map for the residual stream, its neurons compared by their standardised
        values wherever the stream enters a block, all depths side by side."""
        taps = _stream_taps(self.anchor)
        points = [torch.cat([transport.standardize(feats[input_key(tap)]).T for tap in taps], 1)
                  for feats in (self.feats_m, self.feats_a)]
        return self._solve("all layers", STREAM, points[0], points[1], 0)

    # points describing each neuron: activations over the sampled tokens, or (input-aligned) weights
    def _linear_points(self, step: Step, node: Linear) -> tuple[torch.Tensor, torch.Tensor]:
        if self.options.align == "activations":
            return self._activation_points(node.module, node.part)
        weight_m, _ = _read_linear(self.state_m, node)
        weight_a, _ = _read_linear(self.state_a, node)
        if node.inp is not None:
            weight_m = _align_inputs(weight_m, transport.input_map(self.maps[step.space(node.inp)]))
        return transport.unit_rows(weight_m.flatten(1)), transport.unit_rows(weight_a.flatten(1))

    def _activation_points(self, module: str, part: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        points = []
        for feats in (self.feats_m, self.feats_a):
            acts = feats[module]
            if part is not None:
                acts = acts.chunk(part[1], dim=1)[part[0]]
            points.append(transport.standardize(acts).T)
        return points[0], points[1]

    def _solve(self, scope: str, space: str, points_m: torch.Tensor, points_a: torch.Tensor,
               heads: int) -> torch.Tensor:
        cost = transport.ground_cost(points_m, points_a)
        coupling = transport.solve(cost, self.options.solver, self.options.reg)
        self._record(scope, space, "ot", coupling, cost, heads)
        return coupling

    def _record(self, scope: str, space: str, kind: str, coupling: torch.Tensor, cost: torch.Tensor | None = None,
                heads: int = 0, skip_weight: float | None = None) -> None:
        """`heads`: how many head blocks the map's spaces hold per model (0: not head-structured)."""
        cross = split = None
        if heads:
            cross, split = transport.head_mass(coupling, heads * self.model.heads, heads * self.anchor.heads)
        self.stats.append(MapStat(
            self.index, scope, space, kind, tuple(coupling.shape), transport.permutation_closeness(coupling),
            None if cost is None else transport.transport_cost(coupling, cost), cross, split, skip_weight))

    def _linear(self, step: Step, node: Linear) -> None:
        if step.id in self.joint:  # aligned with its Q/K partner (`--qk joint`)
            self._put_linear(node, *self.joint.pop(step.id))
            return
        weight, bias = self._input_aligned(step, node)
        if node.out is not None:
            space = step.space(node.out)
            partner = self._qk_partner(step, node)
            if self.options.qk == "joint" and partner is not None:
                self._joint_qk(step, node, weight, bias, partner)
                return
            if space in self.writers:
                self.maps[space] = self.maps[STREAM]
            elif space not in self.maps:
                with self.clock.timed("ot"):
                    if self.options.heads == "whole" and node.heads:
                        self._whole_head_maps(step)
                    else:
                        self.maps[space] = self._map_for(step, node, partner)
            out_map = transport.output_map(self.maps[space])
            weight = _align_outputs(weight, out_map)
            bias = _align_outputs(bias, out_map) if bias is not None else None
        self._put_linear(node, weight, bias)

    def _input_aligned(self, step: Step, node: Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight, bias = _read_linear(self.state_m, node)
        if node.inp is not None:
            weight = _align_inputs(weight, transport.input_map(self.maps[step.space(node.inp)]))
        return weight, bias

    def _qk_partner(self, step: Step, node: Linear) -> Step | None:
        """The key projection of a query projection (and the other way round) in the same scope."""
        other = {"q": "k", "k": "q"}.get(node.role or "")
        return self.partners.get((step.scope, other)) if other else None

    def _map_for(self, step: Step, node: Linear, partner: Step | None) -> torch.Tensor:
        if self.options.qk == "shared" and partner is not None:
            q_m, q_a = self._linear_points(step, node)
            k_m, k_a = self._linear_points(partner, partner.node)
            coupling = self._solve(step.scope, "qk", torch.cat([q_m, k_m], 1), torch.cat([q_a, k_a], 1),
                                   int(node.heads))
            self.maps[partner.space(partner.node.out)] = coupling
            return coupling
        points_m, points_a = self._linear_points(step, node)
        return self._solve(step.scope, node.out, points_m, points_a, int(node.heads))

    def _whole_head_maps(self, step: Step) -> None:
        """`--heads whole`: the Q, K and V maps of one attention block from one head assignment (heads move as
        units, so every head keeps its queries, keys and values together); within a head Q and K share a
        map with `--qk shared`."""
        block = [self.partners.get((step.scope, role)) for role in ("q", "k", "v")]
        if any(member is None for member in block):
            raise SpliceError(f"{self.model.location}: {step.scope} has no query, key and value projections to "
                              "move whole heads with; use --heads mixed")
        points = [self._linear_points(member, member.node) for member in block]
        if self.options.qk == "shared":
            groups = [("qk", block[:2], torch.cat([points[0][0], points[1][0]], 1),
                       torch.cat([points[0][1], points[1][1]], 1)), ("v", block[2:], *points[2])]
        else:
            groups = [(member.node.out, [member], *pair) for member, pair in zip(block, points)]
        costs = [transport.ground_cost(points_m, points_a) for _, _, points_m, points_a in groups]
        couplings, _ = transport.head_couplings(costs, self.model.heads, self.anchor.heads, self.options.solver,
                                                self.options.reg)
        for (name, members, _, _), coupling, cost in zip(groups, couplings, costs):
            for member in members:
                self.maps[member.space(member.node.out)] = coupling
            self._record(step.scope, name, "ot", coupling, cost, 1)

    def _joint_qk(self, step: Step, node: Linear, weight: torch.Tensor, bias: torch.Tensor | None,
                  partner: Step) -> None:
        """`--qk joint` (the authors' `joint`): [W_Q; W_K] fused as one layer, one map over the query and the key
        neurons together ([2 n_m, 2 n_a]); the partner's aligned half is kept until its node comes."""
        other_weight, other_bias = self._input_aligned(partner, partner.node)
        with self.clock.timed("ot"):
            own_m, own_a = self._linear_points(step, node)
            other_m, other_a = self._linear_points(partner, partner.node)
            coupling = self._solve(step.scope, "qk", torch.cat([own_m, other_m]), torch.cat([own_a, other_a]),
                                   2 * int(node.heads))
        out_map = transport.output_map(coupling)
        n_a = own_a.shape[0]
        stacked = _align_outputs(torch.cat([weight, other_weight]), out_map)
        biases = None
        if bias is not None and other_bias is not None:  # the described models have both biases or neither
            biases = _align_outputs(torch.cat([bias, other_bias]), out_map)
        self.maps[step.space(node.out)] = self.maps[partner.space(partner.node.out)] = coupling
        self.joint[partner.id] = (stacked[n_a:], None if biases is None else biases[n_a:])
        self._put_linear(node, stacked[:n_a], None if biases is None else biases[:n_a])

    def _put_linear(self, node: Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        if node.part is not None:
            k, n = node.part
            blocks = self.pending.setdefault(node.weight, [None] * n)
            blocks[k] = (weight, bias)
            if any(block is None for block in blocks):
                return
            weight = torch.cat([block[0] for block in blocks])
            bias = torch.cat([block[1] for block in blocks]) if bias is not None else None
            del self.pending[node.weight]
        if node.conv1d:
            weight = weight.transpose(0, 1)
        self.out[node.weight] = weight.contiguous()
        if bias is not None:
            self.out[node.bias] = bias

    def _table(self, step: Step, node: Table) -> None:
        table = self.state_m[node.tensor]
        rows = table.reshape(-1, table.shape[-1])
        space = step.space(node.space)
        if space in self.writers:
            self.maps[space] = self.maps[STREAM]
        elif node.source is not None:
            with self.clock.timed("ot"):
                if node.source == "activations" and self.options.align == "activations":
                    points_m, points_a = self._activation_points(node.module, None)
                else:
                    table_a = self.state_a[node.tensor]
                    rows_a = table_a.reshape(-1, table_a.shape[-1])
                    if self.options.align == "activations":  # the columns are the activations (the authors')
                        points_m, points_a = transport.standardize(rows).T, transport.standardize(rows_a).T
                    else:
                        points_m, points_a = transport.unit_rows(rows.T), transport.unit_rows(rows_a.T)
                self.maps[space] = self._solve(step.scope, node.space, points_m, points_a, 0)
        aligned = rows @ transport.output_map(self.maps[space]).to(rows.dtype)
        self.out[node.tensor] = aligned.reshape(self.state_a[node.tensor].shape)


# -- the whole fusion -----------------------------------------------------------------------------------------------

def _hooked_modules(model: ModelPlan, align: str, residual: str) -> set[str]:
    """Modules whose outputs the activation alignment compares (none for weight alignment). With `--residual
    stream` the modules writing into the stream take the stream's map and are not compared."""
    if align != "activations":
        return set()
    writers = _stream_writers(model) if residual == "stream" else set()
    modules = set()
    for step in model.steps:
        node = step.node
        if isinstance(node, Linear) and node.out is not None and step.space(node.out) not in writers:
            modules.add(node.module)
        elif isinstance(node, Table) and node.source == "activations" and step.space(node.space) not in writers:
            modules.add(node.module)
    return modules


def _activations(model: ModelPlan, state: dict[str, torch.Tensor], inputs: Inputs | None, tokens: int,
                 device: torch.device, modules: set[str],
                 inputs_of: set[str] | frozenset[str] = frozenset()) -> dict[str, torch.Tensor] | None:
    if inputs is None or not (modules or inputs_of):
        return None
    live = build_model(model.class_name, model.config, state, device, model.location)
    try:
        return collect(live, modules, inputs, tokens, device, inputs_of)
    finally:
        del live


def _check_options(options: FusionOptions, count: int, anchor: int, tokens: int, has_data: bool) -> None:
    if count < 2:
        raise SpliceError(f"fusion needs at least two models, got {count}")
    if not 0 <= anchor < count:
        raise SpliceError(f"--anchor {anchor} is not a model index: give 0..{count - 1}")
    if options.align not in ALIGNMENTS:
        raise SpliceError(f"unknown alignment {options.align!r}: use one of {', '.join(ALIGNMENTS)}")
    if options.solver not in transport.SOLVERS:
        raise SpliceError(f"unknown solver {options.solver!r}: use one of {', '.join(transport.SOLVERS)}")
    if options.solver == "sinkhorn" and not options.reg > 0:
        raise SpliceError(f"--reg must be positive for Sinkhorn, got {options.reg}")
    if options.residual not in transport.RESIDUAL_POLICIES:
        raise SpliceError(f"unknown residual policy {options.residual!r}: use one of "
                          f"{', '.join(transport.RESIDUAL_POLICIES)}")
    if options.residual in transport.WEIGHTED_POLICIES and options.align == "weights" and not has_data:
        raise SpliceError(f"--residual {options.residual} weighs the maps by the streams' activations: give --data "
                          "(with --align weights only the anchor is run, to measure them)")
    if options.residual == "stream" and options.align != "activations":
        raise SpliceError("--residual stream compares the residual stream's activations: use --align activations")
    if options.qk not in QK_POLICIES:
        raise SpliceError(f"unknown Q/K policy {options.qk!r}: use one of {', '.join(QK_POLICIES)}")
    if options.heads not in HEAD_POLICIES:
        raise SpliceError(f"unknown head policy {options.heads!r}: use one of {', '.join(HEAD_POLICIES)}")
    if options.heads == "whole" and options.qk == "joint":
        raise SpliceError("--qk joint maps query and key neurons onto each other, which splits heads: use --qk "
                          "shared or separate with --heads whole")
    if tokens < 1:
        raise SpliceError(f"tokens must be at least 1, got {tokens}")


def _model_widths(model: ModelPlan) -> dict[str, int]:
    widths = {"hidden": model.widths[STREAM], "heads": model.heads}
    mlp = model.widths.get("layer 0/mlp")
    if mlp is not None:
        widths["intermediate"] = mlp
    return widths


def fuse(models: Sequence[str | os.PathLike], out: str | os.PathLike, *, data: DataSource | None = None,
         align: str = "activations", solver: str = "emd", reg: float = 0.08, anchor: int = 0, samples: int = 200,
         residual: str = "average", qk: str = "separate", heads: str = "mixed", tokens: int = DEFAULT_TOKENS,
         device: str = "auto",
         shard_size: int = DEFAULT_SHARD_SIZE, force: bool = False, progress: Progress | None = None,
         storage_options: dict | None = None) -> FusionReport:
    """Fuse transformers with optimal transport (Imfeld et al., ICLR 2024) into the anchor's shape.

    models: two or more model directories (or fsspec URLs) of one supported architecture and depth
      (ViTModel, ViTForImageClassification, BertModel, BertForSequenceClassification, GPT2Model,
      GPT2LMHeadModel); their widths (hidden size, MLP size, heads) may differ: the output has the anchor's.
    data: inputs for activation alignment: a dict of input tensors (or one tensor), a function returning
      one (given the anchor's location if it takes an argument), or 'MODULE:FUNCTION' / 'file.py:FUNCTION'.
      The first `samples` inputs are used, and about `tokens` token positions of them per neuron.
    align: "activations" (neurons compared by their standardised activations) or "weights" (by their
      unit-normalised, input-aligned incoming weights; no data needed).
    solver: "emd" (exact, hard maps) or "sinkhorn" (entropic with `reg`, log-domain below 0.05).
    residual: how maps combine where streams add: "average" (default), "skip", "branch", "identity", or
      weighted by each stream's mean |activation| in the anchor at that add: "weighted_scalar" (one weight per
      stream) or "weighted_matrix" (one per stream and neuron). The weighted policies need `data`; with
      align="weights" only the anchor is run on it, to measure its streams. Beyond the paper, "stream": one
      map for the whole residual stream, from its activations wherever it enters a block, that every
      embedding, attention output and MLP output written into the stream is aligned with (activations only).
    qk: "separate" maps for queries and keys, one "shared" map from both, or "joint": [W_Q; W_K] fused as one
      layer (one map over the query and key neurons together).
    heads: "mixed" (the paper's cross-head alignment: any neuron may move to any head) or "whole" (beyond
      the paper: heads are matched as units, from the summed costs of their Q/K and V within-head maps, so a
      head keeps its queries, keys and values together). With residual="stream", heads="whole", qk="shared"
      and solver="emd" between equal widths every map is a permutation consistent with the data flow: the
      aligned model computes exactly what it computed before alignment.
    The fused model is written with the anchor's config and side files, and `fusion_report.json` beside it;
    the report's `timings` splits the wall time into reading, activations, OT (points, costs, solves),
    transport (aligning and averaging weights) and writing.
    """
    started = time.perf_counter()
    options = FusionOptions(align, solver, float(reg), residual, qk, heads)
    _check_options(options, len(models), anchor, tokens, data is not None)
    ensure_output_free(out, force)
    plans = plan(models, storage_options)
    base = plans[anchor]
    if residual == "identity" and any(p.widths[STREAM] != base.widths[STREAM] for p in plans):
        raise SpliceError("--residual identity needs models of the same hidden size")
    weighted = residual in transport.WEIGHTED_POLICIES
    sources = _stream_sources(base) if weighted else {}
    inputs = None
    if align == "activations" or weighted:
        if data is None:
            raise SpliceError("activation alignment needs --data MODULE:FUNCTION returning a batch of inputs, "
                              "or use --align weights")
        inputs = load_inputs(data, samples, base.location)
    torch_device = resolve_device(device)
    clock = _Clock(torch_device)
    progress = progress or NoProgress()
    progress.start("fusion", len(plans), sum(p.checkpoint.total_bytes for p in plans), unit="models")

    modules = _hooked_modules(base, align, residual)  # compared between the models
    streams = {source.name for found in sources.values() for source in found if source.kind == "output"}
    entering = {source.name for found in sources.values() for source in found if source.kind == "input"}
    stream_taps = set(_stream_taps(base)) if residual == "stream" else set()
    with torch.no_grad():
        with clock.timed("read"):
            state_a = read_floats(base.checkpoint, torch_device)
        with clock.timed("activations"):
            feats_a = _activations(base, state_a, inputs, tokens, torch_device, modules | streams,
                                   entering | stream_taps)
            magnitudes = _stream_magnitudes(sources, feats_a or {}, state_a) if weighted else None
        progress.advance(1, base.checkpoint.total_bytes)
        with clock.timed("transport"):
            total = {name: tensor.clone() for name, tensor in state_a.items() if name not in base.copied}
        stats: list[MapStat] = []
        for index, model in enumerate(plans):
            if index == anchor:
                continue
            with clock.timed("read"):
                state_m = read_floats(model.checkpoint, torch_device)
            with clock.timed("activations"):
                feats_m = _activations(model, state_m, inputs if align == "activations" else None, tokens,
                                       torch_device, modules, stream_taps)
            solving = clock.seconds["ot"]
            with clock.timed("transport"):  # the aligner charges its solves to "ot": taken out below
                aligned, model_stats = _PairAligner(index, model, base, state_m, state_a, feats_m, feats_a,
                                                    options, magnitudes, clock).run()
                for name in total:
                    total[name] += aligned[name]
            clock.seconds["transport"] -= clock.seconds["ot"] - solving
            stats.extend(model_stats)
            del state_m, feats_m, aligned
            progress.advance(1, model.checkpoint.total_bytes)
        with clock.timed("transport"):
            fused = {}
            for name, info in base.checkpoint.tensors.items():
                if name in total:
                    fused[name] = (total[name] / len(plans)).to(dtype=info.dtype, device="cpu")
                else:
                    fused[name] = state_a[name].to(dtype=info.dtype, device="cpu")
    progress.finish()

    notes = []
    if torch_device.type != "cpu" and solver == "emd" and stats:
        notes.append(EMD_ON_CPU.format(device=torch_device))
    report = FusionReport(
        out=Path(out), architecture=base.class_name, models=[p.location for p in plans], anchor=anchor,
        align=align, solver=solver, reg=options.reg if solver == "sinkhorn" else None, residual=residual, qk=qk,
        heads=heads,
        samples=inputs.count if inputs else 0,
        tokens=max(len(acts) for acts in feats_a.values()) if feats_a else 0,
        widths=[_model_widths(p) for p in plans], device=str(torch_device), maps=stats, notes=notes)
    with staged_output(out, force) as staging:
        with clock.timed("write"):
            write_state_dict(staging, fused, shard_size, {"splice_merge_method": "ot fusion"})
            copy_side_files(base.checkpoint, staging)
        report.seconds = time.perf_counter() - started
        report.timings = {**{phase: round(clock.seconds[phase], 4) for phase in TIMED},
                          "total": round(report.seconds, 4)}
        report.save(staging)
    return report
