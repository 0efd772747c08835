"""Planning: each model's description unrolled and checked against its stored tensors (which spaces exist, how
wide each is, which tensors every step touches), and the models checked against each other. Every check that
can fail happens here, before any tensor is read."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from splice.errors import IncompatibleModelsError, SpliceError
from splice.merge.fusion.architectures import (
    ARCHITECTURES,
    Architecture,
    Linear,
    NodeWalker,
    Norm,
    Residual,
    Step,
    Table,
    is_copied,
    steps,
    supported,
)
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.stream import open_all

Shapes = dict[str, tuple[int, ...]]


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

    @property
    def shapes(self) -> Shapes:
        return shapes_of(self.checkpoint)

    def step_bytes(self, step: Step) -> int:
        """Bytes of the stored tensors a step aligns (its share of a fused weight's)."""
        node = step.node
        share = node.part[1] if node.part else 1
        return (
            sum(self.checkpoint.tensors[name].nbytes for name in node.tensors if name in self.checkpoint.tensors)
            // share
        )


def shapes_of(checkpoint: Checkpoint) -> Shapes:
    return {name: info.shape for name, info in checkpoint.tensors.items()}


def linear_shape(node: Linear, shapes: Shapes, where: str) -> tuple[int, ...]:
    """The weight's shape as [out, in, *kernel] through the node's layout (checked against its bias)."""
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


class _Widths(NodeWalker):
    """The width of every space, checked wherever a tensor meets a space that is already defined."""

    def __init__(self, shapes: Shapes, where: str):
        self.shapes, self.where = shapes, where
        self.widths: dict[str, int] = {}

    def need(self, space: str, size: int, tensor: str) -> None:
        if space not in self.widths:
            raise SpliceError(f"{self.where}: the fusion description uses space {space} before defining it")
        if self.widths[space] != size:
            raise SpliceError(
                f"{self.where}: {tensor} has {size} features where {self.widths[space]} are "
                "expected; the checkpoint does not match its config"
            )

    def linear(self, step: Step, node: Linear) -> None:
        shape = linear_shape(node, self.shapes, self.where)
        if node.inp is not None:
            self.need(step.space(node.inp), shape[1], node.weight)
        if node.out is not None:
            self.widths[step.space(node.out)] = shape[0]

    def table(self, step: Step, node: Table) -> None:
        width = self.shapes[node.tensor][-1]
        if node.source is None:
            self.need(step.space(node.space), width, node.tensor)
        else:
            self.widths[step.space(node.space)] = width

    def norm(self, step: Step, node: Norm) -> None:
        for name in (node.weight, node.bias):
            if name in self.shapes:
                self.need(step.space(node.space), self.shapes[name][0], name)

    def residual(self, step: Step, node: Residual) -> None:
        sizes = {self.widths[step.space(name)] for name in node.inputs}
        if len(sizes) != 1:
            raise SpliceError(f"{self.where}: {step.scope}: residual inputs {node.inputs} have widths {sizes}")
        self.widths[step.space(node.out)] = sizes.pop()


def _class_name(arch: Architecture, config: dict[str, Any], present: set[str], location: str) -> str:
    """The transformers class: as config.json records it, or else told by the backbone prefix of the names."""
    declared = config.get("architectures") or []
    if declared:
        if declared[0] not in arch.classes:
            raise SpliceError(f"{location}: fuse does not support {declared[0]}; supported: {supported()}")
        return declared[0]
    first = next(node for node in arch.embeddings if node.required)
    candidates = [
        cls for cls, base in arch.classes.items() if {name.format(base=base) for name in first.required} <= present
    ]
    if not candidates:
        raise SpliceError(f"{location}: not a {arch.name} checkpoint fuse can read; supported: {supported()}")
    return candidates[0]


def _copied(
    checkpoint: Checkpoint, arch: Architecture, plan_steps: list[Step], class_name: str, layers: int
) -> list[str]:
    """The stored tensors no step owns, which are copied from the anchor; any other is an error."""
    present = set(checkpoint.tensors)
    covered: set[str] = set()
    for step in plan_steps:
        missing = sorted(step.node.required - present)
        if missing:
            raise SpliceError(
                f"{checkpoint.location}: tensor {missing[0]} is missing; this is not a standard "
                f"{class_name} checkpoint with {layers} layers"
            )
        covered |= step.node.tensors & present
    copied = []
    for name in sorted(present - covered):
        if not (is_copied(arch, name) or not checkpoint.tensors[name].dtype.is_floating_point):
            raise SpliceError(
                f"{checkpoint.location}: fuse does not know where tensor {name} sits in a "
                f"{class_name}; only the standard layout is supported"
            )
        copied.append(name)
    return copied


def _plan_model(checkpoint: Checkpoint) -> ModelPlan:
    location = checkpoint.location
    config = checkpoint.config()
    if config is None:
        raise SpliceError(f"{location}: no config.json; fusion needs the model's config")
    arch = ARCHITECTURES.get(config.get("model_type", ""))
    if arch is None:
        raise SpliceError(
            f"{location}: fuse does not support model_type {config.get('model_type')!r}; supported: {supported()}"
        )
    present = set(checkpoint.tensors)
    class_name = _class_name(arch, config, present, location)
    layers = config.get(arch.layers_key)
    heads = config.get(arch.heads_key)
    if not isinstance(layers, int) or not isinstance(heads, int) or layers < 1 or heads < 1:
        raise SpliceError(f"{location}: config.json lacks {arch.layers_key} or {arch.heads_key}")
    plan_steps = steps(arch, arch.classes[class_name], layers, present)
    copied = _copied(checkpoint, arch, plan_steps, class_name, layers)
    walker = _Widths(shapes_of(checkpoint), location)
    for step in plan_steps:
        step.node.visit(walker, step)
    widths = walker.widths
    for step in plan_steps:
        node, space = step.node, step.space(step.node.head_space)
        if space is not None and isinstance(node, Linear) and widths[space] % heads:  # only Linears have heads
            raise SpliceError(f"{location}: {node.weight}: {widths[space]} outputs do not split into {heads} heads")
    return ModelPlan(location, checkpoint, config, arch, class_name, plan_steps, widths, heads, copied)


class _FixedDims(NodeWalker):
    """Axes that no transport map re-orders must agree: class count, vocabulary, positions, kernels."""

    def __init__(self, shape_a: Shapes, shape_b: Shapes, pair: str):
        self.shape_a, self.shape_b, self.pair = shape_a, shape_b, pair

    def linear(self, step: Step, node: Linear) -> None:
        pair = self.pair
        a, b = linear_shape(node, self.shape_a, pair), linear_shape(node, self.shape_b, pair)
        if node.out is None and a[0] != b[0]:
            raise IncompatibleModelsError(
                f"{pair} disagree on {node.weight}: {a[0]} vs {b[0]} outputs (a different number of labels?)"
            )
        if node.inp is None and a[1:] != b[1:]:
            raise IncompatibleModelsError(f"{pair} disagree on the input of {node.weight}: {a[1:]} vs {b[1:]}")
        self._same_bias(node)

    def table(self, step: Step, node: Table) -> None:
        a, b = self.shape_a[node.tensor], self.shape_b[node.tensor]
        if a[:-1] != b[:-1]:
            raise IncompatibleModelsError(f"{self.pair} disagree on {node.tensor}: {a} vs {b}")

    def norm(self, step: Step, node: Norm) -> None:
        self._same_bias(node)

    def _same_bias(self, node: Linear | Norm) -> None:
        if (node.bias in self.shape_a) != (node.bias in self.shape_b):
            raise IncompatibleModelsError(f"{self.pair}: only one of them has {node.bias}")


def _check_config(first: ModelPlan, other: ModelPlan, pair: str) -> None:
    if other.class_name != first.class_name:
        raise IncompatibleModelsError(
            f"{pair} are different architectures ({first.class_name} vs "
            f"{other.class_name}); fusion needs one architecture"
        )
    arch = first.arch
    depth_a, depth_b = first.config[arch.layers_key], other.config[arch.layers_key]
    if depth_a != depth_b:
        raise IncompatibleModelsError(
            f"{pair} have different depths ({depth_a} vs {depth_b} layers); fusion "
            "pairs layers one to one, so the depths must agree"
        )
    for key in arch.must_match:
        value_a, value_b = first.config.get(key), other.config.get(key)
        if value_a != value_b:
            if key == "vocab_size":
                raise IncompatibleModelsError(
                    f"{pair} have different vocabularies ({value_a} vs {value_b} "
                    "tokens); fusion needs the same tokenizer"
                )
            raise IncompatibleModelsError(
                f"{pair} disagree on config {key} ({value_a!r} vs {value_b!r}); "
                "only widths may differ between fused models"
            )


def _check_compatible(plans: list[ModelPlan]) -> None:
    first = plans[0]
    for other in plans[1:]:
        pair = f"{first.location} and {other.location}"
        _check_config(first, other, pair)
        if [s.id for s in other.steps] != [s.id for s in first.steps]:
            extra = sorted({s.id for s in first.steps} ^ {s.id for s in other.steps})
            raise IncompatibleModelsError(f"{pair} have different parts ({extra[0]} is in only one of them)")
        walker = _FixedDims(first.shapes, other.shapes, pair)
        for step in first.steps:
            step.node.visit(walker, step)


def plan(models: Sequence[str | os.PathLike], storage_options: dict | None = None) -> list[ModelPlan]:
    """Open and check the models: supported architecture, same depth, vocabulary and config but for widths."""
    plans = [_plan_model(checkpoint) for checkpoint in open_all([str(m) for m in models], storage_options)]
    _check_compatible(plans)
    return plans
