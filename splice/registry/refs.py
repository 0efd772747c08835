"""Registry references: `name`, `name@3`, `name@prod`, `name@sha256:<64 hex>` (or a short `name@sha256:<8-32 hex>`).

Names and aliases become path components in the registry's storage, so they are checked against an
allow-list (`[a-z0-9][a-z0-9._-]*`, at most 100 characters) before anything touches a filesystem:
no `/`, no `..`, no absolute paths, no uppercase, no control characters, nothing empty.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from splice.errors import SpliceError

MAX_NAME_LENGTH = 100
NAME_RULE = (
    f"lowercase letters, digits, '.', '_' and '-', starting with a letter or digit, "
    f"at most {MAX_NAME_LENGTH} characters"
)
DIGEST_PREFIX = "sha256:"
RESERVED_ALIASES = frozenset({"sha256"})

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
_VERSION = re.compile(r"[1-9][0-9]{0,17}")
# the whole digest, or a short one (a prefix, as `registry ls` prints it); 33 to 63 digits read as a cut-off digest
_DIGEST = re.compile(r"sha256:(?:[0-9a-f]{64}|[0-9a-f]{8,32})")


class RegistryError(SpliceError):
    """A registry location, reference, version or blob is missing, malformed, corrupt or in conflict."""


class RefError(RegistryError):
    """A name, alias or reference does not follow the registry's rules."""


def _shown(text: str) -> str:
    shown = repr(text)
    return shown if len(shown) <= 60 else shown[:57] + "...'"


def check_name(name: str, what: str = "patch name") -> str:
    """`name` if it is a valid registry name; a RefError naming the rule otherwise."""
    if not isinstance(name, str) or not name:
        raise RefError(f"{what} is empty: use {NAME_RULE}")
    if len(name) > MAX_NAME_LENGTH or not _NAME.fullmatch(name):
        raise RefError(f"{what} {_shown(name)} is not allowed: use {NAME_RULE}")
    return name


def check_alias(alias: str) -> str:
    """`alias` if it is a valid alias: a valid name that is not all digits (that reads as a version)."""
    check_name(alias, "alias")
    if alias.isdigit():
        raise RefError(
            f"alias {_shown(alias)} is all digits, which reads as a version number; "
            "use a name with a letter in it, e.g. prod or task-3"
        )
    if alias in RESERVED_ALIASES:
        raise RefError(f"alias {_shown(alias)} is reserved for content digests (name@sha256:...); choose another")
    return alias


def check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise RefError(
            f"digest {_shown(digest)} is not allowed: write sha256: followed by 64 lowercase hex digits, "
            "or the first 8 to 32 of them (a short digest, as `splice registry ls` prints it)"
        )
    return digest


@dataclass(frozen=True)
class Ref:
    """A parsed reference; at most one of version, alias and digest is set (none: the latest version)."""

    name: str
    version: int | None = None
    alias: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@{self.version}"
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        if self.digest is not None:
            return f"{self.name}@{self.digest}"
        return self.name


def parse_ref(text: str) -> Ref:
    """`name`, `name@N`, `name@alias` or `name@sha256:<hex>`; RefError (one line) for anything else."""
    if not isinstance(text, str) or not text:
        raise RefError("reference is empty: write NAME, NAME@VERSION, NAME@ALIAS or NAME@sha256:DIGEST")
    name, at, selector = text.partition("@")
    check_name(name)
    if not at:
        return Ref(name)
    if not selector:
        raise RefError(f"reference {_shown(text)} ends with '@': write NAME@VERSION, NAME@ALIAS or NAME@sha256:DIGEST")
    if selector.startswith(DIGEST_PREFIX):
        return Ref(name, digest=check_digest(selector))
    if selector.isascii() and selector.isdigit():
        if not _VERSION.fullmatch(selector):
            raise RefError(
                f"version {_shown(selector)} in {_shown(text)} is not allowed: versions are "
                "numbers from 1, written without leading zeros"
            )
        return Ref(name, version=int(selector))
    return Ref(name, alias=check_alias(selector))
