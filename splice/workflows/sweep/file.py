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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from splice.errors import RecipeError, SpliceError
from splice.hooks import load_callable
from splice.merge.recipe import Recipe, read_recipe_document
from splice.values import Bounded, PositiveInt, beside, hook_beside, validated_yaml
from splice.workflows.sweep.push import PushSettings
from splice.workflows.sweep.space import SearchParameter, check_marks, check_space, grid_size
from splice.workflows.sweep.subjects import PortSpec, port_spec, soup_as_recipe, subject_kind

SearchMethod = Literal["grid", "random", "tpe", "cmaes", "greedy_soup"]
CANDIDATE_TIMEOUT = 6 * 3600.0  # seconds one candidate may take (merge and evaluation) unless `evaluate.timeout` says


class SearchSettings(BaseModel):
    """`search:`. `trials`: exactly how many candidates are evaluated; a grid's default (and most) is its size.
    `greedy_soup` searches no recipe: it soups `ingredients` greedily, `speculate` candidates evaluated at once
    (default: as many as run at once), `strict` as `splice soup --greedy --strict`."""

    model_config = ConfigDict(extra="forbid")
    method: SearchMethod
    seed: StrictInt = 0
    trials: PositiveInt | None = None
    ingredients: Annotated[list[str], Field(min_length=1)] | None = None
    speculate: PositiveInt | None = None
    strict: bool = False

    @model_validator(mode="after")
    def _fits_method(self) -> SearchSettings:
        greedy = self.method == "greedy_soup"
        if greedy and self.ingredients is None:
            raise ValueError("a greedy_soup search needs `ingredients` (the models to soup)")
        if greedy and self.trials is not None:
            raise ValueError("a greedy_soup's evaluations follow from its ingredients: drop `trials`")
        for key, value in (("ingredients", self.ingredients), ("speculate", self.speculate), ("strict", self.strict)):
            if not greedy and value:
                raise ValueError(f"`{key}` applies only to method greedy_soup")
        return self


class Evaluation(BaseModel):
    """`evaluate:`: the MODULE:FUNCTION (or path/to/file.py:FUNCTION, relative to the sweep file) scoring a
    candidate (`score(state)` or `score(state, model_dir)`, as `splice soup --greedy --eval` takes it), `args`
    passed to it unchanged as keywords, and whether a higher score is better."""

    model_config = ConfigDict(extra="forbid")
    hook: str
    args: Annotated[dict[str, Any], Bounded] = {}
    direction: Literal["maximize", "minimize"] = "maximize"
    timeout: Annotated[float, Field(gt=0, allow_inf_nan=False)] = CANDIDATE_TIMEOUT


class SweepFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    recipe: str | dict[str, Any] | None = None
    search: SearchSettings
    evaluate: Evaluation
    keep: Literal["best", "all", "none"] = "best"
    out: str | None = None
    push: PushSettings | None = None


@dataclass(frozen=True)
class Sweep:
    """A sweep file read and checked: the recipe as written (marks in place), its searched parameters, one filled
    recipe that validated, and the exact number of trials."""

    source: str
    file: SweepFile
    recipe: dict[str, Any]  # empty for a greedy soup
    parameters: list[SearchParameter]
    example: Recipe | None  # None for a greedy soup
    trials: int  # a greedy soup: its ingredients
    hook: str  # as the evaluation loads it (a file path made absolute)
    out: str | None
    ingredients: list[str]  # a greedy soup's models, as written
    hook_function: Callable  # the hook as imported when the file was read
    port: PortSpec | None = None  # a port's scale searched: the port with the marks' first values

    @property
    def kind(self) -> Literal["merge", "port", "greedy_soup"]:
        if self.method == "greedy_soup":
            return "greedy_soup"
        return "port" if self.port is not None else "merge"

    @property
    def method(self) -> SearchMethod:
        return self.file.search.method

    @property
    def push_base(self) -> str | None:
        """The model a pushed patch is made against: `push.base`, else the recipe's base_model."""
        push = self.file.push
        if push is None:
            return None
        if push.base is not None:
            return push.base
        if self.port is not None:
            return self.port.to
        return self.example.base_model if self.example is not None else None

    @property
    def inputs(self) -> list[str]:
        """Every model the sweep reads (an output must not overlap one)."""
        if self.port is not None:
            return self.port.inputs
        return list(self.ingredients) if self.example is None else self.example.read_models()


def load_sweep(path: str | os.PathLike) -> Sweep:
    """The sweep file at `path`, every entry checked; a one-line error naming the file and the entry otherwise."""
    path = Path(path)
    file = validated_yaml(path, SweepFile, "sweep", "a sweep is a mapping (recipe, search, evaluate, ...)", SpliceError)
    source = str(path)
    hook = hook_beside(path, file.evaluate.hook)
    function = load_callable(hook, option=f"{source}: evaluate.hook")  # a hook that does not import fails here
    out = beside(path, file.out) if file.out is not None else None
    if file.push is not None and file.keep == "none":
        raise SpliceError(f"{source}: push: the best model is pushed once written; `keep: none` writes none")
    if file.search.method == "greedy_soup":
        if file.recipe is not None:
            raise SpliceError(f"{source}: recipe: a greedy_soup search soups its `search.ingredients`; drop `recipe`")
        ingredients = list(file.search.ingredients or [])
        repeated = sorted({i for i in ingredients if ingredients.count(i) > 1})
        if repeated:
            raise SpliceError(f"{source}: search.ingredients: {repeated[0]} is listed twice")
        return Sweep(source, file, {}, [], None, len(ingredients), hook, out, ingredients, function)
    if file.recipe is None:
        raise SpliceError(f"{source}: recipe: say which recipe to search (a path beside the sweep file, or inline)")
    recipe = _recipe_of(path, file.recipe)
    kind = subject_kind(recipe)
    if kind == "port":
        parameters, port = check_marks(recipe, source, port_spec)
        trials = _trials(file.search, parameters, source)
        return Sweep(source, file, recipe, parameters, None, trials, hook, out, [], function, port)
    if kind == "soup":
        recipe = soup_as_recipe(recipe, source)
    parameters, example = check_space(recipe, source)
    trials = _trials(file.search, parameters, source)
    return Sweep(source, file, recipe, parameters, example, trials, hook, out, [], function)


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
