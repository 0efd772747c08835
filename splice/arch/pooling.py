"""How one feature vector per input is pooled from a model's last hidden states, per architecture.

Encoders trained with a classification token (ViT, BERT and their kin) give the first token's state; decoders
(GPT-2, Llama and their kin) have no such token and give the mean over the tokens the attention mask keeps.
"""

from __future__ import annotations

import torch

from splice.errors import SpliceError

CLS = "cls"
MEAN = "mean"

# config.model_type -> pooling rule
POOLING: dict[str, str] = {
    "vit": CLS,
    "deit": CLS,
    "beit": CLS,
    "dinov2": CLS,
    "bert": CLS,
    "roberta": CLS,
    "distilbert": CLS,
    "electra": CLS,
    "xlm-roberta": CLS,
    "gpt2": MEAN,
    "gpt_neox": MEAN,
    "gptj": MEAN,
    "opt": MEAN,
    "llama": MEAN,
    "mistral": MEAN,
    "qwen2": MEAN,
    "phi": MEAN,
    "phi3": MEAN,
}


def pooling_rule(model_type: str) -> str:
    """The pooling rule of an architecture, refused with the known ones for an architecture splice does not know."""
    rule = POOLING.get(model_type)
    if rule is None:
        raise SpliceError(
            f"no feature pooling is known for model type {model_type!r}; known: {', '.join(sorted(POOLING))}"
        )
    return rule


def pool(model_type: str, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L, D] last hidden states -> [B, D] features by the architecture's rule."""
    if pooling_rule(model_type) == CLS:
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
