"""A model's vocabulary tensors: the token embedding and the LM head (and its bias), one row per token.

Found by shape and place, not by a per-architecture table: a float tensor outside the numbered layers whose first
dimension is the config's `vocab_size` (Llama `model.embed_tokens.weight` / `lm_head.weight`, GPT-2
`transformer.wte.weight`, BERT `bert.embeddings.word_embeddings.weight` and `cls.predictions.bias`). A tied model
stores one of them; its head follows it.
"""

from __future__ import annotations

from splice.arch.layers import layer_index
from splice.tensors.checkpoint import Checkpoint


def vocabulary_size(config: dict | None) -> int | None:
    """The number of embedding rows a config declares (its top-level `vocab_size`), None if it declares none."""
    value = (config or {}).get("vocab_size")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def vocabulary_tensors(checkpoint: Checkpoint, rows: int) -> list[str]:
    """The stored tensors indexed by token (`rows` of them along dim 0), in storage order."""
    return [
        name
        for name, info in checkpoint.tensors.items()
        if info.dtype.is_floating_point
        and info.shape
        and info.shape[0] == rows
        and layer_index(name) is None
        and "position" not in name  # a position table as long as the vocabulary is not one
    ]
