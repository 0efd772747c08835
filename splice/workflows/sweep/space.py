"""A sweep's search space: parameters marked in place in a recipe (`density: {search: uniform, low: 0.1, high: 0.9}`),
found at any depth the recipe allows (global, per model, a gradient's entries, a conditional's value), as Optuna
distributions or a grid's values, and the recipe filled in with one candidate's values.

A mark is a mapping whose `search` key names the kind: `uniform` (low, high, optional step), `log_uniform` (low,
high), `int` (low, high, optional step) or `choice` (values). Filling puts a plain value where each mark was; the
filled recipe is an ordinary recipe (`check_space` validates one before any trial runs, so an unknown parameter
path is refused up front).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, cast

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import Trial
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from splice.errors import RecipeError
from splice.merge.recipe import Recipe, parse_recipe
from splice.values import FiniteFloat, finite, one_line

SEARCH_KEY = "search"
T = TypeVar("T")
MAX_GRID = 100_000  # a grid larger than this is a mistake, not a sweep

Value = bool | int | float | str
MarkPath = tuple[str | int, ...]


class _Mark(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def snap(self, value: Value) -> Value:
        """A sampled value as a candidate's recipe holds it."""
        return value


class _Range(_Mark):
    low: float  # each range narrows these
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> _Range:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high})")
        return self


class Uniform(_Range):
    search: Literal["uniform"]
    low: FiniteFloat
    high: FiniteFloat
    step: Annotated[FiniteFloat, Field(gt=0)] | None = None

    def distribution(self) -> BaseDistribution:
        return FloatDistribution(self.low, self.high, step=self.step)

    def suggest(self, trial: Trial, name: str) -> Value:
        return trial.suggest_float(name, self.low, self.high, step=self.step)

    def grid(self) -> list[Value]:
        if self.step is None:
            raise ValueError("a grid over uniform needs `step` (or use choice)")
        count = math.floor((self.high - self.low) / self.step + 1e-9) + 1
        return [self._stepped(i) for i in range(count)]

    def snap(self, value: Value) -> Value:
        """A sampled value as the grid writes it (Optuna's stepped floats carry rounding: 0.6000000000000001)."""
        if self.step is None:
            return value
        return self._stepped(round((float(value) - self.low) / self.step))

    def _stepped(self, index: int) -> float:
        assert self.step is not None
        return round(self.low + index * self.step, 12)


class LogUniform(_Range):
    search: Literal["log_uniform"]
    low: Annotated[FiniteFloat, Field(gt=0)]
    high: Annotated[FiniteFloat, Field(gt=0)]

    def distribution(self) -> BaseDistribution:
        return FloatDistribution(self.low, self.high, log=True)

    def suggest(self, trial: Trial, name: str) -> Value:
        return trial.suggest_float(name, self.low, self.high, log=True)

    def grid(self) -> list[Value]:
        raise ValueError("a grid cannot enumerate log_uniform (use choice)")


class IntRange(_Range):
    search: Literal["int"]
    low: StrictInt
    high: StrictInt
    step: Annotated[StrictInt, Field(gt=0)] = 1

    def distribution(self) -> BaseDistribution:
        return IntDistribution(self.low, self.high, step=self.step)

    def suggest(self, trial: Trial, name: str) -> Value:
        return trial.suggest_int(name, self.low, self.high, step=self.step)

    def grid(self) -> list[Value]:
        return list(range(self.low, self.high + 1, self.step))


class Choice(_Mark):
    search: Literal["choice"]
    values: Annotated[list[Annotated[Value, AfterValidator(finite)]], Field(min_length=1)]

    def distribution(self) -> BaseDistribution:
        return CategoricalDistribution(self.values)

    def suggest(self, trial: Trial, name: str) -> Value:
        return cast(Value, trial.suggest_categorical(name, self.values))  # one of `values`, none of them None

    def grid(self) -> list[Value]:
        return list(self.values)


SearchSpec = Annotated[Uniform | LogUniform | IntRange | Choice, Field(discriminator=SEARCH_KEY)]
_SPEC = TypeAdapter(SearchSpec)


@dataclass(frozen=True)
class SearchParameter:
    """One searched value: where it sits in the recipe, and what it may be."""

    path: MarkPath
    spec: Uniform | LogUniform | IntRange | Choice

    @property
    def name(self) -> str:
        """The path as a user reads it: `parameters.density`, `models[1].parameters.weight`."""
        return path_name(self.path)

    def distribution(self) -> BaseDistribution:
        return self.spec.distribution()

    def suggest(self, trial: Trial) -> Value:
        """This parameter's value for `trial` (Optuna's suggest API, for a study run by `optimize`)."""
        return self.value(self.spec.suggest(trial, self.name))

    def value(self, sampled: Value) -> Value:
        """What a candidate's recipe holds for a value Optuna sampled."""
        return self.spec.snap(sampled)

    def grid(self) -> list[Value]:
        try:
            return self.spec.grid()
        except ValueError as exc:
            raise RecipeError(f"{self.name}: {exc}") from None

    @property
    def first(self) -> Value:
        """A value the parameter may take (what `check_space` validates the recipe with)."""
        return self.spec.values[0] if isinstance(self.spec, Choice) else self.spec.low


def path_name(path: MarkPath) -> str:
    text = ""
    for step in path:
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else step)
    return text


def _walk(node: Any, path: MarkPath) -> Iterator[tuple[MarkPath, Any]]:
    """Every mark under `node` (a mapping with the search key), with its path; nothing inside a mark."""
    if isinstance(node, Mapping):
        if SEARCH_KEY in node:
            yield path, node
            return
        for key, child in node.items():
            yield from _walk(child, (*path, str(key)))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield from _walk(child, (*path, index))


def search_parameters(recipe: Mapping[str, Any], source: str = "sweep") -> list[SearchParameter]:
    """The recipe's marked parameters in document order; a malformed mark is a one-line error naming its path."""
    found = []
    for path, mark in _walk(recipe, ()):
        try:
            found.append(SearchParameter(path, _SPEC.validate_python(mark)))
        except ValidationError as exc:
            raise RecipeError(f"{source}: {path_name(path)}: {one_line(exc, 'search')}") from None
    return found


def fill(recipe: Mapping[str, Any], values: Mapping[str, Value], parameters: Sequence[SearchParameter]) -> dict:
    """A copy of `recipe` with each parameter's mark replaced by its value in `values` (by name)."""
    filled = copy.deepcopy(dict(recipe))
    for parameter in parameters:
        node: Any = filled
        for step in parameter.path[:-1]:
            node = node[step]
        node[parameter.path[-1]] = values[parameter.name]
    return filled


def check_space(recipe: Mapping[str, Any], source: str = "sweep") -> tuple[list[SearchParameter], Recipe]:
    """The marked parameters, once the recipe filled with a value of each validates as a merge recipe."""
    return check_marks(recipe, source, parse_recipe)


def check_marks(
    recipe: Mapping[str, Any], source: str, validate: Callable[[dict, str], T]
) -> tuple[list[SearchParameter], T]:
    """The marked parameters, once the document filled with a value of each validates (`validate(filled, source)`):
    an unknown parameter, or a mark where the document takes no value, is refused here, before any trial."""
    parameters = search_parameters(recipe, source)
    if not parameters:
        raise RecipeError(
            f"{source}: the recipe marks nothing to search (mark a value as {{search: uniform, "
            "low: 0.1, high: 0.9}, or choice, int, log_uniform)"
        )
    sample = fill(recipe, {p.name: p.first for p in parameters}, parameters)
    return parameters, validate(sample, f"{source} (recipe)")


def grid_size(parameters: Sequence[SearchParameter]) -> int:
    """How many candidates a full grid over `parameters` has (refused above MAX_GRID)."""
    size = math.prod(len(p.grid()) for p in parameters)
    if size > MAX_GRID:
        raise RecipeError(
            f"the grid has {size:,} candidates (more than {MAX_GRID:,}): narrow it, or use random, "
            "tpe or cmaes with a budget"
        )
    return size
