"""The residual stream as the residual policies see it: which modules' activations are compared, where each
stream is read at an add (for the activation-weighted policies), and what writes into the stream."""

from __future__ import annotations

import torch

from splice.errors import SpliceError
from splice.merge.fusion import transport
from splice.merge.fusion.activations import input_key
from splice.merge.fusion.architectures import STREAM, Source
from splice.merge.fusion.plan import ModelPlan


def stream_sources(model: ModelPlan) -> dict[str, list[Source]]:
    """{residual step id: one source per input stream}, from the description's taps and defining nodes."""
    definers: dict[str, Source | None] = {}
    sources: dict[str, list[Source]] = {}
    for step in model.steps:
        node = step.node
        if node.defines is None:  # makes no map (nor has an origin or adds)
            continue
        if not node.adds:
            if node.origin is not None:
                definers[step.space(node.defines)] = node.origin
            continue
        found = []
        for position, name in enumerate(node.adds):
            tap = node.taps[position] if position < len(node.taps) else None
            source = Source("input", tap) if tap is not None else definers.get(step.space(name))
            if source is None:
                raise SpliceError(
                    f"{model.location}: the {model.arch.name} description gives no activations "
                    f"for stream {name!r} at {step.id}; use another `residual` policy"
                )
            found.append(source)
        sources[step.id] = found
        definers[step.space(node.defines)] = None
    return sources


def stream_taps(model: ModelPlan) -> list[str]:
    """Modules whose input is the residual stream (the skip input of every add that has one), in order."""
    return list(dict.fromkeys(step.node.taps[0] for step in model.steps if step.node.taps and step.node.taps[0]))


def stream_writers(model: ModelPlan) -> set[str]:
    """The spaces added into the residual stream (embeddings, attention outputs, MLP outputs)."""
    return {step.space(name) for step in model.steps for name in step.node.adds if name != STREAM}


def hooked_modules(model: ModelPlan, align: str, residual: str) -> set[str]:
    """Modules whose outputs the activation alignment compares (none for weight alignment). With `--residual
    stream` the modules writing into the stream take the stream's map and are not compared."""
    if align != "activations":
        return set()
    writers = stream_writers(model) if residual == "stream" else set()
    return {
        step.node.origin.name
        for step in model.steps
        if step.node.origin is not None
        and step.node.origin.kind == "output"
        and step.space(step.node.defines) not in writers
    }


def stream_magnitudes(
    sources: dict[str, list[Source]], feats: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
) -> dict[str, list[torch.Tensor]]:
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
