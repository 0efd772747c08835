"""Independent readers for checking outputs: safetensors' own loader, not splice's."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def load_dir(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model directory, read with safetensors itself."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(directory / name))
    return state
