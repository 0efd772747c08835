"""Slices (mergekit's `slices:`): an output model whose layers are stacked slice by slice from layer ranges of its
inputs: frankenmerges, passthrough stacks, depth up-scaling.

Output layer k is the merge of one layer of every source of its slice (source j gives layer `start_j + offset`),
its tensors renamed to index k. Layers are found by tensor name (splice.arch.layers), not by an architecture table,
so every tensor a layer stores travels with it. Tensors outside the layers follow mergekit's planner: those used
before the layers (embeddings) are merged from the first slice's sources with its parameters, the others (final
norm, head, pooler, classifier) from the last slice's, both at t = 0; a layer's t is its offset in its slice over
the slice's length - 1 (1 for a slice of one layer).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from splice.arch.layers import before_layers, layer_container, layer_index, renumbered
from splice.errors import IncompatibleModelsError, RecipeError
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.device import dtype_name
from splice.tensors.stream import StreamItem
from splice.tensors.writer import OutputTensor

# config.json keys that hold a model's number of layers (Llama/BERT/most, GPT-2, T5-style, others)
DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass(frozen=True)
class LayerRange:
    """Layers `start` .. `end - 1` of a model: mergekit's `layer_range: [start, end]`, whose end is exclusive."""

    model: str
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        return f"{self.model} [{self.start}, {self.end}] ({self.length} layer{'' if self.length == 1 else 's'})"


@dataclass(frozen=True)
class SlicedTensor:
    """One output tensor: what it is computed from, which slice's sources and parameters merge it, at which t."""

    item: StreamItem
    slice: int
    t: float
    input_names: tuple[str, ...]  # the stored name in each source of the slice, in order (for parameter filters)


@dataclass(frozen=True)
class SlicePlan:
    tensors: list[SlicedTensor]
    depth: int
    config_updates: dict[str, Any]  # the output config's new depth and re-stacked per-layer lists


@dataclass(frozen=True)
class LayerStack:
    """A model's stored tensors by layer, and those outside the layers, each in storage order (the whole model's, or
    one module's: splice.merge.modules); how a layer tensor's name moves to another layer; and the dotted config key
    holding the stack's depth (None: one of DEPTH_KEYS, at the top level)."""

    layers: dict[int, list[str]]
    before: list[str]
    after: list[str]
    renumber: Callable[[str, int], str] = renumbered
    depth_key: str | None = None

    @property
    def depth(self) -> int:
        return max(self.layers) + 1 if self.layers else 0


def layer_stack(checkpoint: Checkpoint) -> LayerStack:
    """`checkpoint`'s tensors split into its layers and the tensors before and after them; a model with several
    stacks of layers (an encoder and a decoder, a vision tower beside a language model) is refused."""
    containers = sorted({c for c in map(layer_container, checkpoint.tensors) if c is not None})
    if len(containers) > 1:
        stacks = ", ".join(c.rstrip(".") for c in containers)
        raise RecipeError(
            f"{checkpoint.location} has {len(containers)} stacks of layers ({stacks}); slices stack the layers "
            "of a model with one: merge it with models:"
        )
    if not containers:
        raise RecipeError(f"{checkpoint.location} has no layers (no tensor named like model.layers.N.*) to slice")
    layers: dict[int, list[str]] = {}
    before: list[str] = []
    after: list[str] = []
    for name in checkpoint.tensors:
        index = layer_index(name)
        if index is not None:
            layers.setdefault(index, []).append(name)
        else:
            (before if before_layers(name) else after).append(name)
    return LayerStack(layers, before, after)


def plan_slices(
    slices: Sequence[Sequence[LayerRange]],
    checkpoints: Mapping[str, Checkpoint],
    config_source: Checkpoint | None,
    out_dtype: torch.dtype | None,
    stacks: Mapping[str, LayerStack] | None = None,
    where: str = "slices",
) -> SlicePlan:
    """The output tensors of a sliced model, in output order (embeddings, layer by layer, then the rest), every
    range and tensor checked before anything is read; and the output config's updates, from `config_source`'s
    (none without one). `stacks`: each model's layers (default: the whole model's, found by tensor name); `where`:
    how errors name the slices."""
    stacks = stacks or {location: layer_stack(checkpoint) for location, checkpoint in checkpoints.items()}
    for i, ranges in enumerate(slices):
        for j, taken in enumerate(ranges):
            depth = stacks[taken.model].depth
            if not 0 <= taken.start <= taken.end <= depth:  # a recipe's empty ranges are refused before
                raise RecipeError(
                    f"{where}[{i}].sources[{j}]: layer_range [{taken.start}, {taken.end}] is outside {taken.model}, "
                    f"which has {depth} layers (0 to {depth - 1}); the end of a layer_range is exclusive, as in "
                    f"mergekit: [0, {depth}] takes them all"
                )

    def sources(ranges: Sequence[LayerRange]) -> list[Checkpoint]:
        return [checkpoints[taken.model] for taken in ranges]

    first, last = slices[0], slices[-1]
    renumber = stacks[first[0].model].renumber
    planned = _group(
        [(c, stacks[r.model].before) for c, r in zip(sources(first), first)], None, 0, 0.0, out_dtype, f"{where}[0]"
    )
    order: list[tuple[Checkpoint, int]] = []  # each output layer's first source and layer there
    for i, ranges in enumerate(slices):
        for offset in range(ranges[0].length):
            layers = [(c, stacks[r.model].layers.get(r.start + offset, [])) for c, r in zip(sources(ranges), ranges)]
            t = offset / (ranges[0].length - 1) if ranges[0].length > 1 else 1.0
            planned += _group(layers, len(order), i, t, out_dtype, f"{where}[{i}] layer {offset}", renumber)
            order.append((layers[0][0], ranges[0].start + offset))
    planned += _group(
        [(c, stacks[r.model].after) for c, r in zip(sources(last), last)],
        None,
        len(slices) - 1,
        0.0,
        out_dtype,
        f"{where}[{len(slices) - 1}]",
    )
    if config_source is None:
        return SlicePlan(planned, len(order), {})
    depths = {checkpoints[location]: stack.depth for location, stack in stacks.items()}
    depth_key = stacks[first[0].model].depth_key
    return SlicePlan(planned, len(order), _config_updates(config_source, order, depths, depth_key))


def _group(
    sources: Sequence[tuple[Checkpoint, list[str]]],
    layer: int | None,
    slice_index: int,
    t: float,
    out_dtype: torch.dtype | None,
    where: str,
    renumber: Callable[[str, int], str] = renumbered,
) -> list[SlicedTensor]:
    """The output tensors merged from one group of stored tensors, one list per source (a layer of each, renamed to
    output layer `layer`; or the tensors outside the layers, None): the first source's tensors, each matched by its
    output name in every other source, which must hold every float tensor with the same shape and dtype."""

    def output_name(name: str) -> str:
        return name if layer is None else renumber(name, layer)

    named = [{output_name(name): name for name in names} for _, names in sources]
    (reference, reference_names), problems = sources[0], []
    if layer is not None and not reference_names:
        problems.append(f"{reference.location} stores no tensor of that layer")
    for (checkpoint, _), theirs in zip(sources[1:], named[1:]):
        for out, name in named[0].items():
            info, other = reference.tensors[name], theirs.get(out)
            if other is None:
                if info.dtype.is_floating_point:
                    problems.append(f"{name} of {reference.location} has no counterpart in {checkpoint.location}")
                continue
            their_info = checkpoint.tensors[other]
            if their_info.shape != info.shape or their_info.dtype != info.dtype:
                problems.append(
                    f"{name} is {list(info.shape)} {dtype_name(info.dtype)} in {reference.location} but {other} is "
                    f"{list(their_info.shape)} {dtype_name(their_info.dtype)} in {checkpoint.location}"
                )
        problems += [
            f"{name} of {checkpoint.location} has no counterpart in {reference.location}"
            for out, name in theirs.items()
            if out not in named[0] and checkpoint.tensors[name].dtype.is_floating_point
        ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise IncompatibleModelsError(f"{where}: the sources do not match: {'; '.join(problems[:3])}{more}")
    planned = []
    for out, name in named[0].items():
        info = reference.tensors[name]
        floating = info.dtype.is_floating_point
        held = [(checkpoint, theirs[out]) for (checkpoint, _), theirs in zip(sources, named) if out in theirs]
        dtype = out_dtype if (out_dtype is not None and floating) else info.dtype
        input_names = tuple(theirs.get(out, out) for theirs in named)
        planned.append(
            SlicedTensor(StreamItem(OutputTensor(out, dtype, info.shape), tuple(held)), slice_index, t, input_names)
        )
    return planned


def _config_updates(
    config_source: Checkpoint,
    order: Sequence[tuple[Checkpoint, int]],
    depths: Mapping[Checkpoint, int],
    depth_key: str | None = None,
) -> dict[str, Any]:
    """The output config's new depth (`depth_key`, a dotted key such as `text_config.num_hidden_layers`; without one,
    every known depth key of `config_source`'s config that holds its depth) and its per-layer lists (a key naming
    layers whose list has one entry per layer, such as `layer_types`, beside the depth), re-stacked: output layer k's
    entry is that of the layer it was taken from, in the config of the model it came from. Keys are dotted paths."""
    config = config_source.config()
    if config is None:
        return {}
    path = depth_key.split(".")[:-1] if depth_key else []
    section = _config_section(config, path)
    old_depth = depths[config_source]
    candidates = [depth_key.split(".")[-1]] if depth_key else DEPTH_KEYS
    keys = [key for key in candidates if type(section.get(key)) is int and section[key] == old_depth]
    if not keys:
        raise RecipeError(
            f"{config_source.location}: config.json holds no layer count equal to its {old_depth} layers (looked "
            f"for {', '.join('.'.join([*path, key]) for key in candidates)}); the output's config could not say its "
            "new depth"
        )
    prefix = "".join(f"{part}." for part in path)
    updates: dict[str, Any] = {prefix + key: len(order) for key in keys}
    sections = {config_source: section}
    for key, value in section.items():
        if key in keys or "layer" not in key.lower() or not isinstance(value, list) or len(value) != old_depth:
            continue
        restacked = []
        for checkpoint, index in order:
            if checkpoint not in sections:
                sections[checkpoint] = _config_section(checkpoint.config() or {}, path)
            theirs = sections[checkpoint].get(key)
            if not isinstance(theirs, list) or len(theirs) != depths[checkpoint]:
                raise RecipeError(
                    f"{checkpoint.location}: config.json has no {prefix}{key} with one entry per layer, which "
                    f"{config_source.location} has; the output's {prefix}{key} cannot be re-stacked"
                )
            restacked.append(theirs[index])
        updates[prefix + key] = restacked
    return updates


def _config_section(config: Mapping[str, Any], path: Sequence[str]) -> Mapping[str, Any]:
    """The nested section of a config at `path` (`["text_config"]`); empty where there is none."""
    for part in path:
        nested = config.get(part)
        config = nested if isinstance(nested, dict) else {}
    return config
