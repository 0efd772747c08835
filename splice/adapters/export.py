"""A patch from wherever it comes from, written in another library's format (PEFT)."""

from __future__ import annotations

import os
from pathlib import Path

from splice.adapters.peft.write import ExportBase, write_peft_adapter
from splice.adapters.sources import PatchSource, load_patch
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.writer import ensure_output_free


def export_peft(
    patch: PatchSource,
    out: str | os.PathLike,
    base: ExportBase | None = None,
    force: bool = False,
    *,
    storage_options: dict | None = None,
) -> Path:
    """Write a LoRA patch as a PEFT LoRA adapter, a LayerNorm patch as a PEFT LN_TUNING adapter, in `out`
    (adapter_config.json + adapter_model.safetensors). `base` (default: the base the patch was extracted from)
    gives transformers' module names and types. Everything is checked before anything is written."""
    loaded = load_patch(patch, storage_options)
    given_base = base.location if isinstance(base, Checkpoint) else base
    sources = [patch, given_base, loaded.meta.lineage[0] if len(loaded.meta.lineage) >= 2 else None]
    ensure_output_free(
        out, force, protected=[s for s in sources if isinstance(s, (str, os.PathLike))], what="the patch or its base"
    )
    return write_peft_adapter(loaded, out, base, force, storage_options)
