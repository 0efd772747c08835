"""Which layer a stored tensor belongs to, from its name (recipe gradients across layers, per-layer reports)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

# the layer container in the names of HF architectures: BERT/ViT `layer`, Llama `layers`, GPT-2 `h`, ...
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The index of the layer a stored tensor belongs to (`model.layers.3.mlp...` -> 3); None outside layers."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def layer_positions(names: Sequence[str]) -> Callable[[str], float]:
    """Tensor name -> t in [0, 1]: its layer's relative depth among `names` (t = 0 outside layers, as in
    mergekit)."""
    indices = [index for index in map(layer_index, names) if index is not None]
    count = max(indices) + 1 if indices else 0

    def position(name: str) -> float:
        index = layer_index(name)
        if index is None:
            return 0.0
        return index / (count - 1) if count > 1 else 1.0

    return position
