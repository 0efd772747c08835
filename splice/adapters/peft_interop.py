"""PEFT adapter directories read as splice patches, and splice patches written as PEFT adapters.

Read: LoRA adapters (`peft_type` LORA: r / lora_alpha, rank_pattern / alpha_pattern, use_rslora, fan_in_fan_out,
LoRA on Linear, Conv1D and Embedding modules, plus `modules_to_save` and trained biases, which replace the
base's tensors) and LayerNorm-tuning adapters (LN_TUNING: whole copies of the tuned modules, which replace
them). What cannot be expressed as a change of the base's weights (DoRA, LoRA biases, aLoRA, trainable
tokens, LoRA on convolutions, other PEFT types) is refused in one line.

PEFT keys name the modules of the model as transformers loads it (`base_model.model.<module>.lora_A.weight`),
which in transformers 5 can differ from the names stored on disk (ViT). Given the base (a stored
`Checkpoint` or a live `torch.nn.Module`), splice builds the model's skeleton on the meta device (no memory,
no weights), maps module names to stored names with transformers' own save-time conversion, and reads each
module's type (Conv1D weights are stored [in, out]: PEFT's fan_in_fan_out). A key that names no module of
that skeleton is matched by a unique suffix (an adapter made on `BertModel` applied to a
`BertForSequenceClassification`). Without a base, names are kept as they are and only shapes are checked
where the patch is applied. PEFT adapters carry no base fingerprint: the patch has `meta.base = None`.

Write (`export_peft`): LoRA patches as a PEFT LoRA adapter (Conv1D factors transposed with fan_in_fan_out,
Embedding factors as lora_embedding_A/B, differing ranks and alphas as rank_pattern / alpha_pattern keyed by
exact module names; replaced tensors of adapted modules as `<module>.base_layer.<param>`, other replaced
modules whole as modules_to_save), LayerNorm patches as an LN_TUNING adapter (each module whole: tensors the
patch lacks come from the base), all named as transformers loads the base; `peft.PeftModel.from_pretrained`
loads them with no missing or unexpected keys.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from splice.adapters.kinds.lora import SUFFIX_A, SUFFIX_B, lora_modules, module_scale
from splice.adapters.patch import Patch, PatchError, PatchKind, PatchMeta
from splice.arch.names import stored_to_module_names
from splice.errors import CheckpointError, SpliceError
from splice.tensors.checkpoint import Checkpoint, split_location
from splice.tensors.writer import ensure_output_free, staged_output, write_state_dict

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PICKLE = "adapter_model.bin"
PREFIX = "base_model.model."

_LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
# config entries whose effect is not a change of the base's weights splice can make (truthy = refused)
_UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "lora_bias", "target_parameters": "target_parameters",
                "layer_replication": "layer_replication", "trainable_token_indices": "trainable tokens",
                "alora_invocation_tokens": "aLoRA", "use_qalora": "QA-LoRA", "use_bdlora": "BD-LoRA",
                "megatron_config": "Megatron"}
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


# -- the base's names ----------------------------------------------------------------------------------


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
        return BaseNames({live: stored for stored, live in stored_to_live.items()},
                         {stored: tuple(state[live].shape) for stored, live in stored_to_live.items()}, kinds, params,
                         lambda stored: state[stored_to_live[stored]].detach(), "the model")
    shapes = {name: info.shape for name, info in base.tensors.items()}
    try:
        model = skeleton(base)
        mapping = stored_to_module_names(model)
    except Exception as exc:  # any architecture transformers cannot build here
        if strict:
            raise PatchError(f"{base.location}: cannot build the model to learn its module names "
                             f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})"
                             ) from None
        return BaseNames({name: name for name in shapes}, shapes, read=base.read, where=str(base.location))
    kinds, params = _describe_modules(model)
    live_to_stored = {live: stored for stored, live in mapping.items() if stored in shapes}
    return BaseNames(live_to_stored, shapes, kinds, params, base.read, str(base.location))


# -- reading -------------------------------------------------------------------------------------------


def is_peft_adapter(location: str | os.PathLike, storage_options: dict | None = None) -> bool:
    try:
        fs, root = split_location(str(location), storage_options)
        return fs.exists(f"{root}/{PEFT_CONFIG}")
    except Exception:  # not a location fsspec can reach: let the splice patch reader say why
        return False


def _read_adapter(location: str, storage_options: dict | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    fs, root = split_location(location, storage_options)
    try:
        config = json.loads(fs.cat_file(f"{root}/{PEFT_CONFIG}"))
    except ValueError as exc:
        raise PatchError(f"{location}/{PEFT_CONFIG} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise PatchError(f"{location}/{PEFT_CONFIG} is not a JSON object")
    if fs.exists(f"{root}/{PEFT_WEIGHTS}"):
        try:
            stored = Checkpoint.open(location, storage_options, weights_file=PEFT_WEIGHTS)
        except CheckpointError as exc:
            raise PatchError(f"PEFT adapter: {exc}") from None
        return config, stored.state_dict()
    if fs.exists(f"{root}/{PEFT_PICKLE}"):
        try:  # never unpickle anything but tensors
            state = torch.load(io.BytesIO(fs.cat_file(f"{root}/{PEFT_PICKLE}")), map_location="cpu",
                               weights_only=True)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PatchError(f"{location}/{PEFT_PICKLE}: refused or unreadable as plain tensors ({first})") from None
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise PatchError(f"{location}/{PEFT_PICKLE} is not a state dict of tensors")
        return config, state
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
    tokens = [t for t in tokens if t not in ("base_layer", "original_module")]
    if "modules_to_save" in tokens:
        at = tokens.index("modules_to_save")
        tokens = tokens[:at] + tokens[at + (1 if at == len(tokens) - 2 else 2):]
    return ".".join(tokens)


def _refuse_config(location: str, config: dict[str, Any]) -> None:
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise PatchError(f"{location}: PEFT {what} adapters are not supported; merge it with peft "
                             f"(merge_and_unload) and extract a delta patch from the result")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise PatchError(f"{location}: a {init} adapter needs peft's modified base; save it with peft's "
                         f"path_initial_model_for_weight_conversion to get a plain LoRA adapter")


def load_peft_adapter(location: str | os.PathLike, storage_options: dict | None = None,
                      base: Checkpoint | torch.nn.Module | None = None) -> Patch:
    """A PEFT LoRA or LN-tuning adapter directory as a splice patch in the base's stored names and layout."""
    location = str(location)
    config, state = _read_adapter(location, storage_options)
    peft_type = config.get("peft_type")
    if peft_type not in ("LORA", "LN_TUNING"):
        raise PatchError(f"{location}: PEFT {peft_type or 'untyped'} adapters are not supported; splice reads "
                         f"LORA and LN_TUNING adapters")
    if not state:
        raise PatchError(f"{location}: the PEFT adapter holds no tensors")
    if peft_type == "LORA":
        _refuse_config(location, config)
    names = base_names(base) if base is not None else None

    def stored_of(live: str, what: str) -> str:
        if names is None:
            return live
        found = names.resolve(live)
        if found is None:
            raise PatchError(f"{location}: the adapter changes {what}, which {names.where} does not have; "
                             f"is it the adapter's base model?")
        return found[0]

    def check_shape(stored: str, shape: tuple[int, ...], what: str) -> None:
        if names is not None and tuple(names.stored_shapes[stored]) != tuple(shape):
            raise PatchError(f"{location}: the adapter changes {what} as shape {list(shape)}, {names.where} has "
                             f"{list(names.stored_shapes[stored])}; is it the adapter's base model?")

    lora: dict[str, dict[str, torch.Tensor]] = {}
    whole: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        tokens = key.removeprefix(PREFIX).split(".")
        if "lora_magnitude_vector" in tokens:
            raise PatchError(f"{location}: PEFT DoRA adapters are not supported; merge it with peft "
                             f"(merge_and_unload) and extract a delta patch from the result")
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
        else:
            whole[_whole_tensor_name(tokens)] = tensor

    tensors: dict[str, torch.Tensor] = {}
    replaced = []
    for live, tensor in whole.items():
        stored = stored_of(live, live)
        check_shape(stored, tuple(tensor.shape), live)
        tensors[stored] = tensor
        replaced.append(stored)

    settings: dict[str, Any] = {"source": "peft", "peft_type": peft_type}
    lineage = [p for p in (config.get("base_model_name_or_path"), location) if p]
    if peft_type == "LN_TUNING":
        modules = sorted({name.rpartition(".")[0] for name in tensors})
        meta = PatchMeta(kind=PatchKind.layernorm, targets=modules, base=None, lineage=lineage, settings=settings)
        return Patch(tensors, meta)

    rslora = bool(config.get("use_rslora", False))
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    for module, parts in lora.items():
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a, b = (parts.get("lora_embedding_A"), parts.get("lora_embedding_B")) if embedding else (
            parts.get("lora_A"), parts.get("lora_B"))
        if a is None or b is None:
            raise PatchError(f"{location}: {module} has only one of its two LoRA factors")
        if a.dim() != 2 or b.dim() != 2:
            raise PatchError(f"{location}: LoRA on {module} is a convolution ({a.dim()}-D factors), which splice "
                             f"does not support; merge it with peft and extract a delta patch instead")
        if a.shape[0] != b.shape[1]:
            raise PatchError(f"{location}: {module}'s LoRA factors {list(b.shape)} and {list(a.shape)} do not multiply")
        rank = a.shape[0]
        stored = stored_of(module + ".weight", module)
        if not stored.endswith(".weight"):
            raise PatchError(f"{location}: {module} is stored as {stored}, not as a module weight")
        kind = None
        if names is not None:
            live = names.resolve(module + ".weight")
            kind = names.module_kinds.get(live[1].rpartition(".")[0]) if live else None
        if embedding:
            transposed = True
        elif kind in ("linear", "conv1d"):
            transposed = kind == "conv1d"
        elif kind is not None:
            raise PatchError(f"{location}: LoRA on {module}, a {kind}, is not supported")
        else:  # no module type known: the stored shape decides, else the adapter's fan_in_fan_out
            plain, flipped = (b.shape[0], a.shape[1]), (a.shape[1], b.shape[0])
            shape = tuple(names.stored_shapes[stored]) if names is not None else None
            transposed = bool(config.get("fan_in_fan_out")) if shape is None or plain == flipped else shape == flipped
        new_a, new_b = (b.T, a.T) if transposed else (a, b)
        check_shape(stored, (new_b.shape[0], new_a.shape[1]), module)
        pattern_rank = rank_pattern.get(_pattern_key(rank_pattern, module), config.get("r", rank))
        if pattern_rank != rank:
            raise PatchError(f"{location}: {module} has rank-{rank} factors but the config says r={pattern_rank}")
        stored_module = stored[: -len(".weight")]
        if stored_module in ranks:
            raise PatchError(f"{location}: two adapter modules map onto {stored}")
        tensors[stored_module + SUFFIX_A] = new_a.contiguous()
        tensors[stored_module + SUFFIX_B] = new_b.contiguous()
        ranks[stored_module] = rank
        alphas[stored_module] = alpha_pattern.get(_pattern_key(alpha_pattern, module), config.get("lora_alpha", 8))
    settings.update(rslora=rslora, rank=ranks, alpha=alphas, replaced=replaced)
    modules = list(dict.fromkeys([*ranks, *sorted(name.rpartition(".")[0] for name in replaced)]))
    meta = PatchMeta(kind=PatchKind.lora, targets=modules, base=None, lineage=lineage, settings=settings)
    return Patch(tensors, meta)


# -- writing -------------------------------------------------------------------------------------------


def _plain_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _most_common(values: dict[str, Any]) -> Any:
    return Counter(values.values()).most_common(1)[0][0]


def _open_export_base(patch: Patch, base: Checkpoint | torch.nn.Module | str | os.PathLike | None,
                      storage_options: dict | None) -> Checkpoint | torch.nn.Module:
    if isinstance(base, (Checkpoint, torch.nn.Module)):
        return base
    if base is not None:
        return Checkpoint.open(base, storage_options)
    if len(patch.meta.lineage) >= 2:
        try:
            return Checkpoint.open(patch.meta.lineage[0], storage_options)
        except SpliceError:
            pass
    raise PatchError("exporting to PEFT needs the base model (--base) to name modules as transformers loads them")


def export_peft(patch: Patch | str | os.PathLike, out: str | os.PathLike,
                base: Checkpoint | torch.nn.Module | str | os.PathLike | None = None, force: bool = False, *,
                storage_options: dict | None = None) -> Path:
    """Write a LoRA patch as a PEFT LoRA adapter, a LayerNorm patch as a PEFT LN_TUNING adapter, in `out`
    (adapter_config.json + adapter_model.safetensors). `base` (default: the base the patch was extracted from)
    gives transformers' module names and types. Everything is checked before anything is written."""
    ensure_output_free(out, force)
    if not isinstance(patch, Patch):
        from splice.adapters.sources import load_patch

        patch = load_patch(patch, storage_options)
    if patch.meta.kind not in (PatchKind.lora, PatchKind.layernorm):
        raise PatchError(f"PEFT has no format for a {patch.meta.kind.value} patch; export a lora or layernorm patch")
    opened = _open_export_base(patch, base, storage_options)
    names = base_names(opened, strict=True)
    to_live = names.stored_to_live
    base_path = patch.meta.lineage[0] if len(patch.meta.lineage) >= 2 else (
        None if isinstance(opened, torch.nn.Module) else str(opened.location))

    def live_param(stored: str) -> str:
        if stored not in to_live:
            raise PatchError(f"the patch changes {stored}, which {names.where} does not have")
        if tuple(names.stored_shapes[stored]) != tuple(shape_of(stored)):
            raise PatchError(f"the patch changes {stored} as shape {list(shape_of(stored))}, {names.where} has "
                             f"{list(names.stored_shapes[stored])}")
        return to_live[stored]

    shapes = patch.shapes

    def shape_of(stored: str) -> tuple[int, ...]:
        if stored in shapes:
            return shapes[stored]
        module = stored[: -len(".weight")]
        return shapes[module + SUFFIX_B][0], shapes[module + SUFFIX_A][1]

    def whole_modules(stored_names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        """live module -> every tensor of it: the patch's value, else the base's."""
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for stored in stored_names:
            module, _, param = live_param(stored).rpartition(".")
            grouped.setdefault(module, {})[param] = patch.tensors[stored]
        for module, params in grouped.items():
            for param in names.module_params.get(module, []):
                if param not in params:
                    stored = names.live_to_stored.get(f"{module}.{param}")
                    if stored is None or names.read is None:
                        raise PatchError(f"{module}.{param} is not stored in {names.where}; cannot export it")
                    params[param] = names.read(stored)
        return grouped

    tensors: dict[str, torch.Tensor] = {}
    if patch.meta.kind is PatchKind.layernorm:
        grouped = whole_modules(list(patch.tensors))
        for module, params in grouped.items():
            for param, value in params.items():
                tensors[f"{PREFIX}{module}.ln_tuning_layers.{param}"] = value
        config: dict[str, Any] = {"peft_type": "LN_TUNING", "target_modules": sorted(grouped),
                                  "base_model_name_or_path": base_path, "exclude_modules": None,
                                  "modules_to_save": None, "inference_mode": True, "revision": None,
                                  "task_type": None}
    else:
        settings = patch.meta.settings
        ranks, alphas, live_modules = {}, {}, {}
        fan_in_fan_out = False
        for module in lora_modules(patch):
            module_scale(patch, module)  # checks rank and alpha are recorded and consistent
            live = live_param(f"{module}.weight")
            if not live.endswith(".weight"):
                raise PatchError(f"{module}.weight is {live} in transformers, not a module weight PEFT can adapt")
            live_module = live[: -len(".weight")]
            kind = names.module_kinds.get(live_module)
            a, b = patch.tensors[module + SUFFIX_A], patch.tensors[module + SUFFIX_B]
            key = PREFIX + live_module
            if kind == "linear":
                tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
            elif kind == "conv1d":
                tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = b.T, a.T
                fan_in_fan_out = True
            elif kind == "embedding":
                tensors[f"{key}.lora_embedding_A"], tensors[f"{key}.lora_embedding_B"] = b.T, a.T
            else:
                raise PatchError(f"{live_module} is a {kind}; PEFT LoRA adapts Linear, Conv1D and Embedding modules")
            ranks[live_module] = settings["rank"].get(module, a.shape[0])
            alphas[live_module] = _plain_number(settings["alpha"][module])
            live_modules[module] = live_module
        # replaced tensors of LoRA-adapted modules (embedding layers PEFT saved whole, trained biases) are
        # written as PEFT writes them, `<module>.base_layer.<param>`; whole other modules as modules_to_save
        adapted = set(live_modules.values())
        replaced = list(settings.get("replaced", []))
        for stored in replaced:
            module, _, param = live_param(stored).rpartition(".")
            if module in adapted:
                tensors[f"{PREFIX}{module}.base_layer.{param}"] = patch.tensors[stored]
        saved = whole_modules([n for n in replaced if live_param(n).rpartition(".")[0] not in adapted])
        for module, params in saved.items():
            for param, value in params.items():
                tensors[f"{PREFIX}{module}.{param}"] = value
        r, alpha = _most_common(ranks), _most_common(alphas)
        config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sorted(ranks),
                  "rank_pattern": {re.escape(m): v for m, v in ranks.items() if v != r},
                  "alpha_pattern": {re.escape(m): v for m, v in alphas.items() if v != alpha},
                  "use_rslora": bool(settings.get("rslora", False)), "fan_in_fan_out": fan_in_fan_out,
                  "modules_to_save": sorted(saved) or None, "base_model_name_or_path": base_path,
                  "bias": "none", "lora_dropout": 0.0, "use_dora": False, "init_lora_weights": True,
                  "inference_mode": True, "task_type": None, "revision": None}
    tensors = {name: value.detach().to("cpu").contiguous() for name, value in tensors.items()}
    with staged_output(out, force) as staging:
        write_state_dict(staging, tensors, metadata={"format": "pt"}, single_file=PEFT_WEIGHTS)
        (staging / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(out)
