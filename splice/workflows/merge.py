"""`splice.merge`: a recipe (or a multi-stage recipe file) run with its model references resolved as mergekit configs
write them, into an output that carries its model card and the recipe as run."""

from __future__ import annotations

import os

from typing_extensions import Unpack

from splice.errors import SpliceError, parameter
from splice.merge import recipe as recipes
from splice.options import RunKeywords, RunOptions, run_options
from splice.tensors.stream import StreamReport
from splice.tensors.writer import ensure_output_free
from splice.workflows.card import MergeRecord, recorded_recipe
from splice.workflows.recorded import OpenedModels, input_digests, merge_recorded
from splice.workflows.references import open_model_references, reference_locations
from splice.workflows.regions import open_region
from splice.workflows.stages import StagesReport, merge_stages
from splice.workflows.stats import open_statistics, statistics_locations


def merge(
    recipe: recipes.Recipe | str | os.PathLike,
    out: str | os.PathLike,
    *,
    stage: str | None = None,
    intermediate_dir: str | os.PathLike | None = None,
    prefer_own_kernels: bool = True,
    seed: int | None = None,
    run: RunOptions | None = None,
    **run_keywords: Unpack[RunKeywords],
) -> StreamReport | StagesReport:
    """Run a recipe (a Recipe, or the path of a YAML file) and write the merged model to `out`, with its model card
    (README.md: the recipe, each input's digest, splice's version), the recipe as run (splice_recipe.yml) and, where
    mergekit can run it, mergekit_config.yml.

    A file of several `---`-separated recipes is a multi-stage recipe (`splice.workflows.stages`): its final merge
    (or the stage named `stage`) is written to `out`, the stages it needs are taken from or kept in the cache
    `intermediate_dir` (default: `<out>.stages` beside `out`), and a StagesReport says which ran and which were
    reused; `stage` or `intermediate_dir` make a one-document file run as one stage. `seed` seeds torch's generator
    first, for the random methods (dare_ties, dare_linear, della). `run` (or its fields as keywords: device,
    shard_size, force, progress, storage_options, ...) says how the run runs.
    """
    run = run_options(run, run_keywords, "merge")
    recipe_file: list[str | os.PathLike] = []
    if not isinstance(recipe, recipes.Recipe):
        recipe_file = [recipe]
        documents = recipes.read_recipe_documents(recipe)
        if len(documents) > 1 or stage is not None or intermediate_dir is not None:
            return merge_stages(
                recipe,
                out,
                open_models=open_model_references,
                run=run,
                documents=documents,
                stage=stage,
                intermediate_dir=intermediate_dir,
                prefer_own_kernels=prefer_own_kernels,
                seed=seed,
            )
        document = documents[0] if documents else None
        recipe = recipes.parse_recipe(document and document.data, str(recipe), document.key_lines if document else None)
    elif stage is not None or intermediate_dir is not None:
        given = "stage" if stage is not None else "intermediate_dir"
        raise SpliceError(f"{parameter(given)} is for a multi-stage recipe file; give the file's path as `recipe`")
    recipe = recorded_recipe(recipe)
    statistics = statistics_locations(recipe.read_stored(), run.storage_options)
    protected = [*reference_locations(recipe.read_models()), *statistics, *recipe_file]
    ensure_output_free(out, run.force, protected=protected, what="an input or the registry")
    opened = OpenedModels(open_model_references)
    record = MergeRecord(recipe, input_digests(recipe, opened, run.storage_options), seed, recipe.name)
    return merge_recorded(record, out, opened=opened, run=run, prefer_own_kernels=prefer_own_kernels)


def merged_model(
    recipe: recipes.Recipe, *, prefer_own_kernels: bool = True, seed: int | None = None, run: RunOptions | None = None
) -> recipes.MergedModel:
    """The model `merge(recipe, ...)` would write, held in memory (its tensors, and the side files and config updates
    it would write beside them): a sweep's candidate, scored without writing it."""
    return recipes.merged_model(
        recipe,
        prefer_own_kernels=prefer_own_kernels,
        seed=seed,
        open_models=open_model_references,
        open_stats=open_statistics,
        open_masks=open_region,
        run=run,
    )
