"""PEFT adapter directories read as splice patches, in the base's stored names and layout.

LoRA adapters (`peft_type` LORA: r / lora_alpha, rank_pattern / alpha_pattern, use_rslora, fan_in_fan_out,
LoRA on Linear, Conv1D and Embedding modules, plus `modules_to_save` and trained biases, which replace the
base's tensors: the trained copy, never peft's untrained `original_module` one; two trained copies of one
tensor that differ are refused) and LayerNorm-tuning adapters (LN_TUNING: whole copies of the tuned modules,
which replace them). What cannot be expressed as a change of the base's weights (DoRA, LoRA biases, aLoRA, trainable
tokens, LoRA on convolutions, other PEFT types) is refused in one line. Without a base, names are kept as
they are and only shapes are checked where the patch is applied. PEFT adapters carry no base fingerprint:
the patch has `meta.base = None`.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, StrictBool, ValidationError

from splice.adapters.kinds.lora import SUFFIX_A, SUFFIX_B
from splice.adapters.meta import PatchKind, PatchMeta
from splice.adapters.patch import Patch
from splice.adapters.peft.names import PEFT_CONFIG, PEFT_PICKLE, PEFT_WEIGHTS, PREFIX, BaseNames, base_names
from splice.errors import CheckpointError, PatchError, first_line
from splice.tensors.checkpoint import Checkpoint, recorded_location, split_location
from splice.values import Float32, PositiveInt, one_line, parse_json, printable

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

_LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
# config entries whose effect is not a change of the base's weights splice can make (truthy = refused)
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "lora_bias",
    "target_parameters": "target_parameters",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable tokens",
    "alora_invocation_tokens": "aLoRA",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "BD-LoRA",
    "megatron_config": "Megatron",
}
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


class LoraConfigValues(BaseModel):
    """The entries of a LoRA adapter_config.json that splice reads, strictly typed and finite (a scale a
    float32 computation can hold); the others are kept as they are."""

    model_config = ConfigDict(extra="allow")
    r: PositiveInt | None = None
    lora_alpha: Float32 = 8
    use_rslora: StrictBool = False
    fan_in_fan_out: StrictBool = False
    rank_pattern: dict[str, PositiveInt] | None = None
    alpha_pattern: dict[str, Float32] | None = None


def is_peft_adapter(location: str | os.PathLike, storage_options: dict | None = None) -> bool:
    try:
        fs, root = split_location(str(location), storage_options)
        return fs.exists(f"{root}/{PEFT_CONFIG}")
    except Exception:  # not a location fsspec can reach: let the splice patch reader say why
        return False


def _read_config(location: str, fs: AbstractFileSystem, root: str) -> dict[str, Any]:
    try:
        config = parse_json(fs.cat_file(f"{root}/{PEFT_CONFIG}"))
    except ValueError as exc:
        raise PatchError(f"{location}/{PEFT_CONFIG} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise PatchError(f"{location}/{PEFT_CONFIG} is not a JSON object")
    return config


def _read_pickled_tensors(location: str, fs: AbstractFileSystem, root: str) -> dict[str, torch.Tensor]:
    try:  # never unpickle anything but tensors
        state = torch.load(io.BytesIO(fs.cat_file(f"{root}/{PEFT_PICKLE}")), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PatchError(
            f"{location}/{PEFT_PICKLE}: refused or unreadable as plain tensors ({first_line(exc)})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise PatchError(f"{location}/{PEFT_PICKLE} is not a state dict of tensors")
    for key in state:  # as safetensors headers are checked: names go into one-line errors
        if not isinstance(key, str) or not key.isprintable():
            raise PatchError(f"{location}/{PEFT_PICKLE}: tensor name {repr(key)[:80]} is not a printable string")
    return state


def _read_adapter(location: str, storage_options: dict | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    fs, root = split_location(location, storage_options)
    config = _read_config(location, fs, root)
    if fs.exists(f"{root}/{PEFT_WEIGHTS}"):
        try:
            stored = Checkpoint.open(location, storage_options, weights_file=PEFT_WEIGHTS)
        except CheckpointError as exc:
            raise PatchError(f"PEFT adapter: {exc}") from None
        return config, stored.state_dict()
    if fs.exists(f"{root}/{PEFT_PICKLE}"):
        return config, _read_pickled_tensors(location, fs, root)
    raise PatchError(f"{location}: PEFT adapter without weights: expected {PEFT_WEIGHTS} or {PEFT_PICKLE}")


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """PEFT's own rule for rank_pattern / alpha_pattern: the first key matching the module name's end."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error:
            raise PatchError(f"rank_pattern / alpha_pattern key {key!r} is not a valid regular expression") from None
    return None


def _whole_tensor_name(tokens: list[str]) -> str:
    """A non-LoRA key (modules_to_save, a trained bias) as the live parameter it replaces."""
    tokens = [t for t in tokens if t != "base_layer"]
    if "modules_to_save" in tokens:
        at = tokens.index("modules_to_save")
        tokens = tokens[:at] + tokens[at + (1 if at == len(tokens) - 2 else 2) :]
    return ".".join(tokens)


def _check_adapter(location: str, config: dict[str, Any], state: dict[str, torch.Tensor]) -> str:
    """The adapter's peft_type, once it is one splice reads."""
    peft_type = config.get("peft_type")
    if peft_type not in ("LORA", "LN_TUNING"):
        raise PatchError(
            f"{location}: PEFT {printable(peft_type or 'untyped')} adapters are not supported; "
            f"splice reads LORA and LN_TUNING adapters"
        )
    if not state:
        raise PatchError(f"{location}: the PEFT adapter holds no tensors")
    if peft_type != "LORA":
        return peft_type
    try:
        LoraConfigValues.model_validate(config)
    except ValidationError as exc:
        raise PatchError(f"{location}/{PEFT_CONFIG}: {one_line(exc, 'config')}") from None
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise PatchError(
                f"{location}: PEFT {what} adapters are not supported; merge it with peft "
                f"(merge_and_unload) and extract a delta patch from the result"
            )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise PatchError(
            f"{location}: a {printable(init)} adapter needs peft's modified base; save it with peft's "
            f"path_initial_model_for_weight_conversion to get a plain LoRA adapter"
        )
    return peft_type


def _split_keys(
    location: str, peft_type: str, state: dict[str, torch.Tensor]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(live module -> its LoRA factors by part name, live parameter -> a whole tensor replacing it)."""
    lora: dict[str, dict[str, torch.Tensor]] = {}
    whole: dict[str, torch.Tensor] = {}
    read_from: dict[str, str] = {}  # live parameter -> the key its whole tensor came from
    for key, tensor in state.items():
        tokens = key.removeprefix(PREFIX).split(".")
        if "lora_magnitude_vector" in tokens:
            raise PatchError(
                f"{location}: PEFT DoRA adapters are not supported; merge it with peft "
                f"(merge_and_unload) and extract a delta patch from the result"
            )
        part = next((i for i, t in enumerate(tokens) if t in _LORA_PARTS), None)
        if part is not None and peft_type == "LORA":
            if tokens[-1] == "bias":
                raise PatchError(f"{location}: PEFT lora_bias adapters are not supported ({key})")
            lora.setdefault(".".join(tokens[:part]), {})[tokens[part]] = tensor
        elif peft_type == "LN_TUNING" and "ln_tuning_layers" in tokens:
            at = tokens.index("ln_tuning_layers")
            whole[".".join(tokens[:at] + tokens[-1:])] = tensor
        elif any(t.startswith(("trainable_tokens", "lora_", "ln_tuning")) for t in tokens):
            raise PatchError(f"{location}: adapter tensor {key} is of a kind splice does not read")
        elif "original_module" not in tokens:  # that is peft's untrained copy of a modules_to_save module
            _add_whole(location, whole, read_from, _whole_tensor_name(tokens), key, tensor)
    return lora, whole


def _add_whole(
    location: str, whole: dict[str, torch.Tensor], read_from: dict[str, str], live: str, key: str, tensor: torch.Tensor
) -> None:
    """One trained copy of `live`; with bias="all" peft saves a modules_to_save module's bias twice (`<m>.bias`
    and `<m>.modules_to_save.bias`), and the two must agree."""
    if live in whole and not torch.equal(whole[live], tensor):
        raise PatchError(
            f"{location}: {read_from[live]} and {key} are two different trained values of {live}; "
            f"keep one of them in the adapter (or merge it with peft and extract a delta patch)"
        )
    whole.setdefault(live, tensor)
    read_from.setdefault(live, key)


@dataclass
class _Target:
    """Where an adapter's live names land: the base's stored names (or the live names kept, without a base)."""

    location: str
    names: BaseNames | None

    def stored_of(self, live: str, what: str) -> str:
        if self.names is None:
            return live
        found = self.names.resolve(live)
        if found is None:
            raise PatchError(
                f"{self.location}: the adapter changes {what}, which {self.names.where} does not have; "
                f"is it the adapter's base model?"
            )
        return found[0]

    def check_shape(self, stored: str, shape: tuple[int, ...], what: str) -> None:
        if self.names is not None and tuple(self.names.stored_shapes[stored]) != tuple(shape):
            raise PatchError(
                f"{self.location}: the adapter changes {what} as shape {list(shape)}, {self.names.where} "
                f"has {list(self.names.stored_shapes[stored])}; is it the adapter's base model?"
            )

    def module_kind(self, module: str) -> str | None:
        """linear, conv1d, embedding or a class name; None when the base's module types are not known."""
        if self.names is None:
            return None
        live = self.names.resolve(module + ".weight")
        return self.names.module_kinds.get(live[1].rpartition(".")[0]) if live else None


def _factor_pair(location: str, module: str, parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(A, B, is an embedding) of one module, checked to be two matrices that multiply."""
    embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    a, b = (
        (parts.get("lora_embedding_A"), parts.get("lora_embedding_B"))
        if embedding
        else (parts.get("lora_A"), parts.get("lora_B"))
    )
    if a is None or b is None:
        raise PatchError(f"{location}: {module} has only one of its two LoRA factors")
    if a.dim() != 2 or b.dim() != 2:
        raise PatchError(
            f"{location}: LoRA on {module} is a convolution ({a.dim()}-D factors), which splice "
            f"does not support; merge it with peft and extract a delta patch instead"
        )
    if a.shape[0] != b.shape[1]:
        raise PatchError(f"{location}: {module}'s LoRA factors {list(b.shape)} and {list(a.shape)} do not multiply")
    return a, b, embedding


def _is_transposed(
    target: _Target, module: str, stored: str, a: torch.Tensor, b: torch.Tensor, embedding: bool, config: dict[str, Any]
) -> bool:
    """Whether B @ A is the stored weight transposed (Conv1D, Embedding, or fan_in_fan_out)."""
    if embedding:
        return True
    kind = target.module_kind(module)
    if kind in ("linear", "conv1d"):
        return kind == "conv1d"
    if kind is not None:
        raise PatchError(f"{target.location}: LoRA on {module}, a {kind}, is not supported")
    # no module type known: the stored shape decides, else the adapter's fan_in_fan_out
    plain, flipped = (b.shape[0], a.shape[1]), (a.shape[1], b.shape[0])
    shape = tuple(target.names.stored_shapes[stored]) if target.names is not None else None
    return bool(config.get("fan_in_fan_out")) if shape is None or plain == flipped else shape == flipped


def _lora_module(
    target: _Target, module: str, parts: dict[str, torch.Tensor], config: dict[str, Any]
) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(stored module, A, B) of one adapted module, in the base's stored layout, its rank checked."""
    location = target.location
    a, b, embedding = _factor_pair(location, module, parts)
    stored = target.stored_of(module + ".weight", module)
    if not stored.endswith(".weight"):
        raise PatchError(f"{location}: {module} is stored as {stored}, not as a module weight")
    new_a, new_b = (b.T, a.T) if _is_transposed(target, module, stored, a, b, embedding, config) else (a, b)
    target.check_shape(stored, (new_b.shape[0], new_a.shape[1]), module)
    rank, rank_pattern = a.shape[0], config.get("rank_pattern") or {}
    pattern_rank = rank_pattern.get(_pattern_key(rank_pattern, module), config.get("r", rank))
    if pattern_rank != rank:
        raise PatchError(f"{location}: {module} has rank-{rank} factors but the config says r={pattern_rank}")
    return stored[: -len(".weight")], new_a.contiguous(), new_b.contiguous()


def _lora_settings(
    target: _Target, lora: dict[str, dict[str, torch.Tensor]], config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """Every module's factors into `tensors`; returns the LoRA settings (rslora, rank, alpha)."""
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    alpha_pattern = config.get("alpha_pattern") or {}
    for module, parts in lora.items():
        stored_module, a, b = _lora_module(target, module, parts, config)
        if stored_module in ranks:
            raise PatchError(f"{target.location}: two adapter modules map onto {stored_module}.weight")
        tensors[stored_module + SUFFIX_A], tensors[stored_module + SUFFIX_B] = a, b
        ranks[stored_module] = a.shape[0]
        alphas[stored_module] = alpha_pattern.get(_pattern_key(alpha_pattern, module), config.get("lora_alpha", 8))
    return {"rslora": bool(config.get("use_rslora", False)), "rank": ranks, "alpha": alphas}


def load_peft_adapter(
    location: str | os.PathLike, storage_options: dict | None = None, base: Checkpoint | torch.nn.Module | None = None
) -> Patch:
    """A PEFT LoRA or LN-tuning adapter directory as a splice patch in the base's stored names and layout."""
    location = str(location)
    config, state = _read_adapter(location, storage_options)
    peft_type = _check_adapter(location, config, state)
    target = _Target(location, base_names(base) if base is not None else None)
    lora, whole = _split_keys(location, peft_type, state)
    tensors: dict[str, torch.Tensor] = {}
    replaced = []
    for live, tensor in whole.items():
        stored = target.stored_of(live, live)
        target.check_shape(stored, tuple(tensor.shape), live)
        tensors[stored] = tensor
        replaced.append(stored)
    settings: dict[str, Any] = {"source": "peft", "peft_type": peft_type}
    lineage = [p for p in (config.get("base_model_name_or_path"), recorded_location(location)) if p]
    if peft_type == "LN_TUNING":
        modules = sorted({name.rpartition(".")[0] for name in tensors})
        meta = PatchMeta(kind=PatchKind.layernorm, targets=modules, base=None, lineage=lineage, settings=settings)
        return Patch(tensors, meta)
    settings.update(_lora_settings(target, lora, config, tensors), replaced=replaced)
    modules = list(dict.fromkeys([*settings["rank"], *sorted(name.rpartition(".")[0] for name in replaced)]))
    meta = PatchMeta(kind=PatchKind.lora, targets=modules, base=None, lineage=lineage, settings=settings)
    return Patch(tensors, meta)
