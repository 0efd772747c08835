"""PEFT adapter directories read as splice patches, and splice patches written as PEFT adapters."""

from __future__ import annotations

import os

import torch

from splice.adapters.patch import Patch, PatchError
from splice.tensors.checkpoint import Checkpoint, split_location

PEFT_CONFIG = "adapter_config.json"


def is_peft_adapter(location: str | os.PathLike, storage_options: dict | None = None) -> bool:
    fs, root = split_location(str(location), storage_options)
    return fs.exists(f"{root}/{PEFT_CONFIG}")


def load_peft_adapter(location: str | os.PathLike, storage_options: dict | None = None,
                      base: Checkpoint | torch.nn.Module | None = None) -> Patch:
    raise PatchError(f"{location}: reading PEFT adapters is not available yet")
