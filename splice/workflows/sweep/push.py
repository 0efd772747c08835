"""`push:` in a sweep file: the best model, once written, extracted as a patch against its base and pushed as the next
version of a registry name. Checked before any trial (the registry writable, the name and alias valid, the base
known), so a sweep never runs for hours to fail at its last step."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict

from splice.adapters.extract import extract_patch
from splice.registry.store import PushResult, Registry, open_registry
from splice.values import Bounded


class PushSettings(BaseModel):
    """`push:` — `name` (and `alias`) in `registry` (default: $SPLICE_REGISTRY, else ~/.cache/splice/registry); the
    patch is `kind` (delta by default: the best model exactly, as base + delta) made against `base` (default: the
    recipe's base_model), with `options` as `splice patch extract` takes them (rank, density, ...)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    registry: str | None = None
    alias: str | None = None
    kind: Literal["delta", "lora", "mask", "layernorm"] = "delta"
    base: str | None = None
    options: Annotated[dict[str, Any], Bounded] = {}


def ready_registry(settings: PushSettings, storage_options: dict | None) -> Registry:
    """The registry the best will be pushed to, checked now: writable, the name and alias valid."""
    registry = open_registry(settings.registry, storage_options)
    registry.check_push(settings.name, settings.alias)
    return registry


def push_best(
    registry: Registry, settings: PushSettings, base: str, best_model: str, message: str, storage_options: dict | None
) -> PushResult:
    patch = extract_patch(base, best_model, settings.kind, storage_options, message, **settings.options)
    return registry.push(settings.name, patch, alias=settings.alias, message=message)
