"""Model references in recipes: the fields that name a model, marked once (`ModelReferenceField`), and the walk that
finds or replaces every reference a recipe holds, however deep (a multi-stage recipe replaces a stage's name by its
directory wherever a model is named; a record makes local paths absolute)."""

from __future__ import annotations

import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator

from splice.merge.reference_syntax import reference_text


@dataclass(frozen=True)
class ModelReferenceField:
    """Marks a recipe field whose value names a model (a directory, a URL, a Hub id, `base+lora`, an earlier
    stage's name): what `map_model_references` rewrites, wherever the field sits in a recipe. `keywords`: values of
    the field that name no model (`tokenizer_source: base`)."""

    keywords: frozenset[str] = frozenset()


ModelReference = Annotated[str, ModelReferenceField(), BeforeValidator(reference_text)]
"""A model as a recipe writes it: `path[@revision][+adapter[@revision]]`, or mergekit's `{model, lora}` mapping
(read as that string); `splice.workflows.references` resolves it."""


RecipeT = TypeVar("RecipeT", bound=BaseModel)


def map_model_references(recipe: RecipeT, change: Callable[[str], str]) -> RecipeT:
    """`recipe` (a Recipe, or any model a recipe holds) with each model reference `r` in it replaced by `change(r)`:
    every field marked by `ModelReferenceField`, found by walking the models, lists and mappings the recipe holds,
    so a field a recipe gains is covered once it is marked."""
    updates = {}
    for name, field in type(recipe).model_fields.items():
        value = getattr(recipe, name)
        marker = model_reference_marker(field.annotation, field.metadata)
        changed = _change_marked(value, marker, change) if marker else _change_nested(value, change)
        if changed is not value:
            updates[name] = changed
    return recipe.model_copy(update=updates) if updates else recipe


def model_references(recipe: BaseModel) -> list[str]:
    """Every model reference in a recipe, in the order its fields hold them (repeats kept)."""
    found: list[str] = []

    def note(reference: str) -> str:
        found.append(reference)
        return reference

    map_model_references(recipe, note)
    return found


def model_reference_marker(annotation: Any, metadata: Sequence[Any] = ()) -> ModelReferenceField | None:
    """The `ModelReferenceField` on a field's annotation (or in its pydantic `metadata`), also inside `X | None`,
    `list[X]` and `dict[str, X]`; None for a field that names no model."""
    for item in (*metadata, *typing.get_args(annotation)):
        if isinstance(item, ModelReferenceField):
            return item
        found = None if isinstance(item, (str, int, float)) else model_reference_marker(item)
        if found is not None:
            return found
    return None


def _change_marked(value: Any, marker: ModelReferenceField, change: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return value if value in marker.keywords else change(value)
    if isinstance(value, list):
        return [_change_marked(item, marker, change) for item in value]
    if isinstance(value, dict):
        return {key: _change_marked(item, marker, change) for key, item in value.items()}
    return value


def _change_nested(value: Any, change: Callable[[str], str]) -> Any:
    if isinstance(value, BaseModel):
        return map_model_references(value, change)
    if isinstance(value, (list, dict)):
        items = list(value.items() if isinstance(value, dict) else enumerate(value))
        changed = {key: _change_nested(item, change) for key, item in items}
        if all(changed[key] is item for key, item in items):
            return value
        return changed if isinstance(value, dict) else list(changed.values())
    return value
