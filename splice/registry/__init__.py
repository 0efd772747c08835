"""The patch registry: content-addressed blobs, immutable version manifests, aliases moved by compare-and-swap."""

from splice.registry.manifest import AliasRecord, PushStats, TensorEntry, VersionManifest
from splice.registry.refs import Ref, RefError, RegistryError, check_alias, check_name, parse_ref
from splice.registry.store import (
    AliasConflict,
    DiffReport,
    GcReport,
    Registry,
    TensorDiff,
    VerifyReport,
    default_location,
)

__all__ = [
    "AliasConflict",
    "AliasRecord",
    "DiffReport",
    "GcReport",
    "PushStats",
    "Ref",
    "RefError",
    "Registry",
    "RegistryError",
    "TensorDiff",
    "TensorEntry",
    "VerifyReport",
    "VersionManifest",
    "check_alias",
    "check_name",
    "default_location",
    "parse_ref",
]
