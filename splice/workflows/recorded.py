"""A recipe merged into an output that carries its record (`card.output_files`): the model card with each input's
digest, the recipe as run, the mergekit config. Each input is opened once: the checkpoint that is digested is the
one that is merged."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from splice.merge import recipe as recipes
from splice.options import RunOptions
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.digest import checkpoint_digest
from splice.tensors.stream import StreamReport
from splice.workflows.card import MergeRecord, output_files
from splice.workflows.references import reference_locations
from splice.workflows.regions import open_region
from splice.workflows.stats import open_statistics, statistics_digest


class OpenedModels:
    """A `ModelOpener` that opens each model reference once and keeps its checkpoint."""

    def __init__(self, open_models: recipes.ModelOpener):
        self._open = open_models
        self.checkpoints: dict[str, Checkpoint] = {}

    def __call__(self, references: Sequence[str], storage_options: dict | None = None) -> list[Checkpoint]:
        missing = list(dict.fromkeys(r for r in references if r not in self.checkpoints))
        if missing:
            self.checkpoints.update(zip(missing, self._open(missing, storage_options)))
        return [self.checkpoints[r] for r in references]


def input_digests(recipe: recipes.Recipe, opened: OpenedModels, storage_options: dict | None) -> dict[str, str]:
    """Each model `recipe` reads (its inputs in order, then what its tokenizer settings name), then each statistics
    artifact and mask patch it reads -> its digest: what a card lists and a stage's key covers."""
    locations = recipe.read_models()
    digests = {r: checkpoint_digest(c) for r, c in zip(locations, opened(locations, storage_options))}
    return {**digests, **{s: statistics_digest(s, storage_options) for s in recipe.read_stored()}}


def merge_recorded(
    record: MergeRecord,
    out: str | os.PathLike,
    *,
    opened: OpenedModels,
    run: RunOptions,
    prefer_own_kernels: bool = True,
    earlier: Sequence[MergeRecord] = (),
    extra_files: Mapping[str, bytes] | None = None,
) -> StreamReport:
    """Merge `record`'s recipe (its model references as `card.recorded_recipe` keeps them, its inputs digested) into
    `out`, which carries the card of this merge, made by the stages `earlier`, and `extra_files`. The caller has
    checked `out` by the output rule against everything it may not be (the recipe file: `ensure_output_free`)."""
    recipe = record.recipe
    return recipes.merge(
        recipe,
        out,
        prefer_own_kernels=prefer_own_kernels,
        seed=record.seed,
        open_models=opened,
        locate_models=reference_locations,
        files={**output_files(record, record.name or Path(out).name, earlier), **(extra_files or {})},
        description=f"{record.name}: {recipe.merge_method} merge" if record.name else None,
        open_stats=open_statistics,
        open_masks=open_region,
        run=run,
    )
