"""How a base model names its tensors for PEFT: transformers' live parameter names (what PEFT keys use,
under PREFIX) against the stored names (what splice patches use), and each module's type.

PEFT keys name the modules of the model as transformers loads it (`base_model.model.<module>.lora_A.weight`),
which in transformers 5 can differ from the names stored on disk (ViT). Given the base (a stored
`Checkpoint` or a live `torch.nn.Module`), splice builds the model's skeleton on the meta device (no memory,
no weights), maps module names to stored names with transformers' own save-time conversion, and reads each
module's type (Conv1D weights are stored [in, out]: PEFT's fan_in_fan_out). A key that names no module of
that skeleton is matched by a unique suffix (an adapter made on `BertModel` applied to a
`BertForSequenceClassification`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from splice.arch.names import stored_to_module_names
from splice.errors import PatchError, first_line
from splice.tensors.checkpoint import Checkpoint

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PICKLE = "adapter_model.bin"
PREFIX = "base_model.model."


@dataclass
class BaseNames:
    """Live (transformers) parameter names -> stored names, module types and parameters, and a reader."""

    live_to_stored: dict[str, str]
    stored_shapes: dict[str, tuple[int, ...]]
    module_kinds: dict[str, str] = field(default_factory=dict)  # live module -> linear|conv1d|embedding|<class>
    module_params: dict[str, list[str]] = field(default_factory=dict)  # live module -> its own tensor names
    read: Callable[[str], torch.Tensor] | None = None  # stored name -> value
    where: str = "the base"

    def resolve(self, live: str) -> tuple[str, str] | None:
        """(stored name, live name) of a live parameter name, exact or by a unique dotted suffix."""
        if live in self.live_to_stored:
            return self.live_to_stored[live], live
        found = [name for name in self.live_to_stored if name.endswith("." + live)]
        return (self.live_to_stored[found[0]], found[0]) if len(found) == 1 else None

    @property
    def stored_to_live(self) -> dict[str, str]:
        return {stored: live for live, stored in self.live_to_stored.items()}


def _module_kind(module: torch.nn.Module) -> str:
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if isinstance(module, torch.nn.Linear):
        return "linear"
    return type(module).__name__


def _describe_modules(model: torch.nn.Module) -> tuple[dict[str, str], dict[str, list[str]]]:
    kinds, params = {}, {}
    for name, module in model.named_modules():
        kinds[name] = _module_kind(module)
        params[name] = [key for key in module.state_dict() if "." not in key]
    return kinds, params


def skeleton(base: Checkpoint) -> torch.nn.Module:
    """The base's transformers model built from its config on the meta device (no weights, no memory)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = base.config()
    if not config or config.get("model_type") not in CONFIG_MAPPING:
        raise PatchError(f"{base.location}: no config.json with a model_type transformers knows")
    cfg = CONFIG_MAPPING[config["model_type"]].from_dict(config)
    architectures = config.get("architectures") or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    with torch.device("meta"):
        return cls(cfg) if cls is not None else transformers.AutoModel.from_config(cfg)


def base_names(base: Checkpoint | torch.nn.Module, strict: bool = False) -> BaseNames:
    """How `base` names its tensors; for a stored base without a usable config, stored names (unless strict)."""
    if isinstance(base, torch.nn.Module):
        state = base.state_dict()
        stored_to_live = stored_to_module_names(base)
        kinds, params = _describe_modules(base)
        return BaseNames(
            {live: stored for stored, live in stored_to_live.items()},
            {stored: tuple(state[live].shape) for stored, live in stored_to_live.items()},
            kinds,
            params,
            lambda stored: state[stored_to_live[stored]].detach(),
            "the model",
        )
    shapes = {name: info.shape for name, info in base.tensors.items()}
    try:
        model = skeleton(base)
        mapping = stored_to_module_names(model)
    except Exception as exc:  # any architecture transformers cannot build here
        if strict:
            raise PatchError(
                f"{base.location}: cannot build the model to learn its module names ({first_line(exc)})"
            ) from None
        return BaseNames({name: name for name in shapes}, shapes, read=base.read, where=str(base.location))
    kinds, params = _describe_modules(model)
    live_to_stored = {live: stored for stored, live in mapping.items() if stored in shapes}
    return BaseNames(live_to_stored, shapes, kinds, params, base.read, str(base.location))
