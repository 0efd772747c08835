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

Instead of `models:`, `slices:` stacks layer ranges into a new model (splice.merge.slices): each slice lists
`sources` (`model`, `layer_range: [start, end]` with an exclusive end, `parameters`) and may give `base_model` and
`parameters`; a parameter is taken from the source, else the slice, else the global `parameters`, as in mergekit.

Or `modules:` (splice.merge.modules) gives each module of a model (mergekit's names: `text_decoder`, `vision_tower`,
`multi_modal_projector`, ...) its own `models:` or `slices:` and `parameters`; a parameter is taken from the model
or source, else the slice, else the module, else the global `parameters`, as in mergekit. `merge_method` and
`base_model` are the recipe's.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from typing_extensions import Unpack

from splice.arch.layers import layer_positions
from splice.errors import RecipeError
from splice.merge.kernels import TensorParameters, method_kernel
from splice.merge.localize_stitch import METHOD as STITCH
from splice.merge.localize_stitch import StitchPlan, StitchReport, TaskRegion, plan_stitch
from splice.merge.methods import (
    BasePolicy,
    MethodRules,
    ParameterRule,
    ParameterScope,
    check_ranges,
    coerce_parameter,
    method_rules,
)
from splice.merge.modules import model_modules
from splice.merge.reference_syntax import parse_reference
from splice.merge.references import ModelReference, ModelReferenceField
from splice.merge.slices import LayerRange, LayerStack, SlicedTensor, plan_slices
from splice.merge.stats.datamerge import DATA_METHODS, DataMergeReport, StatsOpener, StoredStats, plan_data_merge
from splice.merge.stats.plusplus import METHOD as PLUSPLUS
from splice.merge.stats.plusplus import WalkRequest, regmean_plusplus_state, write_regmean_plusplus
from splice.merge.stats.solve import check_alpha
from splice.merge.tokenizer import (
    TokenizerRequest,
    TokenizerSection,
    check_tokenizer_settings,
    prepare_inputs,
    tokenizer_models,
)
from splice.options import RunKeywords, RunOptions, run_options
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.device import parse_dtype
from splice.tensors.stream import (
    Kernel,
    OutputExtras,
    Precision,
    StreamItem,
    StreamReport,
    open_all,
    plan_same_name,
    run_stream,
    stream_to_memory,
    write_side_files,
)
from splice.tensors.writer import ensure_output_free
from splice.values import Bounded, YamlDocument, one_line, read_yaml, read_yaml_documents, unknown_key

Scalar = bool | int | float | str


class Conditional(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Scalar | list[Scalar]


# every float finite: YAML's .nan / .inf are refused
Setting = Annotated[Scalar | list[Scalar] | list[Conditional] | Conditional, Bounded]


class InputModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: ModelReference
    parameters: dict[str, Setting] = {}
    # regmean / fisher: the model's statistics (a `splice stats collect` directory or URL, or a registry ref)
    stats: str | None = None
    # regmean_plusplus: MODULE:FUNCTION or file.py:FUNCTION giving a batch of the model's task inputs
    data: str | None = None
    # localize_stitch: the model's region, a mask patch made on base_model (a directory or URL, or a registry ref)
    mask: str | None = None


class SliceSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: ModelReference
    layer_range: tuple[int, int]  # [start, end): mergekit's exclusive end
    parameters: dict[str, Setting] = {}


class OutputSlice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource]
    base_model: ModelReference | None = None
    parameters: dict[str, Setting] = {}

    def base(self, recipe: Recipe) -> str | None:
        """The slice's base model for the recipe's method: its own, else the recipe's; None where the method
        ignores the base."""
        if method_rules(recipe.merge_method).base is BasePolicy.ignored:
            return None
        return self.base_model or recipe.base_model


class ModuleSection(BaseModel):
    """One module's inputs (mergekit's `modules: {NAME: ...}`): its `models:` or its `slices:`, and its parameters."""

    model_config = ConfigDict(extra="forbid")
    models: list[InputModel] = []
    slices: list[OutputSlice] | None = None
    parameters: dict[str, Setting] = {}

    @model_validator(mode="after")
    def _one_input_form(self) -> ModuleSection:
        if bool(self.models) == bool(self.slices):  # parse_recipe says so first, naming the module
            raise ValueError("a module lists its inputs under exactly one of models: or slices:")
        return self


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    merge_method: str
    models: list[InputModel] = []
    slices: list[OutputSlice] | None = None
    modules: dict[str, ModuleSection] | None = None
    base_model: ModelReference | None = None
    parameters: dict[str, Setting] = {}
    dtype: str | None = None
    out_dtype: str | None = None
    # exact: inputs in fp32, one rounding to the output dtype; mergekit: computed in `dtype` (or as stored) by
    # mergekit's kernels, giving mergekit-yaml's output bit for bit
    compute: Literal["exact", "mergekit"] = "exact"
    # the output's tokenizer (splice.merge.tokenizer): `base`, `union` or a model; or the `tokenizer:` section
    tokenizer_source: Annotated[str | None, ModelReferenceField(frozenset({"base", "union"}))] = None
    tokenizer: TokenizerSection | None = None
    chat_template: str | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _one_input_form(self) -> Recipe:
        if sum(map(bool, (self.models, self.slices, self.modules))) > 1:  # parse_recipe says so first, from a file
            raise ValueError("models, slices and modules cannot be mixed: list the inputs under exactly one of them")
        return self

    def module_recipes(self) -> dict[str, Recipe]:
        """Each module of a `modules:` recipe as a recipe of its own (its models or slices, the recipe's method and
        base), for checks: its parameters are the module's over the global ones."""
        return {
            name: self.model_copy(
                update={
                    "models": section.models,
                    "slices": section.slices,
                    "modules": None,
                    "parameters": {**self.parameters, **section.parameters},
                }
            )
            for name, section in (self.modules or {}).items()
        }

    def side_files_source(self) -> str:
        """The input whose config and tokenizer the output gets: the base, or the first model without one."""
        if self.slices:  # mergekit's: the base model even where the method ignores it
            return self.base_model or self.slices[0].sources[0].model
        if self.modules:
            return self.base_model or self.inputs()[0][0]
        locations, base_index = self.inputs()
        return locations[base_index if base_index is not None else 0]

    def read_models(self) -> list[str]:
        """Every model the recipe reads: its inputs, the models its tokenizer settings name, and the base where a
        tokenizer setting reads it though the method ignores it. What an output may not overlap, and what a stage's
        key and a model card digest."""
        read = [*self.inputs()[0], *tokenizer_models(self.tokenizer_source, self.tokenizer)]
        if self.base_model is not None and (self.tokenizer_source is not None or self.tokenizer is not None):
            read.append(self.base_model)
        return list(dict.fromkeys(read))

    def read_stats(self) -> list[str]:
        """The statistics the recipe's models give (`stats:`), in order."""
        return list(dict.fromkeys(entry.stats for entry in self.models if entry.stats is not None))

    def read_masks(self) -> list[str]:
        """The mask patches the recipe's models give (`mask:`), in order."""
        return list(dict.fromkeys(entry.mask for entry in self.models if entry.mask is not None))

    def read_stored(self) -> list[str]:
        """Every stored artifact the recipe reads besides its models (statistics, mask patches): what an output may
        not overlap, and what a card and a stage's key digest."""
        return list(dict.fromkeys([*self.read_stats(), *self.read_masks()]))

    def inputs(self) -> tuple[list[str], int | None]:
        """Input model locations in order (the base appended if not listed) and the base's index.

        A method that ignores the base (linear, passthrough) merges only the listed models. With slices: every model
        the slices name, and the base model (whose config the output gets) if not among them. With modules: every
        model of every module, in order, and the base model.
        """
        if self.slices or self.modules:
            if self.modules:
                named = [m for recipe in self.module_recipes().values() for m in recipe.inputs()[0]]
            else:
                named = [source.model for s in self.slices or [] for source in s.sources]
                named += [s.base_model for s in self.slices or [] if s.base_model]
            locations = list(dict.fromkeys(named + ([self.base_model] if self.base_model else [])))
            base_index = None
            if self.base_model is not None and method_rules(self.merge_method).base is not BasePolicy.ignored:
                base_index = locations.index(self.base_model)
            return locations, base_index
        locations = []
        for entry in self.models:
            if entry.model not in locations:
                locations.append(entry.model)
        if self.base_model is None or method_rules(self.merge_method).base is BasePolicy.ignored:
            return locations, None
        if self.base_model not in locations:
            locations.append(self.base_model)
        return locations, locations.index(self.base_model)


# where a recipe lists its inputs; mergekit takes exactly one
INPUT_FORMS = ("models", "slices", "modules")

# keys of a slice that mergekit's schema accepts or that configs write, but that mergekit does not act on
SLICE_KEYS_IGNORED_BY_MERGEKIT = {
    "merge_method": "mergekit has no per-slice merge method (its slice schema drops the key, so mergekit-yaml runs "
    "the top-level merge_method); set merge_method at the top level, or merge in two recipes",
    "residual_weight": "mergekit reads residual_weight in a slice but never uses it; remove it",
}


# keys of a module section that configs write but mergekit's module schema drops (mergekit-yaml runs without them)
MODULE_KEYS_IGNORED_BY_MERGEKIT = {
    "merge_method": "mergekit has no per-module merge method (its module schema drops the key, so mergekit-yaml runs "
    "the top-level merge_method for every module); set merge_method at the top level, or merge in two recipes",
    "base_model": "mergekit has no per-module base model (its module schema drops the key); set base_model at the "
    "top level, or per slice in the module's slices:",
}


def _refuse_module_keys(modules: Any, source: str) -> None:
    """A module section's keys that mergekit would ignore, and its inputs under both or neither of its forms."""
    if not isinstance(modules, dict):
        return
    for name, entry in modules.items():
        if not isinstance(entry, dict):
            continue
        for key, why in MODULE_KEYS_IGNORED_BY_MERGEKIT.items():
            if key in entry:
                raise RecipeError(f"{source}: modules.{name}.{key}: {why}")
        if bool(entry.get("models")) == bool(entry.get("slices")):
            given = "both models: and slices:" if entry.get("models") else "neither models: nor slices:"
            raise RecipeError(
                f"{source}: modules.{name} gives {given}; a module lists its inputs under exactly one of them "
                "(as in mergekit)"
            )
        _refuse_slice_keys(entry.get("slices"), f"{source}: modules.{name}")


def _refuse_slice_keys(slices: Any, source: str) -> None:
    if not isinstance(slices, list):
        return
    for i, entry in enumerate(slices):
        for key, why in SLICE_KEYS_IGNORED_BY_MERGEKIT.items():
            if isinstance(entry, dict) and key in entry:
                raise RecipeError(f"{source}: slices[{i}].{key}: {why}")


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
    return _read_recipe_yaml(path, read_yaml)


def read_recipe_documents(path: str | os.PathLike) -> list[YamlDocument]:
    """Each `---`-separated document of a recipe file (a multi-stage recipe has several), read as mergekit reads it,
    not yet validated."""
    return _read_recipe_yaml(path, read_yaml_documents)


def _read_recipe_yaml(path: str | os.PathLike, reader: Callable[[Path, type[yaml.SafeLoader]], Any]) -> Any:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    try:
        return reader(path, _RecipeLoader)
    except ValueError as exc:
        raise RecipeError(str(exc)) from None


def parse_recipe(data: Any, source: str = "recipe", key_lines: dict[str, int] | None = None) -> Recipe:
    """A recipe validated; `key_lines` (each top-level key's line in the file) places a mistyped key."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping with merge_method and models")
    listed = [key for key in INPUT_FORMS if data.get(key)]
    if len(listed) > 1:
        raise RecipeError(
            f"{source}: {' and '.join(f'{key}:' for key in listed)} cannot be mixed: a recipe lists its inputs under "
            "exactly one of models:, slices: or modules: (as in mergekit)"
        )
    _refuse_slice_keys(data.get("slices"), source)
    _refuse_module_keys(data.get("modules"), source)
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
        method_rules(recipe.merge_method)
    except RecipeError as exc:
        raise RecipeError(f"{source}: {exc}") from None
    _check_parameter_names(recipe, source)
    _check_statistics(recipe, source)
    if recipe.modules == {}:
        raise RecipeError(f"{source}: modules is empty; give each module of the model a section with its models")
    if recipe.modules:
        for name, module in recipe.module_recipes().items():
            where = f"{source}: modules.{name}"
            _check_parameter_names(module, where)
            (_validate_slices if module.slices else _validate_models)(module, where)
    elif recipe.slices:
        _validate_slices(recipe, source)
    else:
        _validate_models(recipe, source)
    for location in recipe.inputs()[0]:
        try:
            if not os.path.exists(location):  # an existing path is that path, whatever it holds
                parse_reference(location)
        except RecipeError as exc:
            raise RecipeError(f"{source}: {exc}") from None
    try:
        check_tokenizer_settings(recipe.tokenizer_source, recipe.tokenizer, recipe.chat_template, recipe.inputs()[0])
    except RecipeError as exc:
        raise RecipeError(f"{source}: {exc}") from None
    for field in ("dtype", "out_dtype"):
        try:
            parse_dtype(getattr(recipe, field))
        except Exception as exc:
            raise RecipeError(f"{source}: {field}: {exc}") from None


def _check_parameter_names(recipe: Recipe, source: str) -> None:
    """Every parameter a recipe sets (globally, per model, per slice, per source) is one its method takes."""
    rules = method_rules(recipe.merge_method)
    method = recipe.merge_method
    known = ", ".join(rules.parameters) or "none"
    for owner, settings in [
        ("parameters", recipe.parameters),
        *((f"models[{i}] ({m.model})", m.parameters) for i, m in enumerate(recipe.models)),
        *((f"slices[{i}].parameters", s.parameters) for i, s in enumerate(recipe.slices or [])),
        *(
            (f"slices[{i}].sources[{j}] ({entry.model})", entry.parameters)
            for i, s in enumerate(recipe.slices or [])
            for j, entry in enumerate(s.sources)
        ),
    ]:
        for name in settings:
            if name not in rules.parameters:
                raise RecipeError(f"{source}: {owner}: unknown parameter {name!r} for {method} (known: {known})")


def _check_statistics(recipe: Recipe, source: str) -> None:
    """A data-dependent method merges the `models:` of one recipe, each giving its `stats:` (regmean, fisher), its
    `data:` (regmean_plusplus) or its `mask:` (localize_stitch); any of them on another method's model is a mistake,
    not something to ignore."""
    method = recipe.merge_method
    listed = [*recipe.models, *(m for section in (recipe.modules or {}).values() for m in section.models)]
    for key, readers in (("stats", list(DATA_METHODS)), ("data", [PLUSPLUS, STITCH]), ("mask", [STITCH])):
        given = next((entry for entry in listed if getattr(entry, key) is not None), None)
        if given is not None and method not in readers:
            raise RecipeError(
                f"{source}: model {given.model} gives {key}:, which only {' and '.join(readers)} read; remove it or "
                f"use merge_method: {readers[0]}"
            )
    if method not in DATA_METHODS and method not in (PLUSPLUS, STITCH):
        return
    if recipe.slices or recipe.modules:
        form = "slices:" if recipe.slices else "modules:"
        raise RecipeError(
            f"{source}: {method} merges the models: of a recipe, not {form}; list the models under models:"
        )
    if recipe.compute == "mergekit":
        raise RecipeError(f"{source}: compute: mergekit is for mergekit's methods; mergekit has no {method}")
    _check_each_model_once(recipe, source)
    if method == PLUSPLUS:
        _check_walk(recipe, source)
        return
    if method == STITCH:
        _check_stitch(recipe, source)
        return
    lacking = next((entry for entry in recipe.models if entry.stats is None), None)
    if lacking is not None:
        raise RecipeError(
            f"{source}: model {lacking.model} gives no stats:; {method} needs each model's "
            f"{DATA_METHODS[method]} statistics (collect them with `splice stats collect {lacking.model} --data "
            f"MODULE:FUNCTION --kind {DATA_METHODS[method]} --out DIR`)"
        )
    if recipe.parameters.get("fallback") == "base" and recipe.base_model is None:
        raise RecipeError(
            f"{source}: {method}: fallback: base takes tensors without statistics from base_model; give it"
        )


def _check_each_model_once(recipe: Recipe, source: str) -> None:
    """A data-dependent merge takes each model once, with its own statistics or data: a model listed again would be
    merged once, with one entry's statistics (or data) and the other's silently dropped. Its one values for the
    whole merge (alpha, epsilon, fallback, samples) are set under `parameters:`: a model's would be ignored."""
    listed = [entry.model for entry in recipe.models]
    again = next((model for i, model in enumerate(listed) if model in listed[:i]), None)
    if again is not None:
        given = {PLUSPLUS: "data", STITCH: "mask"}.get(recipe.merge_method, "statistics")
        raise RecipeError(
            f"{source}: model {again} is listed twice; {recipe.merge_method} merges each model once with its own "
            f"{given}: list it once (with {given} covering all its tasks)"
        )
    rules = method_rules(recipe.merge_method).parameters
    for entry in recipe.models:
        shared = next((name for name in entry.parameters if rules[name].scope is ParameterScope.shared), None)
        if shared is not None:
            raise RecipeError(
                f"{source}: model {entry.model}: {shared} is one value for the whole {recipe.merge_method} merge; "
                "set it under parameters:"
            )


def _check_walk(recipe: Recipe, source: str) -> None:
    """RegMean++ walks the whole model with one alpha and one weight per model, from each model's own data."""
    lacking = next((entry for entry in recipe.models if entry.data is None), None)
    if lacking is not None:
        raise RecipeError(
            f"{source}: model {lacking.model} gives no data:; {PLUSPLUS} runs each model's own task inputs through "
            "the merged layers (data: MODULE:FUNCTION returning a batch of them)"
        )
    if recipe.tokenizer_source is not None or recipe.tokenizer is not None:
        raise RecipeError(f"{source}: {PLUSPLUS} merges models of one vocabulary; leave out the tokenizer settings")
    for owner, settings in [("parameters", recipe.parameters), *((m.model, m.parameters) for m in recipe.models)]:
        for name, value in settings.items():
            if not isinstance(value, int | float):
                raise RecipeError(
                    f"{source}: {owner}: {PLUSPLUS} takes one value of {name!r} for the whole walk, not {value!r}"
                )


def _check_stitch(recipe: Recipe, source: str) -> None:
    """Localize-and-Stitch grafts each fine-tune's change on its own region (its `mask:`, or one learned from its
    `data:`) onto base_model; the parameters say how regions are learned, so they need a model with `data:`."""
    lacking = next((entry for entry in recipe.models if entry.mask is None and entry.data is None), None)
    if lacking is not None:
        raise RecipeError(
            f"{source}: model {lacking.model} gives no mask: and no data:; {STITCH} keeps each fine-tune's change on "
            f"its own region: give mask: DIR (`splice patch extract --base BASE --tuned {lacking.model} --kind mask "
            "--localize --data MODULE:FUNCTION --density 0.001 --out DIR`) or data: MODULE:FUNCTION to learn it here"
        )
    both = next((entry for entry in recipe.models if entry.mask is not None and entry.data is not None), None)
    if both is not None:
        raise RecipeError(
            f"{source}: model {both.model} gives both mask: and data:; give its region (mask:) or the data to learn "
            "it from (data:), not both"
        )
    if recipe.parameters and not any(entry.data is not None for entry in recipe.models):
        raise RecipeError(
            f"{source}: {STITCH}'s parameters ({', '.join(recipe.parameters)}) say how a region is learned from a "
            "model's data:, but every model gives its mask:; remove them"
        )
    if any(entry.model == recipe.base_model for entry in recipe.models):
        raise RecipeError(
            f"{source}: base_model {recipe.base_model} is listed under models:; {STITCH} stitches the fine-tunes' "
            "changes onto it: list only the fine-tunes, each with its mask:"
        )
    if recipe.tokenizer_source is not None or recipe.tokenizer is not None:
        raise RecipeError(
            f"{source}: {STITCH} merges models of one vocabulary (the masks cover their stored tensors); leave out "
            "the tokenizer settings"
        )


def _validate_models(recipe: Recipe, source: str) -> None:
    """A `models:` recipe's inputs: their count, the base, every required parameter."""
    rules = method_rules(recipe.merge_method)
    method = recipe.merge_method
    if not recipe.models:
        raise RecipeError(f"{source}: models is empty; list the models to merge")
    locations, base_index = recipe.inputs()
    if rules.base is BasePolicy.required and base_index is None:
        raise RecipeError(f"{source}: {method} needs base_model")
    if rules.base is BasePolicy.forbidden and base_index is not None:
        raise RecipeError(f"{source}: {method} takes no base_model")
    wanted = _unless_counted(rules, len(locations))
    if wanted:
        raise RecipeError(f"{source}: {method} takes {wanted} models, got {len(locations)}")
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


def _unless_counted(rules: MethodRules, counted: int) -> str | None:
    """How many inputs the method takes ("exactly 2", "at least 1"), or None when `counted` is allowed."""
    if counted >= rules.min_inputs and (rules.max_inputs is None or counted <= rules.max_inputs):
        return None
    if rules.max_inputs == rules.min_inputs:
        return f"exactly {rules.min_inputs}"
    return f"at least {rules.min_inputs}" + (f" and at most {rules.max_inputs}" if rules.max_inputs else "")


def _validate_slices(recipe: Recipe, source: str) -> None:
    """Every slice's sources: as many layers each (mergekit's end is exclusive), each model once, the base among
    them, as many as the method takes, every required parameter found (source, slice, then global)."""
    rules = method_rules(recipe.merge_method)
    method = recipe.merge_method
    for i, piece in enumerate(recipe.slices or []):
        where = f"{source}: slices[{i}]"
        if not piece.sources:
            raise RecipeError(f"{where}: sources is empty; list the models and layer ranges the slice takes")
        for j, taken in enumerate(piece.sources):
            start, end = taken.layer_range
            if not 0 <= start < end:
                raise RecipeError(
                    f"{where}.sources[{j}]: layer_range [{start}, {end}] takes no layers: it is [start, end] with "
                    "start >= 0 and an exclusive end, as in mergekit ([0, 4] takes layers 0 to 3)"
                )
        ranges = [LayerRange(source.model, *source.layer_range) for source in piece.sources]
        if len({taken.length for taken in ranges}) > 1:
            raise RecipeError(
                f"{where}: its sources take different numbers of layers: {', '.join(map(str, ranges))}; every "
                "source of a slice takes as many (a layer_range's end is exclusive)"
            )
        models = [taken.model for taken in piece.sources]
        twice = next((m for m in models if models.count(m) > 1), None)
        if twice is not None:
            raise RecipeError(f"{where}: {twice} is a source twice; a slice merges each model once, as in mergekit")
        base = piece.base(recipe)
        if base is not None and base not in models:
            raise RecipeError(
                f"{where}: base_model {base} is not among its sources; add it with a layer_range as long as the "
                "others (mergekit merges a slice's base from its sources)"
            )
        if rules.base is BasePolicy.required and base is None:
            raise RecipeError(f"{where}: {method} needs base_model (at the top level, or in the slice)")
        if rules.base is BasePolicy.forbidden and base is not None:
            raise RecipeError(f"{where}: {method} takes no base_model")
        wanted = _unless_counted(rules, len(models))
        if wanted:
            noun = "source" if wanted == "exactly 1" else "sources"
            raise RecipeError(f"{where}: {method} takes {wanted} {noun} per slice, got {len(models)}")
        for rule in rules.parameters.values():
            if not rule.required:
                continue
            if rule.scope is ParameterScope.shared:
                if rule.name not in piece.parameters and rule.name not in recipe.parameters:
                    raise RecipeError(f"{where}: {method} needs parameter {rule.name!r} (in the slice or globally)")
                continue
            for taken in piece.sources:
                if rule.scope is ParameterScope.non_base and taken.model == base:
                    continue
                if not any(rule.name in chain for chain in (taken.parameters, piece.parameters, recipe.parameters)):
                    raise RecipeError(f"{where}: {method} needs parameter {rule.name!r} for source {taken.model}")


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


class SettingChains:
    """Where the tensors of one merge (or of one slice) take their parameters: chains of settings, highest
    precedence first, one shared by the merge and one per input (mergekit's order: the source or model, the slice,
    the global parameters); the first setting that gives a value wins."""

    def __init__(
        self,
        method: str,
        shared: Sequence[Mapping[str, Any]],
        inputs: Sequence[tuple[str, Sequence[Mapping[str, Any]]]],
        base_index: int | None,
    ):
        self.method = method
        self.rules = method_rules(method)
        self.shared = shared
        self.inputs = inputs  # (model, its chain) per input, in the merge's order
        self.base_index = base_index

    def _value(
        self, rule: ParameterRule, chain: Sequence[Mapping[str, Any]], name: str, t: float, model: str | None
    ) -> Any:
        for settings in chain:
            if rule.name in settings:
                value = evaluate_setting(settings[rule.name], name, t, partial(self._read, rule))
                if value is not None:  # each scalar read as the rule's type; a gradient's point is not read again
                    return value
        if rule.required:
            raise RecipeError(
                f"{self.method}: no value of {rule.name!r} applies to tensor {name} for {model or 'the merge'}"
            )
        return rule.default

    def _read(self, rule: ParameterRule, value: Any) -> Any:
        return None if value is None else coerce_parameter(self.method, rule, value)

    def resolve(self, tensor_name: str, t: float, input_names: Sequence[str] | None = None) -> dict[str, Any]:
        """Every parameter for output tensor `tensor_name` at `t`; per-input filters match the input's own name
        (`input_names`, where a slice renames layers; as mergekit), shared ones the output's."""
        resolved: dict[str, Any] = {}
        for rule in self.rules.parameters.values():
            if rule.scope is ParameterScope.shared:
                resolved[rule.name] = self._value(rule, self.shared, tensor_name, t, None)
                continue
            resolved[rule.name] = {
                i: self._value(rule, chain, input_names[i] if input_names else tensor_name, t, model)
                for i, (model, chain) in enumerate(self.inputs)
                if not (rule.scope is ParameterScope.non_base and i == self.base_index)
            }
        return resolved


class ParameterResolver:
    """Resolves every parameter of a `models:` recipe's method for one output tensor, per input where the method
    says so: per-model settings, then global ones; t is the tensor's layer's depth among `tensor_names`."""

    def __init__(self, recipe: Recipe, tensor_names: Sequence[str]):
        locations, base_index = recipe.inputs()
        per_model = {m.model: m.parameters for m in recipe.models}
        chains = [(location, (per_model.get(location, {}), recipe.parameters)) for location in locations]
        self.chains = SettingChains(recipe.merge_method, (recipe.parameters,), chains, base_index)
        self.position = layer_positions(tensor_names)

    def __call__(self, tensor_name: str) -> dict[str, Any]:
        return self.chains.resolve(tensor_name, self.position(tensor_name))


ModelOpener = Callable[[Sequence[str], "dict | None"], list[Checkpoint]]
"""(model references as a recipe writes them, storage options) -> their checkpoints, in order."""

ModelLocator = Callable[[Sequence[str]], list[str]]
"""(model references as a recipe writes them) -> every location they read: what an output must not overlap."""

MaskOpener = Callable[[InputModel, Checkpoint, Checkpoint, dict[str, Any], RunOptions], TaskRegion]
"""(a localize_stitch model's recipe entry, the base's checkpoint, the model's checkpoint, the method's parameters
(how a region is learned from `data:`), how the run runs) -> the model's region: its `mask:`, refused unless it was
made on that base, or learned from its `data:` (`splice.workflows.regions.open_region`)."""


def merge(
    recipe: Recipe | str | os.PathLike,
    out: str | os.PathLike,
    *,
    prefer_own_kernels: bool = True,
    seed: int | None = None,
    open_models: ModelOpener = open_all,
    locate_models: ModelLocator = list,
    files: Mapping[str, bytes] | None = None,
    description: str | None = None,
    open_stats: StatsOpener | None = None,
    open_masks: MaskOpener | None = None,
    run: RunOptions | None = None,
    **run_keywords: Unpack[RunKeywords],
) -> StreamReport:
    """Run a recipe (a Recipe, or the path of a YAML file) and write the merged model to `out`.

    `seed` seeds torch's generator first, for the random methods (dare_ties, dare_linear, della). `open_models`
    opens the recipe's model references (default: each a directory or fsspec URL) and `locate_models` says what
    they read, which `out` must not overlap (default: the references themselves). `files` (name -> content) are
    written into the output with it (a model card); `description` is what progress is told it merges.
    `open_stats` opens a regmean or fisher recipe's statistics (`splice.workflows.stats.open_statistics`),
    `open_masks` a localize_stitch recipe's regions (`splice.workflows.regions.open_region`). `run` (or its fields as
    keywords: device, shard_size, force, progress, storage_options, ...) says how the run runs.
    """
    run = run_options(run, run_keywords, "merge")
    recipe_file = [] if isinstance(recipe, Recipe) else [recipe]
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    read = [*locate_models(recipe.read_models()), *recipe.read_stored(), *recipe_file]
    ensure_output_free(out, run.force, protected=read)
    extras = OutputExtras(metadata={"splice_merge_method": recipe.merge_method}, files=files)
    if recipe.merge_method == PLUSPLUS:
        request, side_source, out_dtype = _walk_request(recipe, run, open_models)
        return write_regmean_plusplus(
            request, out, side_files_from=side_source, run=run, out_dtype=out_dtype, extras=extras
        )
    planned = _planned(recipe, run, prefer_own_kernels, seed, open_models, open_stats, open_masks)
    streamed = run_stream(
        planned.plan,
        planned.kernel,
        out,
        side_files_from=planned.side_source,
        run=run,
        out_dtype=planned.out_dtype,
        extras=replace(
            planned.extras,
            metadata=extras.metadata,
            files={**(planned.extras.files or {}), **(files or {})},
        ),
        description=description or f"{recipe.merge_method} merge",
    )
    return replace(streamed, method_report=planned.method_report())


def merged_state(
    recipe: Recipe,
    *,
    prefer_own_kernels: bool = True,
    seed: int | None = None,
    open_models: ModelOpener = open_all,
    open_stats: StatsOpener | None = None,
    open_masks: MaskOpener | None = None,
    run: RunOptions | None = None,
) -> dict[str, torch.Tensor]:
    """The model `merge(recipe, ...)` would write, tensor for tensor, held in memory instead (stored names, output
    dtypes): what a sweep hands a candidate's evaluation without writing it."""
    model = merged_model(
        recipe,
        prefer_own_kernels=prefer_own_kernels,
        seed=seed,
        open_models=open_models,
        open_stats=open_stats,
        open_masks=open_masks,
        run=run,
    )
    return model.state


@dataclass(frozen=True)
class MergedModel:
    """A merge held in memory: its tensors, and what its config and side files would be once written."""

    state: dict[str, torch.Tensor]
    side_source: Checkpoint
    out_dtype: torch.dtype | None
    extras: OutputExtras  # its tokenizer files, its config's new depth and vocabulary size

    def write_side_files(self, directory: Path) -> list[str]:
        """The config (with the merge's new depth, vocabulary, dtype, ...), tokenizer and other side files `merge`
        would write, written to `directory`: a model directory for code that builds the model from its config."""
        return write_side_files(self.side_source, directory, self.out_dtype, self.extras)


def merged_model(
    recipe: Recipe,
    *,
    prefer_own_kernels: bool = True,
    seed: int | None = None,
    open_models: ModelOpener = open_all,
    open_stats: StatsOpener | None = None,
    open_masks: MaskOpener | None = None,
    run: RunOptions | None = None,
) -> MergedModel:
    """`merged_state`'s tensors, with the side files and config updates `merge` would write beside them."""
    run = run or RunOptions()
    if recipe.merge_method == PLUSPLUS:
        request, side_source, out_dtype = _walk_request(recipe, run, open_models)
        state = regmean_plusplus_state(request, run, out_dtype)
        return MergedModel(state, side_source, out_dtype, OutputExtras())
    planned = _planned(recipe, run, prefer_own_kernels, seed, open_models, open_stats, open_masks)
    state = stream_to_memory(planned.plan, planned.kernel, run=run, description=f"{recipe.merge_method} merge")
    return MergedModel(state, planned.side_source, planned.out_dtype, planned.extras)


def _no_report() -> None:
    """What a data-free method says of its run beyond the stream's report: nothing."""
    return None


@dataclass(frozen=True)
class _Planned:
    plan: list[StreamItem]
    kernel: Kernel
    side_source: Checkpoint
    out_dtype: torch.dtype | None
    extras: OutputExtras  # the output's tokenizer files, its config's new depth and vocabulary size
    # what the method says of its run, once the kernel has run (a data-dependent merge's rules and solves, a stitch's
    # regions)
    method_report: Callable[[], DataMergeReport | StitchReport | None] = _no_report


def in_mergekit_order(plan: list[StreamItem]) -> list[StreamItem]:
    """The plan in the order mergekit-yaml merges tensors (its scheduler's key is the tensor name), so a seeded
    random method (dare_ties, della, ...) draws its masks in mergekit's order: one seed, mergekit's output, also
    for sharded models, whose storage order differs. mergekit labels a merge by the largest of its inputs' stored
    names, which is the output's name unless slices renumber the layers."""
    return sorted(plan, key=lambda item: max(name for _, name in item.sources))


def _planned(
    recipe: Recipe,
    run: RunOptions,
    prefer_own_kernels: bool,
    seed: int | None,
    open_models: ModelOpener,
    open_stats: StatsOpener | None = None,
    open_masks: MaskOpener | None = None,
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
    _refuse_unmatched_alignment(recipe, [a is not b for a, b in zip(prepared.checkpoints, checkpoints)])
    stats = _opened_stats(recipe, locations, checkpoints, open_stats, run.storage_options)
    checkpoints = prepared.checkpoints
    side_source = checkpoints[locations.index(recipe.side_files_source())]
    config_updates: dict[str, Any] = {}
    method_report: Callable[[], DataMergeReport | StitchReport | None] = _no_report
    as_mergekit = recipe.compute == "mergekit"
    own_kernels = prefer_own_kernels and not as_mergekit
    if recipe.modules:
        plan, kernel, parameters_for, config_updates = _modular(
            recipe, dict(zip(locations, checkpoints)), side_source, out_dtype, own_kernels
        )
    elif recipe.slices:
        plan, kernel, parameters_for, config_updates = _sliced(
            recipe, dict(zip(locations, checkpoints)), side_source, out_dtype, own_kernels
        )
    else:
        plan = plan_same_name(checkpoints, out_dtype)
        parameters_for = ParameterResolver(recipe, [item.output.name for item in plan])
        if recipe.merge_method == STITCH:
            stitched = _stitched(recipe, plan, locations, checkpoints, base_index, open_masks, run)
            plan, kernel, method_report = stitched.plan, stitched.kernel, stitched.report
        elif stats:
            merged = [locations.index(model) for model in stats]
            data = plan_data_merge(recipe.merge_method, plan, list(stats.values()), merged, parameters_for, base_index)
            plan, kernel = data.plan, data.kernel
            method_report = partial(data.report, recipe.merge_method)
        else:
            kernel = method_kernel(recipe.merge_method, parameters_for, base_index, prefer_own=own_kernels)
    if seed is not None:
        plan = in_mergekit_order(plan)
    for item in plan:
        check_ranges(recipe.merge_method, parameters_for(item.output.name), item.output.name)
    copied = _copied_as_stored(recipe.merge_method, plan, parameters_for)
    kernel = replace(kernel, passes_through=kernel.passes_through | copied)
    if as_mergekit:
        kernel = replace(kernel, precision=Precision(exact=False, inputs_as=parse_dtype(recipe.dtype)))
    if seed is not None:
        torch.manual_seed(seed)
    updates = {**(prepared.extras.config_updates or {}), **config_updates}
    extras = replace(prepared.extras, config_updates=updates)
    return _Planned(plan, kernel, side_source, out_dtype, extras, method_report)


def _walk_request(
    recipe: Recipe, run: RunOptions, open_models: ModelOpener
) -> tuple[WalkRequest, Checkpoint, torch.dtype | None]:
    """A regmean_plusplus recipe's models opened, with their data hooks, weights, alpha and sample bound; the
    checkpoint whose side files the output gets; the output dtype."""
    locations, _ = recipe.inputs()
    checkpoints = open_models(locations, run.storage_options)
    names = list(checkpoints[0].tensors)
    parameters = ParameterResolver(recipe, names)(names[0])  # one value each for the whole walk (_check_walk)
    data = {entry.model: str(entry.data) for entry in recipe.models}
    request = WalkRequest(
        checkpoints,
        [data[location] for location in locations],
        [parameters["weight"][i] for i in range(len(locations))],
        parameters["alpha"],
        parameters["samples"],
    )
    if request.samples < 1:
        raise RecipeError(f"{PLUSPLUS}: samples must be at least 1, got {request.samples}")
    check_alpha(request.alpha)
    return request, checkpoints[0], parse_dtype(recipe.out_dtype or recipe.dtype)


def _opened_stats(
    recipe: Recipe,
    locations: Sequence[str],
    checkpoints: Sequence[Checkpoint],
    open_stats: StatsOpener | None,
    storage_options: dict | None,
) -> dict[str, StoredStats]:
    """{model: its statistics} for a data-dependent merge (each checked against its model as stored), else {}."""
    statistic = DATA_METHODS.get(recipe.merge_method)
    if statistic is None:
        return {}
    if open_stats is None:
        raise RecipeError(f"{recipe.merge_method} reads statistics: run it through splice.merge, which opens them")
    given = {entry.model: entry.stats for entry in recipe.models if entry.stats is not None}
    return {
        model: open_stats(given[model], checkpoints[locations.index(model)], statistic, storage_options)
        for model in given
    }


def _stitched(
    recipe: Recipe,
    plan: list[StreamItem],
    locations: Sequence[str],
    checkpoints: Sequence[Checkpoint],
    base_index: int | None,
    open_masks: MaskOpener | None,
    run: RunOptions,
) -> StitchPlan:
    """A localize_stitch recipe's plan and kernel: each model's region opened (`open_masks`, given the base) and
    checked against the models' tensors."""
    if open_masks is None:
        raise RecipeError(f"{STITCH} reads mask patches: run it through splice.merge, which opens them")
    assert base_index is not None  # the recipe's checks refuse localize_stitch without base_model
    merged = [locations.index(entry.model) for entry in recipe.models]
    base = checkpoints[base_index]
    names = list(base.tensors)
    learning = ParameterResolver(recipe, names)(names[0])  # one value each for the whole merge (shared scope)
    regions = [open_masks(entry, base, checkpoints[i], learning, run) for entry, i in zip(recipe.models, merged)]
    return plan_stitch(plan, base_index, merged, regions, [entry.model for entry in recipe.models])


def _refuse_unmatched_alignment(recipe: Recipe, realigned: Sequence[bool]) -> None:
    """Refuse what vocabulary alignment would compute otherwise than mergekit: rows filled for `slices:` and
    `modules:` over the whole recipe (mergekit fills an embedding's missing rows from the first slice's sources and
    base, a head's from the last slice's), and `compute: mergekit` (mergekit averages fallback rows in `dtype`)."""
    if not any(realigned):
        return
    form = "slices:" if recipe.slices else "modules:" if recipe.modules else None
    if form is not None:
        raise RecipeError(
            f"{form} over models whose vocabularies differ is not supported yet (mergekit fills each slice's missing "
            "rows from that slice's own sources); align them first with a models: merge and tokenizer_source, then "
            "slice the result"
        )
    if recipe.compute == "mergekit":
        raise RecipeError(
            "compute: mergekit over models whose vocabularies differ is not supported yet (mergekit averages missing "
            "rows in dtype, bit for bit unmatched); use compute: exact"
        )


def _sliced(
    recipe: Recipe,
    checkpoints: Mapping[str, Checkpoint],
    side_source: Checkpoint,
    out_dtype: torch.dtype | None,
    prefer_own_kernels: bool,
) -> tuple[list[StreamItem], Kernel, TensorParameters, dict[str, Any]]:
    """A `slices:` recipe's plan, its kernel (each output tensor merged by its slice's sources, with their base and
    their parameters: source, slice, then global), the parameters of every output tensor, and the output config's
    updates."""
    pieces = recipe.slices or []
    sliced = plan_slices(_layer_ranges(pieces), checkpoints, side_source, out_dtype)
    chains = _slice_chains(recipe, pieces, (recipe.parameters,))
    return (*_by_slice(recipe.merge_method, sliced.tensors, chains, prefer_own_kernels), sliced.config_updates)


def _modular(
    recipe: Recipe,
    checkpoints: Mapping[str, Checkpoint],
    side_source: Checkpoint,
    out_dtype: torch.dtype | None,
    prefer_own_kernels: bool,
) -> tuple[list[StreamItem], Kernel, TensorParameters, dict[str, Any]]:
    """A `modules:` recipe's plan, as mergekit plans it: each module's tensors (splice.merge.modules) merged as
    slices, its `models:` as one slice of every model's whole module (the base added where the method takes it);
    parameters from the source or model, the slice, the module, then global. A module's depth in the output config
    is rewritten where its slices restack it."""
    splits = {location: model_modules(checkpoint) for location, checkpoint in checkpoints.items()}
    architectures = {location: split.architecture for location, split in splits.items()}
    if len(set(architectures.values())) > 1:
        named = ", ".join(f"{location} is {name}" for location, name in architectures.items())
        raise RecipeError(f"modules: the models have different architectures ({named}); merge models of one")
    modules = next(iter(splits.values())).stacks
    architecture = next(iter(architectures.values()))
    for name in recipe.modules or {}:
        if name not in modules:
            raise RecipeError(
                f"modules.{name}: mergekit's {architecture} has no module {name!r} (its modules: {', '.join(modules)})"
            )
    left_out = [name for name in modules if name not in (recipe.modules or {})]
    if left_out:
        raise RecipeError(
            f"modules: no section for {', '.join(left_out)} of {architecture}: mergekit leaves a module without one "
            f"out of its output; add a section for each (e.g. `{left_out[0]}: {{models: [...]}}`)"
        )
    tensors: list[SlicedTensor] = []
    chains: list[SettingChains] = []
    config_updates: dict[str, Any] = {}
    for name, section in (recipe.modules or {}).items():
        stacks = {location: split.stacks[name] for location, split in splits.items()}
        pieces = section.slices or [_whole_module(recipe, section, stacks, name)]
        sliced = plan_slices(
            _layer_ranges(pieces),
            checkpoints,
            side_source if section.slices else None,  # mergekit rewrites the depth of sliced modules only
            out_dtype,
            stacks,
            f"modules.{name}.slices",
        )
        tensors += [replace(tensor, slice=tensor.slice + len(chains)) for tensor in sliced.tensors]
        chains += _slice_chains(recipe, pieces, (section.parameters, recipe.parameters))
        config_updates.update(sliced.config_updates)
    return (*_by_slice(recipe.merge_method, tensors, chains, prefer_own_kernels), config_updates)


def _whole_module(recipe: Recipe, section: ModuleSection, stacks: Mapping[str, LayerStack], module: str) -> OutputSlice:
    """A module's `models:` as mergekit reads them: one slice taking every model's layers of the module, each model's
    parameters its source's; the base model among them where the method takes one."""
    locations, _ = recipe.module_recipes()[module].inputs()
    parameters = {entry.model: entry.parameters for entry in section.models}
    depths = {location: stacks[location].depth for location in locations}
    if len(set(depths.values())) > 1:
        named = ", ".join(f"{location} has {depth}" for location, depth in depths.items())
        raise RecipeError(f"modules.{module}: its models have different numbers of layers ({named}); use slices:")
    return OutputSlice(
        sources=[
            SliceSource(model=location, layer_range=(0, depths[location]), parameters=parameters.get(location, {}))
            for location in locations
        ]
    )


def _layer_ranges(pieces: Sequence[OutputSlice]) -> list[list[LayerRange]]:
    return [[LayerRange(s.model, *s.layer_range) for s in piece.sources] for piece in pieces]


def _slice_chains(
    recipe: Recipe, pieces: Sequence[OutputSlice], outer: tuple[Mapping[str, Any], ...]
) -> list[SettingChains]:
    """Where each slice's tensors take their parameters: the source, the slice, then the `outer` settings (the
    module's and the global ones, highest first); the base is the slice's, else the recipe's."""
    chains = []
    for piece in pieces:
        models, base = [s.model for s in piece.sources], piece.base(recipe)
        inputs = [(s.model, (s.parameters, piece.parameters, *outer)) for s in piece.sources]
        base_index = models.index(base) if base is not None else None
        chains.append(SettingChains(recipe.merge_method, (piece.parameters, *outer), inputs, base_index))
    return chains


def _by_slice(
    method: str, tensors: Sequence[SlicedTensor], chains: Sequence[SettingChains], prefer_own_kernels: bool
) -> tuple[list[StreamItem], Kernel, TensorParameters]:
    """The plan of sliced tensors, its kernel (each tensor merged by its slice's kernel, with its slice's base) and
    the parameters of every output tensor (its slice's chains, at its t, filters matching its inputs' names)."""
    where = {tensor.item.output.name: tensor for tensor in tensors}

    def parameters_for(name: str) -> dict[str, Any]:
        tensor = where[name]
        return chains[tensor.slice].resolve(name, tensor.t, tensor.input_names)

    kernels = [
        method_kernel(method, parameters_for, chain.base_index, prefer_own=prefer_own_kernels) for chain in chains
    ]

    def by_slice(name: str, inputs: list[torch.Tensor]) -> torch.Tensor:
        return kernels[where[name].slice].compute(name, inputs)

    kernel = Kernel(by_slice, elementwise=kernels[0].elementwise)
    return [tensor.item for tensor in tensors], kernel, parameters_for


def _copied_as_stored(method: str, plan: Sequence[StreamItem], parameters_for: TensorParameters) -> frozenset[str]:
    """The tensors passthrough copies unscaled into the dtype they are stored in: the writer copies their bytes."""
    if method != "passthrough":
        return frozenset()
    copied = []
    for item in plan:
        checkpoint, stored = item.sources[0]
        scale = parameters_for(item.output.name)["scale"][0]
        if scale is None and checkpoint.tensors[stored].dtype == item.output.dtype:
            copied.append(item.output.name)
    return frozenset(copied)
