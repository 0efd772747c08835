"""What `splice registry ls` and `registry show` tell, put together from the registry's reads: every name with its
latest version and aliases; one name's versions, each with the aliases pointing at it; one version with its name's
aliases, their moves and its health history. Imports neither torch nor transformers."""

from __future__ import annotations

from dataclasses import dataclass, field

from splice.registry.health import HealthRecord
from splice.registry.manifest import AliasRecord, VersionManifest
from splice.registry.refs import Ref
from splice.registry.store import AliasTable, Registry


@dataclass
class NameSummary:
    """One row of `registry ls`: a name, its latest live version, how many are live, its aliases (and a line
    for each alias whose file does not validate)."""

    name: str
    latest: int | None
    versions: int
    aliases: dict[str, AliasRecord]
    problems: list[str] = field(default_factory=list)


@dataclass
class VersionDetails:
    """Everything `registry show` tells about a version: its manifest and its name's aliases with their moves."""

    manifest: VersionManifest
    aliases: AliasTable
    history: dict[str, list[AliasRecord]]
    health: list[HealthRecord] = field(default_factory=list)  # every deployment and port of the name's versions
    health_problems: list[str] = field(default_factory=list)  # records that do not validate

    @property
    def pointing(self) -> list[str]:
        """The aliases pointing at this version."""
        return self.aliases.pointing_at(self.manifest.version)


def summarize_names(registry: Registry) -> list[NameSummary]:
    """Every name with its latest version, live version count and aliases, from directory listings and alias
    records (no version manifest is read)."""
    rows = []
    for name in registry.names():
        live, aliases = registry.version_numbers(name), registry.aliases(name)
        rows.append(NameSummary(name, max(live, default=None), len(live), dict(aliases), aliases.problems))
    return rows


def list_versions(registry: Registry, name: str) -> tuple[list[tuple[VersionManifest, list[str]]], list[str]]:
    """The live versions of a name, oldest first, each with the aliases pointing at it; and a line for each
    version or alias of the name whose file does not validate, and each version whose push is not over."""
    manifests, problems = registry.scan_versions(name)
    aliases = registry.aliases(name)
    return [(m, aliases.pointing_at(m.version)) for m in manifests], aliases.problems + problems


def version_details(registry: Registry, ref: str | Ref) -> VersionDetails:
    """The version a reference names, its name's aliases and their moves, and the name's health records."""
    manifest = registry.resolve(ref)
    aliases = registry.aliases(manifest.name)
    health, problems = registry.health(manifest.name)
    return VersionDetails(
        manifest, aliases, {a: registry.alias_history(manifest.name, a) for a in aliases}, health, problems
    )
