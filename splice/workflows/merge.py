"""`splice.merge`: a recipe run with its model references resolved as mergekit configs write them."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from typing_extensions import Unpack

from splice.merge import recipe as recipes
from splice.options import RunKeywords, RunOptions
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.stream import StreamReport, open_all


def open_model_references(references: Sequence[str], storage_options: dict | None = None) -> list[Checkpoint]:
    """Each model reference of a recipe opened: a directory or fsspec URL."""
    return open_all(references, storage_options)


def merge(
    recipe: recipes.Recipe | str | os.PathLike,
    out: str | os.PathLike,
    *,
    prefer_own_kernels: bool = True,
    seed: int | None = None,
    run: RunOptions | None = None,
    **run_keywords: Unpack[RunKeywords],
) -> StreamReport:
    """Run a recipe (a Recipe, or the path of a YAML file) and write the merged model to `out`.

    `seed` seeds torch's generator first, for the random methods (dare_ties, dare_linear, della). `run` (or its
    fields as keywords: device, shard_size, force, progress, storage_options, ...) says how the run runs.
    """
    return recipes.merge(
        recipe,
        out,
        prefer_own_kernels=prefer_own_kernels,
        seed=seed,
        open_models=open_model_references,
        run=run,
        **run_keywords,
    )


def merged_state(
    recipe: recipes.Recipe, *, prefer_own_kernels: bool = True, seed: int | None = None, run: RunOptions | None = None
) -> dict[str, torch.Tensor]:
    """The model `merge(recipe, ...)` would write, tensor for tensor, held in memory instead (stored names, output
    dtypes): what a sweep hands a candidate's evaluation without writing it."""
    return recipes.merged_state(
        recipe, prefer_own_kernels=prefer_own_kernels, seed=seed, open_models=open_model_references, run=run
    )


def merged_model(
    recipe: recipes.Recipe, *, prefer_own_kernels: bool = True, seed: int | None = None, run: RunOptions | None = None
) -> recipes.MergedModel:
    """`merged_state`'s tensors, with the side files and config updates `merge` would write beside them (a sweep's
    candidate scored from its config: a sliced recipe changes the depth)."""
    return recipes.merged_model(
        recipe, prefer_own_kernels=prefer_own_kernels, seed=seed, open_models=open_model_references, run=run
    )
