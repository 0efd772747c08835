"""The patch registry: content-addressed blobs, immutable version manifests, aliases moved by compare-and-swap."""

from splice.registry.layout import default_location
from splice.registry.maintenance import BlobProblem, DiffReport, GcReport, TensorDiff, VerifyReport
from splice.registry.manifest import AliasRecord, PushStats, TensorEntry, VersionManifest
from splice.registry.refs import Ref, RefError, RegistryError, check_alias, check_name, parse_ref
from splice.registry.store import AliasConflict, NameSummary, Registry, VersionDetails

__all__ = [
    "AliasConflict",
    "AliasRecord",
    "BlobProblem",
    "DiffReport",
    "GcReport",
    "NameSummary",
    "PushStats",
    "Ref",
    "RefError",
    "Registry",
    "RegistryError",
    "TensorDiff",
    "TensorEntry",
    "VerifyReport",
    "VersionDetails",
    "VersionManifest",
    "check_alias",
    "check_name",
    "default_location",
    "parse_ref",
]
