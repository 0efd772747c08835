"""The classification head of a ...ForSequenceClassification / ...ForImageClassification model: the tensors its
transformers class adds to the base model, i.e. every stored tensor outside the base model's prefix (the class's
`base_model_prefix`: `bert`, `vit`, `model`, `transformer`, ...). BERT's and ViT's head is `classifier`, Llama's
and GPT-2's `score`, DistilBERT's `pre_classifier` and `classifier`, RoBERTa's `classifier.dense` and
`classifier.out_proj`."""

from __future__ import annotations

from collections.abc import Iterable

from splice.tensors.checkpoint import Checkpoint

CLASSIFIERS = (
    "ForSequenceClassification",
    "ForImageClassification",
    "ForTokenClassification",
    "ForAudioClassification",
)


def base_model_prefix(architecture: object) -> str | None:
    """The prefix of the base model's tensors in a classifier transformers defines; None for another class."""
    if not isinstance(architecture, str) or not architecture.endswith(CLASSIFIERS):
        return None
    import transformers

    return getattr(getattr(transformers, architecture, None), "base_model_prefix", None) or None


def head_tensor_names(names: Iterable[str], architecture: object) -> list[str]:
    """The classification head's tensors among a model's stored `names`, in their order; [] when `architecture`
    (config.json's `architectures[0]`) is not a classifier transformers knows, or when nothing is stored under
    its base model's prefix (then the head cannot be told from the rest)."""
    prefix = base_model_prefix(architecture)
    names = list(names)
    if prefix is None or not any(name.startswith(prefix + ".") for name in names):
        return []
    return [name for name in names if not name.startswith(prefix + ".")]


def stored_head(checkpoint: Checkpoint) -> list[str]:
    """The classification head's tensors of a stored model, by the class its config.json names."""
    config = checkpoint.config()
    architectures = config.get("architectures") if isinstance(config, dict) else None
    architecture = architectures[0] if isinstance(architectures, list) and architectures else None
    return head_tensor_names(checkpoint.tensors, architecture)
