"""Open a Hugging Face model directory, locally or at any fsspec URL, and read it tensor by tensor.

safetensors headers are parsed and validated up front; tensor bytes are read on demand with one
ranged read each (range requests remotely: `splice.tensors.ranged`, retried, several in flight when the stream starts
them on a `RangeFetcher`), so no file is ever read whole. Locally a tensor of MAPPED_READ_BYTES or more is a private
mapping of its bytes in the shard, its pages read in and mapped before `read` returns: no copy out of the page cache
(on the throughput benchmark that copy was a third of a cold soup's CPU time), its memory back to the system when the
tensor and its views are gone, and writes to it the tensor's own (copy-on-write). Smaller tensors are pread. (A
shard cut short by another program while a mapped tensor is in use ends the process with SIGBUS, as with any mapping;
a pread would have raised.)
`pytorch_model*.bin` checkpoints go through `torch.load(weights_only=True, mmap=True)`.
"""

from __future__ import annotations

import errno
import io
import json
import mmap
import os
import stat
import sys
import threading
from contextlib import suppress
from pathlib import Path
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from splice.errors import CheckpointError, SpliceError, first_line
from splice.tensors.ranged import PendingRead, RangeFetcher, RemoteRange, read_range
from splice.tensors.safetensors import (
    SAFETENSORS_SINGLE,
    TensorInfo,
    read_safetensors_header,
)

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
# config, tokenizer and manifest files are small; one larger than this is corrupt or hostile (e.g. /dev/zero)
MAX_FILE_BYTES = 256 * 1024 * 1024
MAPPED_READ_BYTES = 1 << 20  # below this a mapping's system calls cost more than the copy it saves
# Linux 5.14+: the pages read and mapped in, no copy made (where it is missing, only a hint to read ahead)
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform == "linux" else None)


def recorded_location(location: str | os.PathLike) -> str:
    """A location as a record keeps it (lineage, deployment and health records): a URL as given, a local path
    absolute, since a relative one (`../base`) means nothing to another user or working directory."""
    text = str(location)
    return text if "://" in text else str(Path(text).resolve())


def split_location(
    location: str, storage_options: dict[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, root path) for a local path or an fsspec URL."""
    fs, root = fsspec.core.url_to_fs(str(location), **(storage_options or {}))
    return fs, root.rstrip("/") or root


def _join(root: str, name: str) -> str:
    return f"{root}/{name}"


class Checkpoint:
    """A model's tensors, indexed by name in storage order (shard by shard, by offset within a shard)."""

    def __init__(
        self,
        location: str,
        fs: fsspec.AbstractFileSystem,
        root: str,
        tensors: dict[str, TensorInfo],
        shards: list[str],
        pickled: dict[str, torch.Tensor] | None = None,
    ):
        self.location = location
        self.fs = fs
        self.root = root
        self.tensors = tensors
        self.shards = shards
        self._pickled = pickled
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(
        cls, location: str | os.PathLike, storage_options: dict[str, Any] | None = None, weights_file: str | None = None
    ) -> Checkpoint:
        """A model directory; `weights_file` names one safetensors file in it instead (a patch's tensors)."""
        location = str(location)
        try:
            return cls._open(location, storage_options, weights_file)
        except SpliceError:
            raise
        except Exception as exc:  # fsspec backends raise their own types: botocore, aiohttp, OSError, ...
            raise CheckpointError(f"cannot read {location}: {first_line(exc)}") from exc

    @classmethod
    def files_of(cls, location: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> Checkpoint:
        """A directory as a checkpoint of no tensors: its files (an adapter's, a patch's) for what reads their names,
        sizes and dates (a digest)."""
        fs, root = split_location(str(location), storage_options)
        return cls(str(location), fs, root, {}, [])

    @classmethod
    def _open(
        cls, location: str, storage_options: dict[str, Any] | None, weights_file: str | None = None
    ) -> Checkpoint:
        try:
            fs, root = split_location(location, storage_options)
        except (ImportError, ValueError) as exc:
            raise CheckpointError(f"cannot open {location}: {exc}") from exc
        if not fs.exists(root):
            raise CheckpointError(f"model not found: {location}")
        if not fs.isdir(root):
            raise CheckpointError(f"{location} is a file; give the model directory that holds it")
        present = {os.path.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)}
        if weights_file is not None:
            if weights_file not in present:
                raise CheckpointError(f"{location}: {weights_file} is missing")
            tensors = read_safetensors_header(fs, _join(root, weights_file), location, shard_name=weights_file)
            return cls(location, fs, root, tensors, [weights_file])
        if SAFETENSORS_INDEX in present:
            return cls._open_sharded_safetensors(location, fs, root)
        if SAFETENSORS_SINGLE in present:
            shard = _join(root, SAFETENSORS_SINGLE)
            tensors = read_safetensors_header(fs, shard, location)
            return cls(location, fs, root, tensors, [SAFETENSORS_SINGLE])
        if PICKLE_INDEX in present or PICKLE_SINGLE in present:
            return cls._open_pickled(location, fs, root, present)
        raise CheckpointError(
            f"no weights in {location}: expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX} or {PICKLE_SINGLE}"
        )

    @classmethod
    def _open_sharded_safetensors(cls, location: str, fs: fsspec.AbstractFileSystem, root: str) -> Checkpoint:
        weight_map = _read_weight_map(fs, _join(root, SAFETENSORS_INDEX), location)
        shards = sorted(set(weight_map.values()))
        tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            if not fs.exists(_join(root, shard)):
                raise CheckpointError(f"{location}: shard {shard} named in {SAFETENSORS_INDEX} is missing")
            found = read_safetensors_header(fs, _join(root, shard), location, shard_name=shard)
            for name, info in found.items():
                if weight_map.get(name) != shard:
                    raise CheckpointError(
                        f"{location}: tensor {name} is in {shard} but {SAFETENSORS_INDEX} says "
                        f"{weight_map.get(name, 'nothing about it')}"
                    )
                tensors[name] = info
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(
                f"{location}: {len(missing)} tensors listed in {SAFETENSORS_INDEX} are in no shard, "
                f"e.g. {missing[0]} (expected in {weight_map[missing[0]]})"
            )
        return cls(location, fs, root, tensors, shards)

    @classmethod
    def _open_pickled(cls, location: str, fs: fsspec.AbstractFileSystem, root: str, present: set[str]) -> Checkpoint:
        if PICKLE_INDEX in present:
            shards = sorted(set(_read_weight_map(fs, _join(root, PICKLE_INDEX), location).values()))
        else:
            shards = [PICKLE_SINGLE]
        pickled: dict[str, torch.Tensor] = {}
        tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            state = _load_pickled_shard(fs, _join(root, shard), location, shard)
            for name, tensor in state.items():
                tensors[name] = TensorInfo(name, tensor.dtype, tuple(tensor.shape), shard)
                pickled[name] = tensor
        return cls(location, fs, root, tensors, shards, pickled=pickled)

    # -- reading -------------------------------------------------------------------------------

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def local_byte_range(self, name: str) -> tuple[int, int, int] | None:
        """(open file descriptor, start, end) of a tensor's bytes in a local safetensors shard, for
        in-kernel copies; None when the checkpoint is remote or pickled."""
        if self._pickled is not None or not self.is_local:
            return None
        info = self.tensors[name]
        return self._fd(info.shard), info.start, info.end

    def remote_byte_range(self, name: str, rows: tuple[int, int] | None = None) -> RemoteRange | None:
        """Where a tensor's bytes (rows a..b-1 of dim 0 with `rows=(a, b)`) lie in a remote safetensors shard, for
        reads fetched in concurrent parts; None when the checkpoint is local or pickled."""
        if self._pickled is not None or self.is_local:
            return None
        info = self._info(name)
        shape, start, end = stored_span(info, rows)
        where = f"{self.location}/{info.shard}"
        return RemoteRange(self.fs, _join(self.root, info.shard), start, end, info.dtype, shape, where, name)

    def start_read(
        self, name: str, rows: tuple[int, int] | None = None, fetcher: RangeFetcher | None = None
    ) -> PendingRead:
        """`read`, begun: a remote tensor's bytes requested on `fetcher`'s pool, to be waited for by the result's
        `result()`; any other tensor read now, by `read` (which views override)."""
        span = self.remote_byte_range(name, rows) if fetcher is not None else None
        if span is None or fetcher is None:
            return PendingRead(self.read(name, rows))
        return fetcher.start(span)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor's value on the CPU, in its stored dtype; `rows=(a, b)` reads only rows a..b-1 of dim 0."""
        info = self._info(name)
        if self._pickled is not None:
            tensor = self._pickled[name]
            return tensor if rows is None else tensor[rows[0] : rows[1]]
        span = self.remote_byte_range(name, rows)
        if span is not None:
            return read_range(span)
        shape, start, end = stored_span(info, rows)
        raw = self._mapped(info, start, end) if end - start >= MAPPED_READ_BYTES else None
        if raw is None:
            raw = torch.empty(end - start, dtype=torch.uint8)
            if end > start:
                self._pread_into(info, raw, start)
        return raw.view(info.dtype).reshape(shape)

    def _mapped(self, info: TensorInfo, start: int, end: int) -> torch.Tensor | None:
        """Bytes start..end of the shard as a uint8 tensor over a private mapping of them (the mapping lives as long
        as the tensor and its views), its pages read and mapped now; None where the system cannot map them."""
        page_start = start - start % mmap.ALLOCATIONGRANULARITY
        if (start - page_start) % info.dtype.itemsize:
            return None
        try:
            mapping = mmap.mmap(self._fd(info.shard), end - page_start, offset=page_start, access=mmap.ACCESS_COPY)
        except (OSError, ValueError, OverflowError):
            return None
        if not _populate(mapping):
            mapping.close()
            return None  # pread says what is wrong
        return torch.frombuffer(mapping, dtype=torch.uint8, count=end - start, offset=start - page_start)

    def _info(self, name: str) -> TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.location}: no tensor named {name}")
        return info

    def _pread_into(self, info: TensorInfo, raw: torch.Tensor, start: int, fd: int | None = None) -> None:
        fd = self._fd(info.shard) if fd is None else fd
        view = memoryview(raw.numpy())  # type: ignore[arg-type]  # numpy: a buffer on 3.12+ only
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], start + done)
            if got <= 0:
                raise CheckpointError(f"{self.location}/{info.shard}: file ends inside tensor {info.name}")
            done += got

    def read_into(self, name: str, rows: tuple[int, int] | None, out: torch.Tensor) -> torch.Tensor:
        """`read(name, rows)`, its bytes put in `out` (a contiguous uint8 CPU tensor of exactly their size, e.g. a
        pinned staging buffer): one pread straight into it where the tensor is stored as is in a local safetensors
        shard (`local_byte_range`), else read and copied. Returns `out` viewed as the tensor."""
        info = self._info(name)
        shape, start, end = stored_span(info, rows)
        if out.dtype != torch.uint8 or out.numel() != end - start or not out.is_contiguous():
            raise SpliceError(f"read_into: tensor {name} needs a contiguous uint8 buffer of {end - start} bytes")
        stored = self.local_byte_range(name)
        if stored is None:  # remote, pickled, or computed on read (a view's derived tensor)
            out.copy_(self.read(name, rows).contiguous().reshape(-1).view(torch.uint8))
        elif end > start:
            fd, tensor_start, _ = stored
            self._pread_into(info, out, tensor_start + start - info.start, fd)
        return out.view(info.dtype).reshape(shape)

    def _fd(self, shard: str) -> int:
        with self._lock:
            fd = self._fds.get(shard)
            if fd is None:
                fd = os.open(_join(self.root, shard), os.O_RDONLY)
                if hasattr(os, "posix_fadvise"):
                    # streams read shards front to back: the kernel reads further ahead (3 shards read in turns
                    # from a cold cache: 15-25% faster on the throughput benchmark's disk)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                self._fds[shard] = fd
            return fd

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor, read one by one (for engines that need a whole model)."""
        return {name: self.read(name) for name in self.tensors}

    # -- side files ----------------------------------------------------------------------------

    def files(self) -> list[str]:
        return sorted(os.path.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False))

    def read_file(self, name: str, limit: int = MAX_FILE_BYTES, follow_links: bool = True) -> bytes:
        """A small file of the model directory (config, tokenizer, manifest): a regular file of at most
        `limit` bytes, else CheckpointError. `follow_links=False` refuses a symbolic link too."""
        where = f"{self.location}/{name}"
        if self.is_local:
            path = _join(self.root, name)
            blob = None if follow_links else _hub_cache_blob(self.root, path)
            return _read_local_file(blob or path, limit, follow_links, where)
        info = self.fs.info(_join(self.root, name))
        if info.get("type") != "file" or (info.get("islink") and not follow_links):
            raise CheckpointError(f"{where} is not a regular file")
        data = self.fs.cat_file(_join(self.root, name), start=0, end=limit + 1)
        if len(data) > limit:
            raise CheckpointError(f"{where} is over {limit} bytes, too large for a model's side file")
        return data

    def config(self) -> dict[str, Any] | None:
        if "config.json" not in self.files():
            return None
        return json.loads(self.read_file("config.json"))

    # -- summary -------------------------------------------------------------------------------

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    @property
    def num_parameters(self) -> int:
        return sum(info.numel for info in self.tensors.values())

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"Checkpoint({self.location!r}, {len(self.tensors)} tensors in {len(self.shards)} shards)"


def _populate(mapping: mmap.mmap) -> bool:
    """Read a mapping's pages in now, on the calling thread (the stream's read-ahead: the kernel's reads from a cold
    cache come before the tensor is used); where the system cannot, ask it to start reading them. False when the
    file no longer holds the mapped bytes (cut short since it was opened: touching them would raise SIGBUS)."""
    advise = getattr(mapping, "madvise", None)  # not on Windows
    if advise is None:
        return True
    if MADV_POPULATE_READ is not None:
        try:
            advise(MADV_POPULATE_READ)
            return True
        except OSError as exc:
            if exc.errno == errno.EFAULT:
                return False
        except ValueError:
            pass
    with suppress(OSError, ValueError, AttributeError):
        advise(mmap.MADV_WILLNEED)
    return True


def stored_span(info: TensorInfo, rows: tuple[int, int] | None) -> tuple[tuple[int, ...], int, int]:
    """(shape, first byte, end byte in its shard) of a stored tensor, or of its rows a..b-1 of dim 0 (the byte count
    is right for a pickled tensor too, whose offsets are 0)."""
    if rows is None:
        return info.shape, info.start, info.start + info.nbytes
    row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
    return (rows[1] - rows[0], *info.shape[1:]), info.start + rows[0] * row_bytes, info.start + rows[1] * row_bytes


def _hub_cache_blob(root: str, path: str) -> str | None:
    """The blob a file of a Hugging Face cache snapshot links to, as huggingface_hub lays the cache out
    (models--ORG--NAME/snapshots/<commit>/<file> -> ../../blobs/<hash>): a link that carries nothing from outside
    the model's own files. None for any other file or link."""
    snapshot = Path(root)
    if snapshot.parent.name != "snapshots" or not os.path.islink(path):
        return None
    target = os.path.realpath(path)
    return target if Path(target).parent == Path(os.path.realpath(snapshot.parent.parent / "blobs")) else None


def _read_local_file(path: str, limit: int, follow_links: bool, where: str) -> bytes:
    """At most `limit` bytes of a regular file, opened without blocking (a FIFO) and, unless `follow_links`,
    without following a symbolic link."""
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CheckpointError(f"{where} is a symbolic link; side files must be regular files") from None
        raise CheckpointError(f"cannot read {where}: {first_line(exc)}") from None
    try:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode):
            raise CheckpointError(f"{where} is not a regular file")
        chunks, size = [], 0 if found.st_size <= limit else limit + 1
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise CheckpointError(f"{where} is over {limit} bytes, too large for a model's side file")
    return b"".join(chunks)


def _read_weight_map(fs: fsspec.AbstractFileSystem, path: str, location: str) -> dict[str, str]:
    try:
        weight_map = json.loads(fs.cat_file(path))["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{location}: {os.path.basename(path)} is not a valid index ({exc})") from exc
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{location}: {os.path.basename(path)} has a malformed weight_map")
    for shard in set(weight_map.values()):
        if "/" in shard or shard.startswith("."):
            raise CheckpointError(f"{location}: index names shard {shard!r} outside the model directory")
    return weight_map


def _load_pickled_shard(fs: fsspec.AbstractFileSystem, path: str, location: str, shard: str) -> dict[str, torch.Tensor]:
    try:
        if isinstance(fs, LocalFileSystem):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        else:
            state = torch.load(io.BytesIO(fs.cat_file(path)), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or unsafe pickles
        raise CheckpointError(f"{location}/{shard}: cannot load ({str(exc).splitlines()[0]})") from exc
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(f"{location}/{shard}: is not a state dict of tensors")
    return state
