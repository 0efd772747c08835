"""splice: model merging and continual adaptation for PyTorch / Hugging Face models."""

from splice.adapters.apply import apply_patches
from splice.adapters.export import export_peft
from splice.adapters.extract import extract_patch
from splice.adapters.fingerprint import fingerprint_base
from splice.adapters.live import PatchHandle, apply_patch
from splice.adapters.patch import Patch, PatchError, PatchKind, PatchMeta
from splice.errors import (
    CheckpointError,
    IncompatibleModelsError,
    OutputExistsError,
    RecipeError,
    SpliceError,
)
from splice.merge.fusion import fuse
from splice.merge.recipe import Recipe, load_recipe, merge
from splice.merge.soup import GreedySoupReport, greedy_soup, soup
from splice.registry.store import Registry
from splice.tensors.checkpoint import Checkpoint
from splice.version import __version__
from splice.workflows.deploy import DeploymentRecord, apply_ref, deploy, read_deployment_record

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "DeploymentRecord",
    "GreedySoupReport",
    "IncompatibleModelsError",
    "OutputExistsError",
    "Patch",
    "PatchError",
    "PatchKind",
    "PatchMeta",
    "Recipe",
    "RecipeError",
    "Registry",
    "PatchHandle",
    "SpliceError",
    "__version__",
    "apply_patch",
    "apply_patches",
    "apply_ref",
    "deploy",
    "export_peft",
    "extract_patch",
    "fingerprint_base",
    "fuse",
    "greedy_soup",
    "load_recipe",
    "merge",
    "read_deployment_record",
    "soup",
]
