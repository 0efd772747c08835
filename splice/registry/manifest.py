"""The registry's file formats (pydantic): the registry marker, version manifests, tombstones, alias moves.

A version manifest is immutable: it names its patch and version number, carries the patch's PatchMeta and
a table of its tensors, and a content digest over the canonical JSON of the meta (less its creation time)
and the tensor table's *content* fields, so the same patch pushed twice has the same content digest
wherever its bytes happen to be stored.

A tensor entry (`TensorEntry`) records the tensor's own sha256 (of its raw little-endian C-order bytes),
dtype, shape and byte size, and where its bytes are:

- format 1 and large tensors: `{"digest", "dtype", "shape", "nbytes"}` -- the tensor is a blob of its own,
  `blobs/sha256/<digest[:2]>/<digest>`;
- format 2, small tensors: also `"blob"` (the sha256 of a *pack* blob: the raw bytes of several small
  tensors concatenated) and `"offset"` -- the tensor is bytes offset..offset+nbytes of that pack.

Either way every tensor read is checked against its own sha256, so a damaged pack is attributed to the
tensors (and versions) whose bytes it breaks. `blob` and `offset` are not part of the content digest, so a
format-1 manifest's digest is computed exactly as before.

Registry formats: 1 (every tensor its own blob) and 2 (small tensors packed). Format-2 code reads and
writes format-1 registries (writing them as format 1: no packs, so older splice can still read them);
`init` creates format 2; a format-1 splice refuses a format-2 registry with "upgrade splice".
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime, timezone
from math import prod
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

from splice.adapters.meta import PatchMeta
from splice.registry.refs import RegistryError

if TYPE_CHECKING:
    from splice.adapters.kinds.spec import PatchSize

REGISTRY_FORMAT = "splice-registry"
REGISTRY_FORMAT_VERSION = 2  # 2: small tensors packed into shared blobs (1: one blob per tensor)
MANIFEST_FORMAT_VERSION = 2  # 2: entries may name a pack blob and an offset
HEX64 = r"^[0-9a-f]{64}$"
# safetensors dtype codes this splice reads, with their item sizes (the same codes as splice.tensors.safetensors,
# which imports torch; tests/test_registry_faults.py checks the two agree)
DTYPE_ITEMSIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
MAX_TENSOR_BYTES = 1 << 40  # 1 TiB: a manifest naming a bigger tensor is corrupt, not a patch
MAX_DIMS = 64
DIGEST = r"^sha256:[0-9a-f]{64}$"


def now() -> datetime:
    return datetime.now(timezone.utc)


class RegistryInfo(BaseModel):
    """`registry.json` at the registry's root: marks a location as a registry and says how it is laid out."""

    model_config = ConfigDict(extra="allow")
    format: str = REGISTRY_FORMAT
    format_version: int = REGISTRY_FORMAT_VERSION
    hash: str = "sha256"
    created: datetime = Field(default_factory=now)
    exclusive_create: str = ""  # how versions are created exclusively here: "link", "lock", "if-none-match"


class TensorEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    digest: str = Field(pattern=HEX64)  # sha256 of the raw bytes, as splice.adapters.patch.tensor_sha256 gives it
    dtype: str  # safetensors dtype code: F32, BF16, I64, BOOL, ...
    shape: tuple[Annotated[int, Field(ge=0, le=MAX_TENSOR_BYTES)], ...] = Field(max_length=MAX_DIMS)
    nbytes: int = Field(ge=0, le=MAX_TENSOR_BYTES)
    blob: str | None = Field(default=None, pattern=HEX64)  # a pack holding the bytes; None: a blob of its own
    offset: int = Field(default=0, ge=0)  # where its bytes start in the pack

    @model_validator(mode="after")
    def _own_blob_starts_at_zero(self) -> TensorEntry:
        if self.blob is None and self.offset:
            raise ValueError("an offset needs a pack blob")
        itemsize = DTYPE_ITEMSIZES.get(self.dtype)
        if itemsize is None:
            from splice.version import __version__

            raise ValueError(
                f"dtype {self.dtype!r} is not one splice {__version__} knows "
                f"({', '.join(DTYPE_ITEMSIZES)}): it needs a newer splice; upgrade splice"
            )
        if prod(self.shape) * itemsize != self.nbytes:
            raise ValueError(
                f"shape {list(self.shape)} of {self.dtype} is {prod(self.shape) * itemsize} bytes, "
                f"not nbytes {self.nbytes}"
            )
        return self

    @model_serializer(mode="wrap")
    def _compact(self, handler):
        data = handler(self)
        if self.blob is None:  # a blob of its own: written exactly as format 1 wrote it
            data.pop("blob", None)
            data.pop("offset", None)
        return data

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def blob_digest(self) -> str:
        """The sha256 naming the blob that holds this tensor's bytes."""
        return self.blob or self.digest

    @property
    def packed(self) -> bool:
        return self.blob is not None

    def content(self) -> dict:
        """What the content digest covers: the tensor, not where it is stored."""
        return {"digest": self.digest, "dtype": self.dtype, "shape": list(self.shape), "nbytes": self.nbytes}


class PushStats(BaseModel):
    """What one push moved: blobs (a large tensor's own blob, or a pack of small tensors) written anew vs
    found already stored (content-addressed)."""

    blobs_written: int = 0
    bytes_written: int = 0
    blobs_reused: int = 0
    bytes_reused: int = 0
    seconds: float = 0.0


def content_digest(meta: PatchMeta, tensors: dict[str, TensorEntry]) -> str:
    """sha256 over the canonical JSON of the meta (without `created`) and the tensor table (without storage
    locations: a tensor in a pack has the same digest as one in a blob of its own)."""
    body = {
        "meta": meta.model_dump(mode="json", exclude={"created"}),
        "tensors": {name: entry.content() for name, entry in tensors.items()},
    }
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


class VersionManifest(BaseModel):
    """`patches/<name>/versions/<n>.json`: one immutable version of a patch."""

    model_config = ConfigDict(extra="forbid")
    format_version: int = MANIFEST_FORMAT_VERSION
    name: str
    version: int = Field(ge=1)
    digest: str = Field(pattern=DIGEST)
    meta: PatchMeta
    tensors: dict[str, TensorEntry]
    pushed_at: datetime = Field(default_factory=now)
    message: str = ""

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self.tensors.values())

    @property
    def size(self) -> PatchSize:
        """The values the version holds, and a mask patch's mask bits apart."""
        from splice.adapters.kinds import KINDS  # loads torch: only what shows sizes pays for it

        return KINDS[self.meta.kind].size(
            {name: entry.shape for name, entry in self.tensors.items()}, self.meta.settings
        )

    @property
    def num_parameters(self) -> int:
        """The values the version holds (a mask patch's packed mask bits are not parameters)."""
        return self.size.values

    def computed_digest(self) -> str:
        return content_digest(self.meta, self.tensors)

    def to_json(self) -> bytes:
        return (self.model_dump_json(indent=2) + "\n").encode()


class Tombstone(BaseModel):
    """`patches/<name>/removed/<n>.json`: version n was removed; its number is never handed out again."""

    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1)
    digest: str = ""
    removed_at: datetime = Field(default_factory=now)


Outcome = Literal["published", "withdrawn"]
"""What becomes of a pending version."""


class Decision(BaseModel):
    """`patches/<name>/decided/<n>.json`: what became of pending version n, published or withdrawn. Created
    exclusively by whichever comes first, its push (publishing) or a gc (withdrawing): one outcome, never two."""

    model_config = ConfigDict(extra="forbid")
    outcome: Outcome
    decided_at: datetime = Field(default_factory=now)


class AliasRecord(BaseModel):
    """`patches/<name>/aliases/<alias>/<generation>.json`: one move of an alias; the highest generation is current."""

    model_config = ConfigDict(extra="forbid")
    alias: str
    generation: int = Field(ge=1)
    version: int = Field(ge=1)
    digest: str = Field(pattern=DIGEST)
    moved_at: datetime = Field(default_factory=now)


def non_finite(value: Any, at: str = "") -> str | None:
    """Where a NaN or infinite number sits in nested JSON-like data (dotted), or None if every number is finite."""
    if isinstance(value, float) and not math.isfinite(value):
        return at or "value"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        found = non_finite(item, f"{at}.{key}" if at else str(key))
        if found:
            return found
    return None


def check_finite(data: Any, what: str) -> None:
    """A one-line RegistryError if `data` holds a NaN or infinite number (JSON cannot carry one faithfully)."""
    at = non_finite(data)
    if at is not None:
        raise RegistryError(
            f"{what} has a non-finite number at {at}: the registry stores finite numbers only; "
            "fix the value (or drop it) and push again"
        )


def load_json(data: bytes | str, where: str) -> Any:
    """A registry file's JSON; a one-line RegistryError naming the file for anything else (nested too deep to
    parse included)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise RegistryError(f"{where} is corrupt: not valid JSON ({str(exc).splitlines()[0][:80]})") from None


def parse_model(cls: type[BaseModel], data: bytes, where: str) -> Any:
    """A registry file parsed and validated; a one-line RegistryError naming the file otherwise."""
    loaded = load_json(data, where)
    try:
        return cls.model_validate(loaded)
    except ValidationError as exc:
        first = exc.errors()[0]
        at = ".".join(str(p) for p in first["loc"]) or "file"
        raise RegistryError(f"{where} is corrupt: {at}: {first['msg']}") from None
    except RecursionError:
        raise RegistryError(f"{where} is corrupt: nested too deep") from None
