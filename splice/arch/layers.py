"""Which layer a stored tensor belongs to, from its name (recipe gradients across layers, per-layer reports, slices)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

# the layer container in the names of HF architectures: BERT/ViT `layer`, Llama `layers`, GPT-2 `h`, ...
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")

# A tensor outside the layers that the model uses before them: an input embedding (Llama `embed_tokens`, BERT
# `embeddings.*` with its LayerNorm, GPT-2 `wte`/`wpe`, ChatGLM `rotary_pos_emb`); GPT-NeoX's `embed_out` is its
# head. Everything else outside the layers (final norm, head, pooler, classifier) comes after them. This agrees with
# the pre/post split of every single-stack architecture mergekit describes (its architecture JSONs).
_BEFORE_LAYERS = re.compile(r"(?:^|\.)(?:wte|wpe|(?!embed_out\.)[A-Za-z_]*emb[A-Za-z_]*)\.")


def layer_index(name: str) -> int | None:
    """The index of the layer a stored tensor belongs to (`model.layers.3.mlp...` -> 3); None outside layers."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def layer_container(name: str) -> str | None:
    """The prefix naming the stack of layers a tensor belongs to (`model.layers.3.mlp...` -> `model.layers.`);
    None outside layers. A model whose tensors name several (an encoder and a decoder, a vision tower beside a
    language model) has several stacks."""
    match = _LAYER_INDEX.search(name)
    return name[: match.start(1)] if match else None


def renumbered(name: str, index: int) -> str:
    """A layer tensor's name moved to layer `index` (`model.layers.3.mlp.up_proj.weight`, 7 ->
    `model.layers.7.mlp.up_proj.weight`)."""
    match = _LAYER_INDEX.search(name)
    if match is None:
        raise ValueError(f"{name} is not inside a layer")
    return f"{name[: match.start(1)]}{index}{name[match.end(1) :]}"


def before_layers(name: str) -> bool:
    """Whether a tensor outside the layers is used before them (an input embedding) rather than after them."""
    return bool(_BEFORE_LAYERS.search(name))


def layer_positions(names: Sequence[str]) -> Callable[[str], float]:
    """Tensor name -> t in [0, 1]: its layer's relative depth in its stack of layers among `names` (t = 0 outside
    layers, as in mergekit; a vision tower's layers are counted apart from a language model's, as mergekit counts
    each module's)."""
    counts: dict[str, int] = {}
    for name in names:
        index = layer_index(name)
        if index is not None:
            container = layer_container(name) or ""
            counts[container] = max(counts.get(container, 0), index + 1)

    def position(name: str) -> float:
        index = layer_index(name)
        if index is None:
            return 0.0
        count = counts.get(layer_container(name) or "", 0)
        return index / (count - 1) if count > 1 else 1.0

    return position


def layer_module(name: str) -> str | None:
    """The module inside its layer a layer tensor is a parameter of, named as every layer of its stack names it
    (`bert.encoder.layer.3.attention.self.query.weight` -> `attention.self.query`, `model.layers.0.mlp.up_proj.weight`
    -> `mlp.up_proj`); a parameter of the layer itself is named by itself. None outside layers."""
    match = _LAYER_INDEX.search(name)
    if match is None:
        return None
    inside = name[match.end() :]
    return inside.rpartition(".")[0] or inside


def outside_modules(names: Iterable[str]) -> Callable[[str], str]:
    """Tensor name outside the layers -> the top module it belongs to below the base model that holds the stacks of
    layers among `names` (`bert.embeddings.LayerNorm.weight` -> `embeddings`, `bert.pooler.dense.weight` -> `pooler`,
    `classifier.weight` -> `classifier`, Llama's `model.norm.weight` -> `norm`, GPT-2's `transformer.wte.weight` ->
    `wte`). The base model is the module path every stack's container shares (`bert.encoder.layer.` -> `bert.encoder`;
    none where an encoder and a decoder, or a vision tower and a language model, have a stack each)."""
    parents = {tuple(container.split(".")[:-2]) for name in names if (container := layer_container(name)) is not None}
    shared = list(next(iter(parents))) if parents else []
    for parent in parents:
        shared = shared[: _common_length(shared, parent)]

    def module(name: str) -> str:
        path = name.split(".")[:-1] or [name]
        below = path[_common_length(shared, path) :]
        return below[0] if below else path[-1]

    return module


def _common_length(a: Sequence[str], b: Sequence[str]) -> int:
    """How many leading parts `a` and `b` share."""
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count
