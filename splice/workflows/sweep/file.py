"""The sweep file (`splice sweep SWEEP.yaml`), validated before any trial: the recipe with its searched values
marked in place (inline, or a recipe file's path), how to search (grid, random, TPE or CMA-ES, a seed and an exact
trial budget), the evaluation hook with the arguments passed through to it, which candidates are kept, and where
the results go.

```yaml
recipe: ties.yml                 # or the recipe itself, inline
search: {method: tpe, seed: 0, trials: 32}
evaluate: {hook: evals.py:score, args: {split: val}, direction: maximize}
keep: best                       # best | all | none
out: sweep-out
```
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, StrictInt

from splice.errors import RecipeError, SpliceError
from splice.hooks import load_callable
from splice.merge.recipe import Recipe, read_recipe_document
from splice.values import Bounded, PositiveInt, beside, hook_beside, validated_yaml
from splice.workflows.sweep.space import SearchParameter, check_space, grid_size

SearchMethod = Literal["grid", "random", "tpe", "cmaes"]


class SearchSettings(BaseModel):
    """`search:`. `trials`: exactly how many candidates are evaluated; a grid's default (and most) is its size."""

    model_config = ConfigDict(extra="forbid")
    method: SearchMethod
    seed: StrictInt = 0
    trials: PositiveInt | None = None


class Evaluation(BaseModel):
    """`evaluate:`: the MODULE:FUNCTION (or path/to/file.py:FUNCTION, relative to the sweep file) scoring a
    candidate (`score(state)` or `score(state, model_dir)`, as `splice soup --greedy --eval` takes it), `args`
    passed to it unchanged as keywords, and whether a higher score is better."""

    model_config = ConfigDict(extra="forbid")
    hook: str
    args: Annotated[dict[str, Any], Bounded] = {}
    direction: Literal["maximize", "minimize"] = "maximize"


class SweepFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    recipe: str | dict[str, Any]
    search: SearchSettings
    evaluate: Evaluation
    keep: Literal["best", "all", "none"] = "best"
    out: str | None = None


@dataclass(frozen=True)
class Sweep:
    """A sweep file read and checked: the recipe as written (marks in place), its searched parameters, one filled
    recipe that validated, and the exact number of trials."""

    source: str
    file: SweepFile
    recipe: dict[str, Any]
    parameters: list[SearchParameter]
    example: Recipe
    trials: int
    hook: str  # as the evaluation loads it (a file path made absolute)
    out: str | None


def load_sweep(path: str | os.PathLike) -> Sweep:
    """The sweep file at `path`, every entry checked; a one-line error naming the file and the entry otherwise."""
    path = Path(path)
    file = validated_yaml(path, SweepFile, "sweep", "a sweep is a mapping (recipe, search, evaluate, ...)", SpliceError)
    source = str(path)
    recipe = _recipe_of(path, file.recipe)
    parameters, example = check_space(recipe, source)
    trials = _trials(file.search, parameters, source)
    hook = hook_beside(path, file.evaluate.hook)
    load_callable(hook, option=f"{source}: evaluate.hook")  # a hook that does not import fails here, not in a trial
    out = beside(path, file.out) if file.out is not None else None
    return Sweep(source, file, recipe, parameters, example, trials, hook, out)


def _recipe_of(sweep_file: Path, recipe: str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(recipe, dict):
        return recipe
    data = read_recipe_document(beside(sweep_file, recipe)).data
    if not isinstance(data, dict):
        raise RecipeError(f"{sweep_file}: recipe {recipe}: a recipe is a mapping with merge_method and models")
    return data


def _trials(search: SearchSettings, parameters: list[SearchParameter], source: str) -> int:
    """The exact budget: a grid's size unless `trials` asks for fewer; the others need `trials`."""
    if search.method == "grid":
        size = grid_size(parameters)
        if search.trials is not None and search.trials > size:
            raise SpliceError(f"{source}: search.trials {search.trials} is more than the grid's {size} candidates")
        return search.trials or size
    if search.trials is None:
        raise SpliceError(f"{source}: search.trials: say how many candidates a {search.method} search evaluates")
    return search.trials
