"""Independent readers for checking outputs: safetensors' own loader, not splice's."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from splice.cli.app import main as cli_main


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


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """`splice ARGS` in this process through the real entry point: (exit code, stdout, stderr)."""
    handlers, level = logging.root.handlers[:], logging.root.level
    monkeypatch.setattr(sys, "argv", ["splice", *map(str, args)])
    capsys.readouterr()
    try:
        cli_main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        logging.root.handlers[:] = handlers
        logging.root.setLevel(level)
    out, err = capsys.readouterr()
    return code, out, err
