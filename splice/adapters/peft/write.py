"""Splice patches written as PEFT adapters, named as transformers loads the base.

LoRA patches become a PEFT LoRA adapter (Conv1D factors transposed with fan_in_fan_out, Embedding factors as
lora_embedding_A/B, differing ranks and alphas as rank_pattern / alpha_pattern keyed by exact module names;
replaced tensors of adapted modules as `<module>.base_layer.<param>`, other replaced modules whole as
modules_to_save), LayerNorm patches an LN_TUNING adapter (each module whole: tensors the patch lacks come
from the base); `peft.PeftModel.from_pretrained` loads them with no missing or unexpected keys.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from splice.adapters.kinds.lora import SUFFIX_A, SUFFIX_B, lora_modules, module_scale
from splice.adapters.meta import PatchKind
from splice.adapters.patch import Patch
from splice.adapters.peft.names import PEFT_CONFIG, PEFT_WEIGHTS, PREFIX, BaseNames, base_names
from splice.errors import PatchError, SpliceError
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.writer import staged_output, write_state_dict

ExportBase = Checkpoint | torch.nn.Module | str | os.PathLike


def _plain_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _most_common(values: dict[str, Any]) -> Any:
    return Counter(values.values()).most_common(1)[0][0]


def _open_export_base(
    patch: Patch, base: ExportBase | None, storage_options: dict | None
) -> Checkpoint | torch.nn.Module:
    if isinstance(base, (Checkpoint, torch.nn.Module)):
        return base
    if base is not None:
        return Checkpoint.open(base, storage_options)
    if len(patch.meta.lineage) >= 2:
        try:
            return Checkpoint.open(patch.meta.lineage[0], storage_options)
        except SpliceError:
            pass
    raise PatchError("exporting to PEFT needs the base model (`base`) to name modules as transformers loads them")


class _Naming:
    """A patch's stored tensor names as the base's live (transformers) names, shapes checked."""

    def __init__(self, patch: Patch, names: BaseNames):
        self.patch, self.names, self.to_live, self.shapes = patch, names, names.stored_to_live, patch.shapes

    def shape_of(self, stored: str) -> tuple[int, ...]:
        if stored in self.shapes:
            return self.shapes[stored]
        module = stored[: -len(".weight")]
        return self.shapes[module + SUFFIX_B][0], self.shapes[module + SUFFIX_A][1]

    def live_param(self, stored: str) -> str:
        names = self.names
        if stored not in self.to_live:
            raise PatchError(f"the patch changes {stored}, which {names.where} does not have")
        if tuple(names.stored_shapes[stored]) != tuple(self.shape_of(stored)):
            raise PatchError(
                f"the patch changes {stored} as shape {list(self.shape_of(stored))}, {names.where} has "
                f"{list(names.stored_shapes[stored])}"
            )
        return self.to_live[stored]

    def whole_modules(self, stored_names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        """live module -> every tensor of it: the patch's value, else the base's."""
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for stored in stored_names:
            module, _, param = self.live_param(stored).rpartition(".")
            grouped.setdefault(module, {})[param] = self.patch.tensors[stored]
        for module, params in grouped.items():
            for param in self.names.module_params.get(module, []):
                if param not in params:
                    base_name = self.names.live_to_stored.get(f"{module}.{param}")
                    if base_name is None or self.names.read is None:
                        raise PatchError(f"{module}.{param} is not stored in {self.names.where}; cannot export it")
                    params[param] = self.names.read(base_name)
        return grouped


def _layernorm_adapter(naming: _Naming, base_path: str | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    grouped = naming.whole_modules(list(naming.patch.tensors))
    tensors = {
        f"{PREFIX}{module}.ln_tuning_layers.{param}": value
        for module, params in grouped.items()
        for param, value in params.items()
    }
    config = {
        "peft_type": "LN_TUNING",
        "target_modules": sorted(grouped),
        "base_model_name_or_path": base_path,
        "exclude_modules": None,
        "modules_to_save": None,
        "inference_mode": True,
        "revision": None,
        "task_type": None,
    }
    return tensors, config


def _lora_factors(
    naming: _Naming, tensors: dict[str, torch.Tensor]
) -> tuple[dict[str, int], dict[str, int | float], bool]:
    """Every module's factors into `tensors` under PEFT's keys; (live module -> rank, -> alpha, fan_in_fan_out)."""
    patch, settings = naming.patch, naming.patch.meta.settings
    ranks, alphas, fan_in_fan_out = {}, {}, False
    for module in lora_modules(patch):
        module_scale(patch, module)  # checks rank and alpha are recorded and consistent
        live = naming.live_param(f"{module}.weight")
        if not live.endswith(".weight"):
            raise PatchError(f"{module}.weight is {live} in transformers, not a module weight PEFT can adapt")
        live_module = live[: -len(".weight")]
        kind = naming.names.module_kinds.get(live_module)
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
    return ranks, alphas, fan_in_fan_out


def _lora_adapter(naming: _Naming, base_path: str | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    settings = naming.patch.meta.settings
    tensors: dict[str, torch.Tensor] = {}
    ranks, alphas, fan_in_fan_out = _lora_factors(naming, tensors)
    # replaced tensors of LoRA-adapted modules (embedding layers PEFT saved whole, trained biases) are
    # written as PEFT writes them, `<module>.base_layer.<param>`; whole other modules as modules_to_save
    replaced = list(settings.get("replaced", []))
    for stored in replaced:
        module, _, param = naming.live_param(stored).rpartition(".")
        if module in ranks:
            tensors[f"{PREFIX}{module}.base_layer.{param}"] = naming.patch.tensors[stored]
    saved = naming.whole_modules([n for n in replaced if naming.live_param(n).rpartition(".")[0] not in ranks])
    tensors.update(
        {f"{PREFIX}{module}.{param}": value for module, params in saved.items() for param, value in params.items()}
    )
    r, alpha = _most_common(ranks), _most_common(alphas)
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": {re.escape(m): v for m, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(m): v for m, v in alphas.items() if v != alpha},
        "use_rslora": bool(settings.get("rslora", False)),
        "fan_in_fan_out": fan_in_fan_out,
        "modules_to_save": sorted(saved) or None,
        "base_model_name_or_path": base_path,
        "bias": "none",
        "lora_dropout": 0.0,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "task_type": None,
        "revision": None,
    }
    return tensors, config


_ADAPTERS = {PatchKind.lora: _lora_adapter, PatchKind.layernorm: _layernorm_adapter}  # PEFT has formats for these


def write_peft_adapter(
    patch: Patch,
    out: str | os.PathLike,
    base: ExportBase | None = None,
    force: bool = False,
    storage_options: dict | None = None,
) -> Path:
    """`out` (adapter_config.json + adapter_model.safetensors) for a LoRA or LayerNorm patch. `base` (default:
    the base the patch was extracted from) gives transformers' module names and types. Everything is checked
    before anything is written."""
    build = _ADAPTERS.get(patch.meta.kind)
    if build is None:
        raise PatchError(f"PEFT has no format for a {patch.meta.kind.value} patch; export a lora or layernorm patch")
    opened = _open_export_base(patch, base, storage_options)
    base_path = (
        patch.meta.lineage[0]
        if len(patch.meta.lineage) >= 2
        else (None if isinstance(opened, torch.nn.Module) else str(opened.location))
    )
    tensors, config = build(_Naming(patch, base_names(opened, strict=True)), base_path)
    tensors = {name: value.detach().to("cpu").contiguous() for name, value in tensors.items()}
    with staged_output(out, force) as staging:
        write_state_dict(staging, tensors, metadata={"format": "pt"}, single_file=PEFT_WEIGHTS)
        (staging / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(out)
