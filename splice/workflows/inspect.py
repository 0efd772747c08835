"""What `splice inspect` reports: shards, tensors, parameters, dtypes, normalisation modules, and the patch
versions a deployed model carries."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

from splice.arch.norms import NormModule, find_norm_modules
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.device import dtype_name
from splice.workflows.deploy import DeploymentRecord, read_deployment_record


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
