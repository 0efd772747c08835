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
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError
from typing_extensions import Unpack

from splice.adapters.apply import apply_patches
from splice.adapters.live import PatchHandle, apply_patch
from splice.adapters.patch import Patch, PatchError
from splice.adapters.port import Ported, prepare_port
from splice.errors import CheckpointError
from splice.options import RunKeywords, RunOptions, run_options
from splice.registry.health import HealthRecord
from splice.registry.manifest import VersionManifest
from splice.registry.store import Registry, open_registry
from splice.tensors.checkpoint import Checkpoint, recorded_location
from splice.tensors.safetensors import read_safetensors_metadata
from splice.tensors.stream import StreamReport
from splice.tensors.writer import ensure_output_free
from splice.values import one_line, parse_json
from splice.version import __version__
from splice.workflows.port import record_health, record_port

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
    _warnings: list[str] = PrivateAttr(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        """What went wrong after the model was written (a health record the registry did not take)."""
        return self._warnings

    @warnings.setter
    def warnings(self, value: list[str]) -> None:
        self._warnings = value


def deploy(
    refs: Sequence[str],
    base: str | os.PathLike,
    out: str | os.PathLike,
    *,
    registry: Registry | str | None = None,
    allow_base_drift: bool = False,
    port: bool = False,
    old_base: str | os.PathLike | None = None,
    run: RunOptions | None = None,
    **run_keywords: Unpack[RunKeywords],
) -> tuple[DeploymentRecord, StreamReport]:
    """Apply registry patches (in the order given) to `base` and write the result to `out` with its record.
    Every ref is resolved and every patch checked against the base before anything is written. `port`: each
    patch is first ported onto `base` (PortLLM; `old_base`, the base the patches were made on, gives the drift
    report the base's change itself), with each drift report beside the output. Every deployment is kept in
    the patch's health history (`registry show NAME`). `run` (or its fields as keywords: device, shard_size,
    force, progress, storage_options, ...) says how the run runs."""
    run = run_options(run, run_keywords, "deploy")
    if not refs:
        raise PatchError("no patch refs given")
    if old_base is not None and not port:
        raise PatchError(
            "`old_base` (the base the patches were made on) is for `port=True`; add `port=True` to port them"
        )
    if port and allow_base_drift:
        raise PatchError(
            "`port=True` carries the patches onto the base; `allow_base_drift=True` applies them unchanged: choose one"
        )
    store = open_registry(registry, run.storage_options)
    ensure_output_free(
        out,
        run.force,
        protected=[p for p in (base, old_base, store.url) if p is not None],
        what="a base or the registry",
    )
    base_ckpt = Checkpoint.open(base, run.storage_options)
    deployed, patches, sources, files = [], [], [], {}
    for index, ref in enumerate(refs):
        version = store.resolve(ref)
        patch, ported = store.load(version.ref), None
        if port:
            ported = prepare_port(patch, base, old_base=old_base, source=version.ref, run=run)
            check, patch = f"ported: {ported.drift.verdict}", ported.patch
            files.update({_numbered(name, index + 1, len(refs)): data for name, data in ported.drift.files().items()})
        else:
            check = _base_check(patch, base_ckpt, allow_base_drift)
        sources.append((version, ported))
        deployed.append(
            DeployedPatch(
                ref=ref,
                name=version.name,
                version=version.version,
                digest=version.digest,
                kind=patch.meta.kind.value,
                base_check=check,
                base_digest=patch.meta.base.digest if patch.meta.base else None,
            )
        )
        patches.append(patch)
    record = DeploymentRecord(registry=recorded_location(store.url), base=recorded_location(base), patches=deployed)
    report = apply_patches(
        patches,
        base,
        out,
        check_bases=False,
        run=run,
        metadata={RECORD_METADATA_KEY: record.model_dump_json()},
        extra_files={RECORD_FILE: (record.model_dump_json(indent=2) + "\n").encode(), **files},
    )
    record.warnings = _record_deployments(store, record, sources, str(out))
    return record, report


def _numbered(name: str, index: int, count: int) -> str:
    """port_report.json, or port_report-2.json for the second of several patches."""
    if count == 1:
        return name
    stem, dot, ext = name.rpartition(".")
    return f"{stem}-{index}{dot}{ext}"


def _base_check(patch: Patch, base: Checkpoint, allow_base_drift: bool) -> str:
    mismatches = patch.check_base(base, allow_drift=allow_base_drift)
    if patch.meta.base is None:
        return "not recorded"
    if mismatches:
        own = sum(m.own for m in mismatches)
        return f"drift allowed: {own} of the tensors it changes and {len(mismatches) - own} other base tensors differ"
    return "verified"


def _record_deployments(
    store: Registry, record: DeploymentRecord, sources: list[tuple[VersionManifest, Ported | None]], output: str
) -> list[str]:
    """Each deployed version's health record (a port's with its drift figures); warnings where one failed."""
    warnings = []
    for patch, (version, ported) in zip(record.patches, sources):
        if ported is not None:
            warnings += record_port(store, version, ported, record.base, None, output)
            continue
        health = HealthRecord(
            event="deploy",
            version=patch.version,
            digest=patch.digest,
            base=record.base,
            base_digest=patch.base_digest if patch.base_check == "verified" else None,
            base_check=patch.base_check,
            output=output,
        )
        warnings += record_health(store, patch.name, health)
    return warnings


def read_deployment_record(model: str | os.PathLike, storage_options: dict | None = None) -> DeploymentRecord | None:
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
        raise CheckpointError(
            f"{model}: its deployment record is not valid ({one_line(exc, 'record')}); deploy it again"
        ) from None
    except ValueError as exc:
        raise CheckpointError(f"{model}: its deployment record is not valid JSON ({exc}); deploy it again") from None


def apply_ref(
    model: torch.nn.Module,
    ref: str,
    *,
    registry: Registry | str | None = None,
    allow_base_drift: bool = False,
    storage_options: dict | None = None,
) -> PatchHandle:
    """Load a registry ref and patch a live model in place; the handle's `remove()` takes it off again."""
    return apply_patch(model, open_registry(registry, storage_options).load(ref), allow_base_drift=allow_base_drift)
