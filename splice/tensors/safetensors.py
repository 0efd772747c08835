"""The safetensors format, once: dtype codes, header building, and header parsing with every bound checked."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING, Any

import torch

from splice.errors import CheckpointError

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

SAFETENSORS_SINGLE = "model.safetensors"

# safetensors itself refuses headers above 100 MB; a larger one is a corrupt or hostile file.
MAX_HEADER_BYTES = 100 * 1024 * 1024

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_TO_SAFETENSORS = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


def dtype_itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


@dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor lives. `start`/`end` are absolute byte offsets in `shard`."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    shard: str
    start: int = 0
    end: int = 0

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_itemsize(self.dtype)


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * dtype_itemsize(self.dtype)


def header_bytes(tensors: Sequence[OutputTensor], metadata: Mapping[str, str]) -> bytes:
    """A safetensors header (length prefix + JSON padded to 8 bytes) for tensors laid out in order."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for out in tensors:
        header[out.name] = {
            "dtype": DTYPE_TO_SAFETENSORS[out.dtype],
            "shape": list(out.shape),
            "data_offsets": [offset, offset + out.nbytes],
        }
        offset += out.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    return len(raw).to_bytes(8, "little") + raw


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (json.loads would silently keep the last)."""
    found = dict(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(repr(key))
            seen.add(key)
    return found


def _read_header_json(fs: AbstractFileSystem, path: str, where: str) -> tuple[dict, int, int]:
    """(header object, offset where tensor data starts, file size), the length bounded before any read."""
    size = fs.size(path)
    if size < 8:
        raise CheckpointError(f"{where}: truncated file ({size} bytes, not even a header length)")
    (header_len,) = struct.unpack("<Q", fs.cat_file(path, start=0, end=8))
    if header_len > MAX_HEADER_BYTES:
        raise CheckpointError(f"{where}: header claims {header_len} bytes, over the {MAX_HEADER_BYTES} limit")
    if 8 + header_len > size:
        raise CheckpointError(f"{where}: truncated file (header runs past the end of the file)")
    try:
        header = json.loads(fs.cat_file(path, start=8, end=8 + header_len), object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise CheckpointError(
            f"{where}: header names {str(exc)[:80]} twice; the file is corrupt or crafted "
            "(readers would disagree on which entry counts)"
        ) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise CheckpointError(f"{where}: header is not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: header is not a JSON object")
    return header, 8 + header_len, size


def read_safetensors_metadata(
    fs: AbstractFileSystem, path: str, location: str, shard_name: str = SAFETENSORS_SINGLE
) -> dict[str, str]:
    """The `__metadata__` strings of a safetensors file (empty when it has none)."""
    header, _, _ = _read_header_json(fs, path, f"{location}/{shard_name}")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{location}/{shard_name}: __metadata__ is not a JSON object")
    return {str(key): str(value) for key, value in metadata.items()}


def read_safetensors_header(
    fs: AbstractFileSystem, path: str, location: str, shard_name: str = SAFETENSORS_SINGLE
) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header: bounded size, known dtypes, offsets in the file, no overlaps."""
    where = f"{location}/{shard_name}"
    header, data_start, size = _read_header_json(fs, path, where)
    tensors: list[TensorInfo] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not name.isprintable():  # names go into one-line error messages and file listings
            raise CheckpointError(f"{where}: tensor name {name[:80]!r} has control characters")
        tensors.append(_tensor_info_from_header(where, name, entry, data_start, size, shard_name))
    tensors.sort(key=lambda t: (t.start, t.end))
    previous: TensorInfo | None = None
    for info in tensors:
        if previous is not None and info.start < previous.end:
            raise CheckpointError(f"{where}: tensors {previous.name} and {info.name} overlap")
        previous = info
    return {info.name: info for info in tensors}


def _tensor_info_from_header(
    where: str, name: str, entry: Any, data_start: int, size: int, shard_name: str
) -> TensorInfo:
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: tensor {name}: header entry is not an object")
    code = entry.get("dtype")
    dtype = SAFETENSORS_DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise CheckpointError(f"{where}: tensor {name}: unknown dtype {entry.get('dtype')!r}")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < 2**63 for d in shape)):
        raise CheckpointError(f"{where}: tensor {name}: bad shape {shape!r}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(f"{where}: tensor {name}: bad data_offsets {offsets!r}")
    info = TensorInfo(name, dtype, tuple(shape), shard_name, data_start + offsets[0], data_start + offsets[1])
    if info.end - info.start != info.nbytes:
        raise CheckpointError(
            f"{where}: tensor {name}: offsets span {info.end - info.start} bytes but shape {shape} "
            f"of {entry['dtype']} needs {info.nbytes}"
        )
    if info.end > size:
        raise CheckpointError(
            f"{where}: tensor {name}: data runs past the end of the file ({info.end} > {size} bytes); "
            "the file is truncated or corrupt"
        )
    return info
