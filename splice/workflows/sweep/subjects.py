"""What a sweep may search besides a merge recipe: a soup's weights (`recipe: {soup: {models, weights}}`, searched
as the linear recipe it is) and a port's scale (`recipe: {port: {patch, to, from, scale}}`, the patch ported onto
the new base at each candidate scale, as `splice port --scale` ports it)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from splice.errors import RecipeError
from splice.values import FiniteFloat, one_line

SOUP_KEY, PORT_KEY = "soup", "port"
PORT_LOCATIONS = ("patch", "to", "from")  # the port's entries that are locations


class PortSpec(BaseModel):
    """`recipe: {port: ...}`: the patch (a directory or a PEFT adapter), the evolved base it is ported `to`, the
    base it was made on (`from`, as `splice port --from`), and the `scale` (searched, or fixed)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    patch: str
    to: str
    old_base: Annotated[str | None, Field(alias="from")] = None
    scale: FiniteFloat = 1.0

    @property
    def inputs(self) -> list[str]:
        return [location for location in (self.to, self.old_base, self.patch) if location is not None]

    def command(self, out: str) -> str:
        """The `splice port` command line that ports it as a sweep candidate was."""
        old = f" --from {self.old_base}" if self.old_base is not None else ""
        return f"splice port {self.patch} --to {self.to}{old} --scale {self.scale!r} --out {out}"


def subject_kind(document: dict[str, Any]) -> str:
    """ "port", "soup" or "merge": what a sweep's recipe document describes."""
    if set(document) == {PORT_KEY}:
        return "port"
    if set(document) == {SOUP_KEY}:
        return "soup"
    return "merge"


def port_spec(document: dict[str, Any], source: str) -> PortSpec:
    """The `port:` entry of a recipe document with every mark filled, validated."""
    body = document.get(PORT_KEY)
    if not isinstance(body, dict):
        raise RecipeError(f"{source}: port: a mapping with patch, to, from and scale")
    try:
        return PortSpec.model_validate(body)
    except ValidationError as exc:
        raise RecipeError(f"{source}: port: {one_line(exc, 'port')}") from None


def soup_as_recipe(document: dict[str, Any], source: str) -> dict[str, Any]:
    """`{soup: {models: [...], weights: [...], dtype}}` as the linear recipe it is, each weight (marked or not)
    in its model's parameters: `splice merge` runs the best one."""
    body = document[SOUP_KEY]
    if not isinstance(body, dict) or set(body) - {"models", "weights", "dtype"} or "models" not in body:
        raise RecipeError(f"{source}: soup: a mapping with models, and optionally weights and dtype")
    models, weights = body["models"], body.get("weights")
    if not isinstance(models, list) or not models:
        raise RecipeError(f"{source}: soup.models: a list of the models to soup")
    if weights is None:
        weights = [1.0] * len(models)
    if not isinstance(weights, list) or len(weights) != len(models):
        raise RecipeError(f"{source}: soup.weights: one weight (or mark) per model, {len(models)} in all")
    recipe: dict[str, Any] = {
        "merge_method": "linear",
        "models": [{"model": model, "parameters": {"weight": weight}} for model, weight in zip(models, weights)],
    }
    if "dtype" in body:
        recipe["dtype"] = body["dtype"]
    return recipe
