"""Merge recipes: YAML validated with pydantic; a mergekit config is accepted as it is.

```yaml
merge_method: ties
base_model: ./base
models:
  - model: ./math
    parameters: {weight: 0.5, density: [0.3, 0.7]}   # a list is a gradient across layers
  - model: ./code
    parameters:
      density: [{filter: mlp, value: 0.5}, {value: 0.8}]  # first filter that is a substring of the tensor name
parameters: {lambda: 1.0}
dtype: bfloat16
```
Per-model parameters take precedence over global ones, as in mergekit.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from typing_extensions import Unpack

from splice.arch.layers import layer_positions
from splice.errors import RecipeError
from splice.merge.kernels import method_kernel
from splice.merge.methods import BasePolicy, ParameterRule, ParameterScope, check_ranges, coerce_parameter, method_rules
from splice.merge.tokenizer import TokenizerRequest, TokenizerSection, check_tokenizer_settings, prepare_inputs
from splice.options import RunKeywords, RunOptions, run_options
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.device import parse_dtype
from splice.tensors.stream import (
    Kernel,
    OutputExtras,
    StreamItem,
    StreamReport,
    open_all,
    plan_same_name,
    run_stream,
    stream_to_memory,
)
from splice.tensors.writer import ensure_output_free
from splice.values import Bounded, YamlDocument, one_line, read_yaml, unknown_key

Scalar = bool | int | float | str


class Conditional(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Scalar | list[Scalar]


# every float finite: YAML's .nan / .inf are refused
Setting = Annotated[Scalar | list[Scalar] | list[Conditional] | Conditional, Bounded]


class InputModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, Setting] = {}


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    merge_method: str
    models: list[InputModel]
    base_model: str | None = None
    parameters: dict[str, Setting] = {}
    dtype: str | None = None
    out_dtype: str | None = None
    # the output's tokenizer (splice.merge.tokenizer): `base`, `union` or a model; or the `tokenizer:` section
    tokenizer_source: str | None = None
    tokenizer: TokenizerSection | None = None
    chat_template: str | None = None
    name: str | None = None

    def side_files_source(self) -> str:
        """The input whose config and tokenizer the output gets: the base, or the first model without one."""
        locations, base_index = self.inputs()
        return locations[base_index if base_index is not None else 0]

    def inputs(self) -> tuple[list[str], int | None]:
        """Input model locations in order (the base appended if not listed) and the base's index.

        A method that ignores the base (linear, passthrough) merges only the listed models.
        """
        locations = []
        for entry in self.models:
            if entry.model not in locations:
                locations.append(entry.model)
        if self.base_model is None or method_rules(self.merge_method).base is BasePolicy.ignored:
            return locations, None
        if self.base_model not in locations:
            locations.append(self.base_model)
        return locations, locations.index(self.base_model)


# mergekit config keys splice does not implement yet, refused with what to do instead of a schema error
NOT_SUPPORTED = {
    "slices": "splice merges whole models; slices are not supported yet: list the models under models:",
    "modules": "splice merges whole models; modules are not supported yet: list the models under models:",
}


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading `1e-5` as a number, as mergekit does (YAML 1.1 wants `1.0e-5`)."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_recipe(path: str | os.PathLike) -> Recipe:
    document = read_recipe_document(path)
    return parse_recipe(document.data, str(path), document.key_lines)


def read_recipe_document(path: str | os.PathLike) -> YamlDocument:
    """A recipe file's YAML, read as mergekit reads it, not yet validated (a sweep marks values in it first)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    try:
        return read_yaml(path, _RecipeLoader)
    except ValueError as exc:
        raise RecipeError(str(exc)) from None


def parse_recipe(data: Any, source: str = "recipe", key_lines: dict[str, int] | None = None) -> Recipe:
    """A recipe validated; `key_lines` (each top-level key's line in the file) places a mistyped key."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping with merge_method and models")
    for key, why in NOT_SUPPORTED.items():
        if key in data:
            raise RecipeError(f"{source}: {key}: {why}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        mistyped = unknown_key(exc, Recipe.model_fields, source, key_lines)
        raise RecipeError(mistyped or f"{source}: {one_line(exc, 'recipe')}") from None
    validate_recipe(recipe, source)
    return recipe


def validate_recipe(recipe: Recipe, source: str = "recipe") -> None:
    """Method, parameter names, required values, base and input counts: all checked before any I/O."""
    try:
        rules = method_rules(recipe.merge_method)
    except RecipeError as exc:
        raise RecipeError(f"{source}: {exc}") from None
    method = recipe.merge_method
    known = ", ".join(rules.parameters) or "none"
    for owner, settings in [("parameters", recipe.parameters)] + [
        (f"models[{i}] ({m.model})", m.parameters) for i, m in enumerate(recipe.models)
    ]:
        for name in settings:
            if name not in rules.parameters:
                raise RecipeError(f"{source}: {owner}: unknown parameter {name!r} for {method} (known: {known})")
    if not recipe.models:
        raise RecipeError(f"{source}: models is empty; list the models to merge")
    locations, base_index = recipe.inputs()
    if rules.base is BasePolicy.required and base_index is None:
        raise RecipeError(f"{source}: {method} needs base_model")
    if rules.base is BasePolicy.forbidden and base_index is not None:
        raise RecipeError(f"{source}: {method} takes no base_model")
    counted = len(locations)
    if counted < rules.min_inputs or (rules.max_inputs is not None and counted > rules.max_inputs):
        at_most = f" and at most {rules.max_inputs}" if rules.max_inputs else ""
        wanted = (
            f"exactly {rules.min_inputs}"
            if rules.max_inputs == rules.min_inputs
            else f"at least {rules.min_inputs}{at_most}"
        )
        raise RecipeError(f"{source}: {method} takes {wanted} models, got {counted}")
    for rule in rules.parameters.values():
        if not rule.required:
            continue
        if rule.scope is ParameterScope.shared:
            if rule.name not in recipe.parameters:
                raise RecipeError(f"{source}: {method} needs parameter {rule.name!r} under parameters")
            continue
        for entry in recipe.models:
            if rule.scope is ParameterScope.non_base and entry.model == recipe.base_model:
                continue
            if rule.name not in entry.parameters and rule.name not in recipe.parameters:
                raise RecipeError(f"{source}: {method} needs parameter {rule.name!r} for model {entry.model}")
    try:
        check_tokenizer_settings(recipe.tokenizer_source, recipe.tokenizer, recipe.chat_template, locations)
    except RecipeError as exc:
        raise RecipeError(f"{source}: {exc}") from None
    for field in ("dtype", "out_dtype"):
        try:
            parse_dtype(getattr(recipe, field))
        except Exception as exc:
            raise RecipeError(f"{source}: {field}: {exc}") from None


def evaluate_setting(setting: Any, tensor_name: str, t: float, read: Callable[[Any], Any] = lambda v: v) -> Any:
    """A scalar, a gradient interpolated at t, or the first conditional whose filter is in the name. Each scalar is
    `read` first (as the parameter's type: mergekit's order, so quoted numbers are gradient endpoints too); numeric
    endpoints interpolate, booleans and strings select."""
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(s, Conditional) for s in setting):
            for condition in setting:
                if condition.filter in (None, "*") or condition.filter in tensor_name:
                    return evaluate_setting(condition.value, tensor_name, t, read)
            return None
        values = [read(s) for s in setting]
        if all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in values):
            scaled = t * (len(values) - 1)
            low = int(scaled)
            high = min(len(values) - 1, low + 1)
            fraction = scaled - low
            return (1 - fraction) * values[low] + fraction * values[high]
        return values[int(t * (len(values) - 1))]
    return read(setting)


class ParameterResolver:
    """Resolves every parameter of a method for one output tensor, per input where the method says so."""

    def __init__(self, recipe: Recipe, tensor_names: Sequence[str]):
        self.recipe = recipe
        self.rules = method_rules(recipe.merge_method)
        self.locations, self.base_index = recipe.inputs()
        self.position = layer_positions(tensor_names)
        self.per_model = {m.model: m.parameters for m in recipe.models}

    def _value(self, rule: ParameterRule, tensor_name: str, t: float, model: str | None) -> Any:
        for source in ((self.per_model.get(model, {}) if model else {}), self.recipe.parameters):
            if rule.name in source:
                value = evaluate_setting(source[rule.name], tensor_name, t, partial(self._read, rule))
                if value is not None:  # each scalar read as the rule's type; a gradient's point is not read again
                    return value
        if rule.required:
            raise RecipeError(
                f"{self.recipe.merge_method}: no value of {rule.name!r} applies to tensor "
                f"{tensor_name} for {model or 'the merge'}"
            )
        return rule.default

    def _read(self, rule: ParameterRule, value: Any) -> Any:
        return None if value is None else coerce_parameter(self.recipe.merge_method, rule, value)

    def __call__(self, tensor_name: str) -> dict[str, Any]:
        t = self.position(tensor_name)
        resolved: dict[str, Any] = {}
        for rule in self.rules.parameters.values():
            if rule.scope is ParameterScope.shared:
                resolved[rule.name] = self._value(rule, tensor_name, t, None)
                continue
            resolved[rule.name] = {
                i: self._value(rule, tensor_name, t, location)
                for i, location in enumerate(self.locations)
                if not (rule.scope is ParameterScope.non_base and i == self.base_index)
            }
        return resolved


ModelOpener = Callable[[Sequence[str], "dict | None"], list[Checkpoint]]
"""(model references as a recipe writes them, storage options) -> their checkpoints, in order."""


def merge(
    recipe: Recipe | str | os.PathLike,
    out: str | os.PathLike,
    *,
    prefer_own_kernels: bool = True,
    seed: int | None = None,
    open_models: ModelOpener = open_all,
    run: RunOptions | None = None,
    **run_keywords: Unpack[RunKeywords],
) -> StreamReport:
    """Run a recipe (a Recipe, or the path of a YAML file) and write the merged model to `out`.

    `seed` seeds torch's generator first, for the random methods (dare_ties, dare_linear, della). `open_models`
    opens the recipe's model references (default: each a directory or fsspec URL). `run` (or its fields as
    keywords: device, shard_size, force, progress, storage_options, ...) says how the run runs.
    """
    run = run_options(run, run_keywords, "merge")
    recipe_file = [] if isinstance(recipe, Recipe) else [recipe]
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    locations, _ = recipe.inputs()
    ensure_output_free(out, run.force, protected=[*locations, *recipe_file])
    planned = _planned(recipe, run, prefer_own_kernels, seed, open_models)
    return run_stream(
        planned.plan,
        planned.kernel,
        out,
        side_files_from=planned.side_source,
        run=run,
        out_dtype=planned.out_dtype,
        extras=replace(planned.extras, metadata={"splice_merge_method": recipe.merge_method}),
        description=f"{recipe.merge_method} merge",
    )


def merged_state(
    recipe: Recipe,
    *,
    prefer_own_kernels: bool = True,
    seed: int | None = None,
    open_models: ModelOpener = open_all,
    run: RunOptions | None = None,
) -> dict[str, torch.Tensor]:
    """The model `merge(recipe, ...)` would write, tensor for tensor, held in memory instead (stored names, output
    dtypes): what a sweep hands a candidate's evaluation without writing it."""
    run = run or RunOptions()
    planned = _planned(recipe, run, prefer_own_kernels, seed, open_models)
    return stream_to_memory(planned.plan, planned.kernel, run=run, description=f"{recipe.merge_method} merge")


@dataclass(frozen=True)
class _Planned:
    plan: list[StreamItem]
    kernel: Kernel
    side_source: Checkpoint
    out_dtype: torch.dtype | None
    extras: OutputExtras


def _planned(
    recipe: Recipe, run: RunOptions, prefer_own_kernels: bool, seed: int | None, open_models: ModelOpener
) -> _Planned:
    """A recipe's inputs opened, its plan and kernel, every tensor's parameters checked before any tensor is read;
    torch's generator seeded last, for the random methods."""
    locations, base_index = recipe.inputs()
    out_dtype = parse_dtype(recipe.out_dtype or recipe.dtype)
    checkpoints = open_models(locations, run.storage_options)
    prepared = prepare_inputs(
        TokenizerRequest.of(recipe.tokenizer_source, recipe.tokenizer, recipe.chat_template),
        locations,
        checkpoints,
        recipe.base_model,
        recipe.side_files_source(),
        lambda reference: open_models([reference], run.storage_options)[0],
    )
    checkpoints = prepared.checkpoints
    plan = plan_same_name(checkpoints, out_dtype)
    resolver = ParameterResolver(recipe, [item.output.name for item in plan])
    for item in plan:
        check_ranges(recipe.merge_method, resolver(item.output.name), item.output.name)
    kernel = method_kernel(recipe.merge_method, resolver, base_index, prefer_own=prefer_own_kernels)
    side_source = checkpoints[locations.index(recipe.side_files_source())]
    if seed is not None:
        torch.manual_seed(seed)
    return _Planned(plan, kernel, side_source, out_dtype, prepared.extras)
