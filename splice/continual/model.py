"""The pipeline's model: loaded from its directory as the class its config names, and its classification head."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from splice.arch.heads import head_tensor_names
from splice.arch.names import stored_to_module_names
from splice.arch.quiet import quiet_transformers
from splice.errors import SpliceError, first_line

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def load_model(base: str | os.PathLike, device: torch.device | str = "cpu") -> PreTrainedModel:
    """The model class its config.json names (e.g. ViTForImageClassification), on `device`, in eval mode."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(base, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise SpliceError(f"base {base}: not a model directory with a config.json ({first_line(exc)})") from None
    names = config.architectures or []
    model_class = getattr(transformers, names[0], None) if names else None
    if model_class is None:
        raise SpliceError(f"{base}: config.json names no transformers model class (architectures: {names})")
    with quiet_transformers():
        model = model_class.from_pretrained(base)
    return model.to(device).eval()


def classification_head(model: torch.nn.Module) -> list[str]:
    """Stored names of the classification head's tensors (shared by every task, trained with each)."""
    found = head_tensor_names(stored_to_module_names(model), type(model).__name__)
    if found:
        return sorted(found)
    raise SpliceError(
        f"{type(model).__name__} has no classification head; a continual pipeline needs a "
        f"...ForImageClassification or ...ForSequenceClassification model"
    )


def head_parameters(model: torch.nn.Module, names: list[str]) -> list[torch.nn.Parameter]:
    parameters = dict(model.named_parameters())
    mapping = stored_to_module_names(model)
    return [parameters[mapping[name]] for name in names]


def head_state_of(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().cpu().clone() for name, parameter in zip(names, head_parameters(model, names))}


def load_head(model: torch.nn.Module, values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, parameter in zip(values, head_parameters(model, list(values))):
            parameter.copy_(values[name])
