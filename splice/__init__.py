"""splice: model merging and continual adaptation for PyTorch / Hugging Face models."""

from splice.adapters.apply import apply_patches
from splice.adapters.extract import extract_patch
from splice.adapters.live import PatchHandle, apply_patch
from splice.adapters.patch import Patch, PatchError, PatchKind, PatchMeta, fingerprint_base
from splice.errors import (
    CheckpointError,
    IncompatibleModelsError,
    OutputExistsError,
    RecipeError,
    SpliceError,
)
from splice.merge.recipe import Recipe, load_recipe, merge
from splice.merge.soup import GreedySoupReport, greedy_soup, soup
from splice.tensors.checkpoint import Checkpoint

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "GreedySoupReport",
    "IncompatibleModelsError",
    "OutputExistsError",
    "Patch",
    "PatchError",
    "PatchKind",
    "PatchMeta",
    "Recipe",
    "RecipeError",
    "PatchHandle",
    "SpliceError",
    "apply_patch",
    "apply_patches",
    "extract_patch",
    "fingerprint_base",
    "greedy_soup",
    "load_recipe",
    "merge",
    "soup",
]
