"""What a patch says about itself, as plain data: its kind, its targets and the fingerprint of its base.
Free of torch, so the registry's byte-moving commands and manifests use it without loading tensors."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, model_validator

from splice.values import Bounded, FiniteFloat, Float32, PositiveInt, one_line

FORMAT_VERSION = 1


class TensorFingerprint(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    shape: tuple[int, ...]
    dtype: str
    sha256: str
    norm: float  # L2 norm, to say by how much a drifted base differs


class BaseFingerprint(BaseModel):
    """The base tensors a patch touches (hashed whole), the base's other float tensors (`context`: shape,
    dtype and the first 64 KiB hashed, so a patch whose own tensors happen to match, e.g. LayerNorms
    still at their initial values, is not taken for one made on another base), and one digest over all."""

    model_config = ConfigDict(extra="forbid")
    tensors: list[TensorFingerprint]
    context: dict[str, str] = {}
    digest: str

    @classmethod
    def of(cls, entries: Iterable[TensorFingerprint], context: Mapping[str, str] | None = None) -> BaseFingerprint:
        ordered = sorted(entries, key=lambda e: e.name)
        context = dict(sorted((context or {}).items()))
        summary = hashlib.sha256()
        for entry in ordered:
            summary.update(f"{entry.name}\0{list(entry.shape)}\0{entry.dtype}\0{entry.sha256}\n".encode())
        for name, sampled in context.items():
            summary.update(f"context\0{name}\0{sampled}\n".encode())
        return cls(tensors=ordered, context=context, digest=f"sha256:{summary.hexdigest()}")


class PatchKind(str, Enum):
    layernorm = "layernorm"
    lora = "lora"
    mask = "mask"
    delta = "delta"
    stats = "stats"  # statistics of a model on data (Gram matrices, Fisher diagonals): read by merges, never applied


class LoraSettings(BaseModel):
    """The entries of a LoRA patch's settings that its application reads, strictly typed ("false" is not a
    bool); other entries are kept as they are."""

    model_config = ConfigDict(extra="allow")
    rslora: StrictBool = False
    rank: dict[str, PositiveInt] = {}
    alpha: dict[str, Float32] = {}
    replaced: list[str] = []


class MaskSettings(BaseModel):
    """The entries of a mask patch's settings that its application and description read, strictly typed."""

    model_config = ConfigDict(extra="allow")
    shapes: dict[str, list[Annotated[StrictInt, Field(ge=0)]]] | None = None
    values: StrictBool = False
    density: FiniteFloat | None = None


Statistic = Literal["gram", "fisher"]  # what a stats artifact holds: input Gram matrices, or Fisher diagonals


class StatsSettings(BaseModel):
    """What a statistics artifact holds and how it was collected, strictly typed (the merges read it).

    gram: each stored tensor is the input Gram matrix X^T X of the layers whose weights `shared` maps to it (a
      layer not in `shared` has its own, stored under its weight's name), summed over `tokens[name]` tokens;
      `transposed` lists the weights stored in x out (GPT-2's Conv1D).
    fisher: each stored tensor is the diagonal Fisher of the parameter of that name, the mean over `samples`
      examples; `labels` says whether they were sampled from the model or given by the data."""

    model_config = ConfigDict(extra="allow")
    statistic: Statistic
    samples: PositiveInt
    data: str = ""
    tokens: dict[str, Annotated[StrictInt, Field(ge=0)]] = {}
    shared: dict[str, str] = {}
    transposed: list[str] = []
    labels: Literal["sample", "batch"] | None = None
    # the model's files when they were collected (`splice.tensors.digest`): while they are unchanged, a merge need not
    # hash the model's tensors again to know the statistics are its own
    model_digest: str = ""


KIND_SETTINGS: dict[PatchKind, type[BaseModel]] = {
    PatchKind.lora: LoraSettings,
    PatchKind.mask: MaskSettings,
    PatchKind.stats: StatsSettings,
}


class PatchMeta(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format_version: int = FORMAT_VERSION
    kind: PatchKind
    targets: list[str]
    base: BaseFingerprint | None  # None: made elsewhere (a PEFT adapter) with no record of its base
    lineage: list[str] = []
    metrics: dict[str, FiniteFloat] = {}
    description: str = ""
    tags: list[str] = []
    # kind-specific: LoRA rank/alpha/rslora, mask density, ...; finite numbers, nested at most MAX_DEPTH deep
    settings: dict[str, Annotated[Any, Bounded]] = {}
    created: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    @model_validator(mode="after")
    def _kind_settings(self) -> PatchMeta:
        typed = KIND_SETTINGS.get(self.kind)
        if typed is not None:
            try:
                typed.model_validate(self.settings)
            except ValidationError as exc:
                raise ValueError(f"settings.{one_line(exc, self.kind.value)}") from None
        return self
