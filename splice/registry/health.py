"""Patch health: every base a version was deployed or ported onto, with the drift figures and scores measured.

Layout: `patches/<name>/health/<UTC time>-<uuid>.json`, one immutable record per deployment or port, created
exclusively (writers never contend, nothing is rewritten). Records survive `registry rm` of their version: they
are history. Two published studies disagree on whether ported patches decay as the base keeps evolving;
these records make it measurable per patch.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from splice.registry.backends import Backend
from splice.registry.layout import located
from splice.registry.manifest import DIGEST, check_finite, now, parse_model
from splice.registry.refs import RegistryError
from splice.values import FiniteFloat


class DriftSummary(BaseModel):
    """A port's drift report in figures (see splice.adapters.drift for their definitions)."""

    model_config = ConfigDict(extra="forbid")
    verdict: str
    reason: str
    base_change: FiniteFloat | None = None
    base_change_at_least: FiniteFloat | None = None
    cosine: FiniteFloat | None = None
    update_to_change: FiniteFloat | None = None
    tensors: StrictInt = Field(ge=0)
    changed_tensors: StrictInt = Field(ge=0)
    scale: FiniteFloat = 1.0


class HealthRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    event: Literal["deploy", "port"]
    version: int = Field(ge=1)
    digest: str = Field(pattern=DIGEST)
    base: str  # the base's location, as given
    base_digest: str | None = None  # its fingerprint digest, where it was computed (ports; verified deploys)
    base_check: str  # "verified", "drift allowed: ...", "ported: <verdict>"
    drift: DriftSummary | None = None
    score_before: FiniteFloat | None = None  # --eval on the old base with the patch
    score_after: FiniteFloat | None = None  # --eval on the new base with the ported patch
    ported_to: str | None = None  # name@version of the ported patch, when it was pushed
    output: str | None = None  # where the patched model or ported patch was written
    recorded_at: datetime = Field(default_factory=now)


def health_dir(name: str) -> str:
    return f"patches/{name}/health"


def write_record(backend: Backend, name: str, record: HealthRecord) -> str:
    """Store one record (exclusive create under a unique name); returns its path in the registry."""
    data = record.model_dump(mode="json")
    check_finite(data, "the health record")
    rel = f"{health_dir(name)}/{record.recorded_at.strftime('%Y%m%dT%H%M%S.%fZ')}-{uuid.uuid4().hex}.json"
    if not backend.create(rel, (record.model_dump_json(indent=2) + "\n").encode()):
        raise RegistryError(f"{rel} already exists; record it again")
    return rel


def read_records(backend: Backend, url: str, name: str) -> tuple[list[HealthRecord], list[str]]:
    """(every readable record of a name, oldest first; a line for each record that does not validate)."""
    records, problems = [], []
    for entry in sorted(backend.listdir(health_dir(name))):
        if not entry.endswith(".json"):
            continue
        rel = f"{health_dir(name)}/{entry}"
        try:
            records.append(parse_model(HealthRecord, backend.read_small(rel, url), located(url, rel)))
        except FileNotFoundError:
            continue
        except RegistryError as exc:
            problems.append(str(exc))
    return sorted(records, key=lambda r: r.recorded_at), problems
