"""splice: model merging and continual adaptation for PyTorch / Hugging Face models.

The public API is resolved on first use: `import splice` imports neither torch nor transformers, so the
command line and the registry's byte-moving commands start fast; `splice.soup` imports the soup engine
(and torch) the first time it is looked up.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from splice.version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "Checkpoint": "splice.tensors.checkpoint",
    "CheckpointError": "splice.errors",
    "DeploymentRecord": "splice.workflows.deploy",
    "DriftReport": "splice.adapters.drift",
    "FusionOptions": "splice.merge.fusion",
    "GreedySoupReport": "splice.merge.soup",
    "LoraOptions": "splice.adapters.kinds.lora",
    "MaskOptions": "splice.adapters.kinds.mask",
    "IncompatibleModelsError": "splice.errors",
    "LayerNormBank": "splice.continual.bank",
    "OutputExistsError": "splice.errors",
    "Patch": "splice.adapters.patch",
    "PatchError": "splice.errors",
    "PatchHandle": "splice.adapters.live",
    "PatchKind": "splice.adapters.meta",
    "PatchMeta": "splice.adapters.meta",
    "Recipe": "splice.merge.recipe",
    "RecipeError": "splice.errors",
    "Registry": "splice.registry.store",
    "RunOptions": "splice.options",
    "SpliceError": "splice.errors",
    "apply_patch": "splice.adapters.live",
    "apply_patches": "splice.adapters.apply",
    "apply_ref": "splice.workflows.deploy",
    "collect_stats": "splice.workflows.stats",
    "deploy": "splice.workflows.deploy",
    "export_peft": "splice.adapters.export",
    "extract_patch": "splice.adapters.extract",
    "fingerprint_base": "splice.adapters.fingerprint",
    "fuse": "splice.merge.fusion",
    "greedy_soup": "splice.merge.soup",
    "load_recipe": "splice.merge.recipe",
    "localize": "splice.workflows.localize",
    "merge": "splice.workflows.merge",
    "merge_patches": "splice.workflows.patch_merge",
    "port": "splice.workflows.port",
    "port_patch": "splice.adapters.port",
    "read_deployment_record": "splice.workflows.deploy",
    "soup": "splice.merge.soup",
    "sweep": "splice.workflows.sweep.run",
    "SweepReport": "splice.workflows.sweep.results",
}

__all__ = ["__version__", *sorted(_EXPORTS)]

if TYPE_CHECKING:  # the same names for type checkers and IDEs (tests/test_cli_json.py keeps it equal to _EXPORTS)
    from splice.adapters.apply import apply_patches
    from splice.adapters.drift import DriftReport
    from splice.adapters.export import export_peft
    from splice.adapters.extract import extract_patch
    from splice.adapters.fingerprint import fingerprint_base
    from splice.adapters.kinds.lora import LoraOptions
    from splice.adapters.kinds.mask import MaskOptions
    from splice.adapters.live import PatchHandle, apply_patch
    from splice.adapters.meta import PatchKind, PatchMeta
    from splice.adapters.patch import Patch
    from splice.adapters.port import port_patch
    from splice.continual.bank import LayerNormBank
    from splice.errors import (
        CheckpointError,
        IncompatibleModelsError,
        OutputExistsError,
        PatchError,
        RecipeError,
        SpliceError,
    )
    from splice.merge.fusion import FusionOptions, fuse
    from splice.merge.recipe import Recipe, load_recipe
    from splice.merge.soup import GreedySoupReport, greedy_soup, soup
    from splice.options import RunOptions
    from splice.registry.store import Registry
    from splice.tensors.checkpoint import Checkpoint
    from splice.workflows.deploy import DeploymentRecord, apply_ref, deploy, read_deployment_record
    from splice.workflows.localize import localize
    from splice.workflows.merge import merge
    from splice.workflows.patch_merge import merge_patches
    from splice.workflows.port import port
    from splice.workflows.stats import collect_stats
    from splice.workflows.sweep.results import SweepReport
    from splice.workflows.sweep.run import sweep


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'splice' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    """The public API and __version__ (not the modules this file imports, nor subpackages once loaded)."""
    return list(__all__)


class _SpliceModule(types.ModuleType):
    """`splice.merge` is the merge function, as it always was, though a subpackage has that name too: the
    import system's binding of the subpackage onto this module is not kept for names the API exports."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _SpliceModule
