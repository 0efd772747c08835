"""The patch registry: content-addressed blobs, immutable version manifests, aliases moved by compare-and-swap."""

from splice.registry.layout import default_location
from splice.registry.maintenance import BlobProblem, DiffReport, GcReport, TensorDiff, VerifyReport
from splice.registry.manifest import AliasRecord, PushStats, TensorEntry, VersionManifest
from splice.registry.refs import Ref, RefError, RegistryError, check_alias, check_name, parse_ref
from splice.registry.store import AliasConflict, AliasTable, PushResult, Registry, RemovedVersion

__all__ = [
    "AliasConflict",
    "AliasRecord",
    "AliasTable",
    "BlobProblem",
    "DiffReport",
    "GcReport",
    "PushResult",
    "PushStats",
    "Ref",
    "RefError",
    "Registry",
    "RegistryError",
    "RemovedVersion",
    "TensorDiff",
    "TensorEntry",
    "VerifyReport",
    "VersionManifest",
    "check_alias",
    "check_name",
    "default_location",
    "parse_ref",
]
