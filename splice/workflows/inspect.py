"""What `splice inspect` reports: of a model, its shards, tensors, parameters, dtypes, normalisation modules, and the
patch versions a deployed model carries; of a patch directory (a statistics artifact among them), what it holds, and
of a mask patch where its entries lie (a table, and a heat map drawn on request)."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from splice.adapters.meta import PatchKind
from splice.adapters.patch import MANIFEST, Patch, StoredTensors, describe_settings
from splice.arch.norms import NormModule, find_norm_modules
from splice.errors import CheckpointError, PatchError
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.device import dtype_name
from splice.tensors.writer import ensure_output_file_free, write_output_file
from splice.workflows.deploy import DeploymentRecord, read_deployment_record
from splice.workflows.placement import MaskPlacement, mask_placement


@dataclass
class ShardSummary:
    file: str
    tensors: int
    nbytes: int


@dataclass
class ModelSummary:
    location: str
    architecture: str | None
    shards: list[ShardSummary]
    tensors: int
    parameters: int
    nbytes: int
    dtypes: dict[str, int]  # dtype -> parameter count
    norm_modules: list[NormModule]
    deployment: DeploymentRecord | None = None  # set when splice deploy wrote this model


@dataclass
class PatchTensor:
    name: str
    shape: list[int]
    dtype: str
    nbytes: int
    tokens: int | None = None  # a Gram matrix: the tokens it was summed over
    serves: int = 1  # a Gram matrix: the layers whose weights share it


@dataclass
class PatchSummary:
    location: str
    kind: str
    description: str
    settings: str  # the kind's settings in one line
    targets: int
    nbytes: int
    model_fingerprint: str | None
    created: str
    tensors: list[PatchTensor]
    placement: MaskPlacement | None = None  # a mask patch: where its entries lie, per layer and module type
    metrics: dict[str, float] = field(default_factory=dict)  # what the patch records of itself (scores, ...)


def summarize_patch(location: str | os.PathLike, storage_options: dict | None = None) -> PatchSummary:
    """What a splice patch directory holds, read from its manifest and header."""
    patch = Patch.load(location, storage_options)
    assert isinstance(patch.tensors, StoredTensors)
    stored = patch.tensors.stored.tensors
    settings = patch.meta.settings
    tokens, shared = settings.get("tokens", {}), Counter(settings.get("shared", {}).values())
    return PatchSummary(
        location=str(location),
        kind=patch.meta.kind.value,
        description=patch.meta.description,
        settings=describe_settings(patch.meta),
        targets=len(patch.meta.targets),
        nbytes=sum(info.nbytes for info in stored.values()),
        model_fingerprint=patch.meta.base.digest if patch.meta.base else None,
        created=f"{patch.meta.created:%Y-%m-%d %H:%M} UTC",
        tensors=[
            PatchTensor(name, list(info.shape), dtype_name(info.dtype), info.nbytes, tokens.get(name), 1 + shared[name])
            for name, info in stored.items()
        ],
        placement=mask_placement(patch) if patch.meta.kind is PatchKind.mask else None,
        metrics=dict(patch.meta.metrics),
    )


def plot_placement(
    location: str | os.PathLike, plot: str | os.PathLike, force: bool = False, storage_options: dict | None = None
) -> PatchSummary:
    """`summarize_patch` of a mask patch, with the heat map of where its entries lie written to `plot` (a PNG) by
    the output rule: refused before any work if it exists (unless `force`) or lies in the patch, published whole."""
    if Path(plot).suffix.lower() != ".png":
        raise PatchError(f"`plot` {plot} is not a .png file: the heat map is written as a PNG; name it FILE.png")
    ensure_output_file_free(plot, force, [location], what="the patch", parameter_name="plot")
    if not is_patch_directory(location, storage_options):
        raise PatchError(
            f"{location} is not a patch: `plot` draws where a mask patch's entries lie; give a mask patch or leave "
            "`plot` out"
        )
    summary = summarize_patch(location, storage_options)
    if summary.placement is None:
        raise PatchError(
            f"{location} is a {summary.kind} patch, not a mask patch: `plot` draws where a mask patch's entries lie; "
            "give a mask patch or leave `plot` out"
        )
    write_output_file(plot, summary.placement.png(), force, [location], what="the patch", parameter_name="plot")
    return summary


def is_patch_directory(location: str | os.PathLike, storage_options: dict | None = None) -> bool:
    try:
        return MANIFEST in Checkpoint.files_of(str(location), storage_options).files()
    except (CheckpointError, OSError):
        return False


def summarize(location: str | os.PathLike, storage_options: dict | None = None) -> ModelSummary:
    checkpoint = Checkpoint.open(str(location), storage_options)
    config = checkpoint.config() or {}
    per_shard: dict[str, ShardSummary] = {s: ShardSummary(s, 0, 0) for s in checkpoint.shards}
    dtypes: Counter[str] = Counter()
    for info in checkpoint.tensors.values():
        per_shard[info.shard].tensors += 1
        per_shard[info.shard].nbytes += info.nbytes
        dtypes[dtype_name(info.dtype)] += info.numel
    architectures = config.get("architectures") or [config.get("model_type")] if config else [None]
    return ModelSummary(
        location=str(location),
        architecture=architectures[0] if architectures else None,
        shards=list(per_shard.values()),
        tensors=len(checkpoint.tensors),
        parameters=checkpoint.num_parameters,
        nbytes=checkpoint.total_bytes,
        dtypes=dict(dtypes),
        norm_modules=find_norm_modules(checkpoint),
        deployment=read_deployment_record(location, storage_options),
    )
