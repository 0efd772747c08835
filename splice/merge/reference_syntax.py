"""How a recipe writes a model reference, as mergekit reads it: `path[@revision][+adapter[@revision]]`, or
mergekit's mapping `{model: PATH, lora: PATH}` with each PATH a string or `{path, revision}`.

Only the syntax lives here; what a reference points at (a local directory, the Hugging Face cache, a URL) is
resolved by `splice.workflows.references`. A URL's `@` is its own (`hf://org/name@rev`, `ssh://user@host`), so
only a path that is not a URL splits off a revision.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from splice.errors import RecipeError

URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")
"""A location with a scheme (s3://b/x, hf://org/name, file:/x): fsspec's to open."""

FORM = "MODEL[@REVISION][+ADAPTER[@REVISION]]"


@dataclass(frozen=True)
class PathAt:
    """One part of a reference: a path, repo id or URL, and the revision written after its `@` (None: none)."""

    path: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.path if self.revision is None else f"{self.path}@{self.revision}"


@dataclass(frozen=True)
class ReferenceParts:
    written: str  # the reference as the recipe writes it, for messages
    model: PathAt
    adapter: PathAt | None  # applied to the model on the fly (a PEFT adapter or a splice patch)


def parse_reference(text: str) -> ReferenceParts:
    """A reference string split into its model and adapter parts; a malformed one is a one-line error."""
    chunks = text.split("+")
    if len(chunks) > 2:
        raise RecipeError(f"model {text}: more than one '+'; a model takes one adapter: {FORM}")
    if any(not chunk for chunk in chunks):
        where = "after" if not chunks[-1] else "before"
        raise RecipeError(f"model {text}: nothing {where} '+'; write {FORM}")
    model = _path_at(chunks[0], text)
    return ReferenceParts(text, model, _path_at(chunks[1], text) if len(chunks) == 2 else None)


def _path_at(chunk: str, written: str) -> PathAt:
    if URL.match(chunk):
        return PathAt(chunk)
    if chunk.count("@") > 1:
        raise RecipeError(f"model {written}: {chunk} has more than one '@'; write {FORM}")
    path, _, revision = chunk.partition("@")
    if not path or (not revision and "@" in chunk):
        raise RecipeError(f"model {written}: nothing {'before' if not path else 'after'} '@' in {chunk}; write {FORM}")
    return PathAt(path, revision or None)


def reference_text(value: Any) -> Any:
    """mergekit's mapping form of a reference as the string form (which the rest of splice reads); anything else
    as it is, for the field's own type to check."""
    if not isinstance(value, dict):
        return value
    if "override_architecture" in value:
        raise ValueError("override_architecture is not supported: a model's architecture is its config.json's")
    unknown = sorted(str(key) for key in value if key not in ("model", "lora"))
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} in a model reference (it takes model and lora)")
    if "model" not in value:
        raise ValueError("a model reference written as a mapping needs `model`")
    parts = [_part_text(value["model"])]
    if value.get("lora") is not None:
        parts.append(_part_text(value["lora"]))
    return "+".join(parts)


def _part_text(value: Any) -> str:
    """One part (`PATH` or `{path: PATH, revision: REV}`) in the string form, refused where that form would read
    it differently (a path holding `+` or `@`)."""
    if isinstance(value, str):
        path, revision = value, None
    elif isinstance(value, dict) and isinstance(value.get("path"), str) and set(value) <= {"path", "revision"}:
        path, revision = value["path"], value.get("revision")
        if revision is not None and not (isinstance(revision, str) and revision):
            raise ValueError(f"the revision of {path} must be a non-empty string")
    else:
        raise ValueError("a model or lora is a path, or a mapping with path and revision")
    if "+" in path or (revision is not None and "@" in path):
        raise ValueError(f"a path holding '+' or '@' ({path}) cannot be a part of a model reference")
    return path if revision is None else f"{path}@{revision}"
