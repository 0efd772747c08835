"""Registry-backed deployment: resolve refs, check each patch against the base, apply streamed, record it.

The deployment record (which patch versions, by content digest, on which base) is written into every
output shard's safetensors metadata and as `deployment.json` beside it, so a deployed model can always
say exactly what it carries, even when only its weight files were copied on.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime, timezone

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from splice.adapters.apply import apply_patches
from splice.adapters.live import PatchHandle, apply_patch
from splice.adapters.patch import PatchError
from splice.errors import CheckpointError
from splice.progress import Progress
from splice.registry.store import Registry
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.safetensors import read_safetensors_metadata
from splice.tensors.stream import StreamReport
from splice.tensors.writer import DEFAULT_SHARD_SIZE, ensure_output_free
from splice.values import one_line, parse_json
from splice.version import __version__

RECORD_FILE = "deployment.json"
RECORD_METADATA_KEY = "splice_deployment"


class DeployedPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ref: str  # as the user gave it, e.g. "sentiment-ln@prod"
    name: str
    version: int
    digest: str  # the version's content digest: `name@<digest>` finds it again
    kind: str
    base_digest: str | None  # digest of the base tensors the patch was made on (None: no record, e.g. PEFT)
    base_check: str  # "verified", "drift allowed: ..." or "not recorded"


class DeploymentRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format_version: int = 1
    registry: str
    base: str
    patches: list[DeployedPatch]
    deployed_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    splice_version: str = __version__


def _open_registry(registry: Registry | str | None, storage_options: dict | None) -> Registry:
    return registry if isinstance(registry, Registry) else Registry.open(registry, storage_options)


def deploy(refs: Sequence[str], base: str | os.PathLike, out: str | os.PathLike, *,
           registry: Registry | str | None = None, allow_base_drift: bool = False, device: str = "auto",
           shard_size: int = DEFAULT_SHARD_SIZE, force: bool = False, progress: Progress | None = None,
           storage_options: dict | None = None) -> tuple[DeploymentRecord, StreamReport]:
    """Apply registry patches (in the order given) to `base` and write the result to `out` with its record.
    Every ref is resolved and every patch checked against the base before anything is written."""
    if not refs:
        raise PatchError("no patch refs given")
    store = _open_registry(registry, storage_options)
    ensure_output_free(out, force, protected=[base, store.url], what="the base or the registry")
    base_ckpt = Checkpoint.open(base, storage_options)
    deployed, patches = [], []
    for ref in refs:
        version = store.resolve(ref)
        patch = store.load(f"{version.name}@{version.version}")
        mismatches = patch.check_base(base_ckpt, allow_drift=allow_base_drift)
        if patch.meta.base is None:
            check = "not recorded"
        elif mismatches:
            own = sum(m.own for m in mismatches)
            check = (f"drift allowed: {own} of the tensors it changes and {len(mismatches) - own} other base "
                     f"tensors differ")
        else:
            check = "verified"
        deployed.append(DeployedPatch(ref=ref, name=version.name, version=version.version, digest=version.digest,
                                      kind=patch.meta.kind.value, base_check=check,
                                      base_digest=patch.meta.base.digest if patch.meta.base else None))
        patches.append(patch)
    record = DeploymentRecord(registry=store.url, base=str(base), patches=deployed)
    text = record.model_dump_json()
    report = apply_patches(patches, base, out, check_bases=False, device=device, shard_size=shard_size,
                           force=force, progress=progress, storage_options=storage_options,
                           metadata={RECORD_METADATA_KEY: text},
                           extra_files={RECORD_FILE: (record.model_dump_json(indent=2) + "\n").encode()})
    return record, report


def read_deployment_record(model: str | os.PathLike, storage_options: dict | None = None
                           ) -> DeploymentRecord | None:
    """The record a deployed model carries (from its weights' metadata, so it survives without
    deployment.json), or None for a model splice did not deploy."""
    stored = Checkpoint.open(model, storage_options)
    first_shard = stored.shards[0]
    if not first_shard.endswith(".safetensors"):
        return None
    metadata = read_safetensors_metadata(stored.fs, f"{stored.root}/{first_shard}", str(model), first_shard)
    text = metadata.get(RECORD_METADATA_KEY)
    if text is None:
        return None
    try:
        return DeploymentRecord.model_validate(parse_json(text))
    except ValidationError as exc:
        raise CheckpointError(f"{model}: its deployment record is not valid ({one_line(exc, 'record')}); "
                              f"deploy it again") from None
    except ValueError as exc:
        raise CheckpointError(f"{model}: its deployment record is not valid JSON ({exc}); deploy it again") from None


def apply_ref(model: torch.nn.Module, ref: str, *, registry: Registry | str | None = None,
              allow_base_drift: bool = False, storage_options: dict | None = None) -> PatchHandle:
    """Load a registry ref and patch a live model in place; the handle's `remove()` takes it off again."""
    return apply_patch(model, _open_registry(registry, storage_options).load(ref), allow_base_drift=allow_base_drift)
