"""A versioned patch registry on any fsspec location: content-addressed blobs, immutable version manifests,
aliases moved by compare-and-swap.

Layout under the registry's root (registry format 2; see splice.registry.manifest for the file formats)::

    registry.json                                   format marker (written once, by `init`)
    blobs/sha256/<2 hex>/<64 hex>                   immutable blobs, named by the sha256 of their bytes:
                                                      - a large tensor's raw bytes (one blob per tensor), or
                                                      - a pack: the raw bytes of small tensors, concatenated
    patches/<name>/versions/<n>.json                immutable manifests, created exclusively (numbers never reused)
    patches/<name>/removed/<n>.json                 tombstones: version n was removed; n is never handed out again
    patches/<name>/aliases/<alias>/<generation>.json  alias moves; the highest generation is the alias's value
    tmp/                                            local temp files (renamed or linked into place; swept by gc)

Tensors of at least `PACK_BELOW` bytes (1 MiB) get a blob of their own, so they are deduplicated tensor by
tensor across every version and name. Smaller ones (LayerNorm vectors, biases, masks) are packed, in
manifest order, into pack blobs of at most `PACK_BYTES`: a push of hundreds of small tensors costs a handful
of requests, not hundreds, and a pull reads each pack with one (range) request. The manifest records each
packed tensor's pack and offset next to its own sha256, so every tensor read is still verified on its own,
a partial load reads only the byte ranges it needs, and a damaged pack is attributed to the tensors (and
versions) it breaks. Packs are deduplicated whole: pushing the same small tensors again finds the same
pack. Format-1 registries (every tensor its own blob) are read and written as before, without packs.

Every write is atomic: a blob or manifest is either absent or complete. A push writes its blobs first and its
manifest last, so a push that dies leaves no visible version, only unreachable blobs that `gc` removes after a
grace period. Version manifests and alias moves are created with an exclusive create (a hard link locally, an
in-process lock for memory://, a conditional put `If-None-Match: *` on S3); a filesystem that offers none of
these is refused for writing rather than risk handing out a version number twice.

Speed: locally, tensors are read from the patch file in `IO_CHUNK` pieces into reused per-thread buffers,
hashed and written in the same pass (a blob's temp file is written while its name is being computed), on a
few threads (hashlib releases the GIL); a pull writes each verified piece straight to its offset in the
output file. Remote stores get one existence check (HEAD) and one PUT per blob or pack, a few at a time,
and reads of several small ranges batched into one `cat_ranges`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from math import prod
from pathlib import Path

import torch
from fsspec.implementations.local import LocalFileSystem

from splice.adapters.patch import MANIFEST, TENSORS, Patch, PatchMeta, StoredTensors
from splice.errors import SpliceError
from splice.registry.manifest import (
    MANIFEST_FORMAT_VERSION,
    REGISTRY_FORMAT,
    REGISTRY_FORMAT_VERSION,
    AliasRecord,
    PushStats,
    RegistryInfo,
    TensorEntry,
    Tombstone,
    VersionManifest,
    content_digest,
    now,
    parse_model,
)
from splice.registry.refs import Ref, RegistryError, check_alias, check_name, parse_ref
from splice.tensors.checkpoint import Checkpoint, split_location
from splice.tensors.safetensors import DTYPE_TO_SAFETENSORS, SAFETENSORS_DTYPES

ENV_VAR = "SPLICE_REGISTRY"
DEFAULT_LOCATION = "~/.cache/splice/registry"
REGISTRY_FILE = "registry.json"
PACK_BELOW = 1 << 20  # format 2: tensors smaller than this are packed into shared blobs
PACK_BYTES = 32 << 20  # at most this many bytes of small tensors in one pack
SMALL_READ = 1 << 20  # remote reads smaller than this travel in batches (one cat_ranges)
BATCH_BYTES = 8 << 20  # at most this many bytes of small reads in one batch
IO_CHUNK = 1 << 20  # local reads and writes go in pieces of this size (much faster here than huge ones)
_MEMORY_LOCK = threading.Lock()


class AliasConflict(RegistryError):
    """An alias was moved by someone else between reading it and moving it."""


def default_location() -> str:
    """$SPLICE_REGISTRY, or ~/.cache/splice/registry."""
    return os.environ.get(ENV_VAR) or os.path.expanduser(DEFAULT_LOCATION)


def blob_rel(digest: str) -> str:
    return f"blobs/sha256/{digest[:2]}/{digest}"


def _version_rel(name: str, version: int) -> str:
    return f"patches/{name}/versions/{version}.json"


def _removed_rel(name: str, version: int) -> str:
    return f"patches/{name}/removed/{version}.json"


def _alias_rel(name: str, alias: str, generation: int) -> str:
    return f"patches/{name}/aliases/{alias}/{generation}.json"


def _numbers(entries: list[str]) -> set[int]:
    """{n} for the `<n>.json` entries of a versions/removed/alias directory."""
    found = set()
    for entry in entries:
        stem, dot, ext = entry.partition(".")
        if dot and ext == "json" and stem.isascii() and stem.isdigit() and not stem.startswith("0"):
            found.add(int(stem))
    return found


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


_STORAGE_MODULES = {"botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "gcsfs", "adlfs", "requests"}


def _storage_errors(method):
    """Turn the storage backend's own errors (OSError, botocore, aiohttp, ...) into one-line RegistryErrors."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except SpliceError:
            raise
        except Exception as exc:
            if isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in _STORAGE_MODULES:
                raise RegistryError(f"registry {self.url}: {_first_line(exc)}") from exc
            raise

    return wrapper


def _mtime(info: Mapping) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "created", "updated"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
    return None


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill `view` from `fd` at `offset` in IO_CHUNK pieces; the bytes read (fewer at the end of the file)."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:done + IO_CHUNK]], offset + done)
        if got <= 0:
            break
        done += got
    return done


def _write_all(fd: int, view: memoryview, offset: int | None = None) -> None:
    """Write `view` to `fd` (at `offset` with pwrite, else at the file position) in IO_CHUNK pieces."""
    done = 0
    while done < len(view):
        piece = view[done:done + IO_CHUNK]
        done += os.write(fd, piece) if offset is None else os.pwrite(fd, piece, offset + done)


# -- storage backends ----------------------------------------------------------------------------


class _Backend:
    """Relative paths under the registry root; every write atomic; `create` exclusive or nothing."""

    exclusive: str = ""  # how `create` is exclusive; "" when it cannot be

    def __init__(self, fs, root: str):
        self.fs = fs
        self.root = root

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def read(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def read_ranges(self, items: Sequence[tuple[str, int, int]]) -> list[bytes | bytearray | BaseException]:
        """Bytes start..end of each (rel, start, end), fewer where the blob ends sooner; the backend's exception
        (FileNotFoundError for a missing blob) in place of a range that cannot be read. Empty ranges read nothing."""
        out: list[bytes | bytearray | BaseException] = [b""] * len(items)
        rest = [i for i, (_, start, end) in enumerate(items) if end > start]
        if len(rest) == 1:
            rel, start, end = items[rest[0]]
            try:
                out[rest[0]] = self.fs.cat_file(self.path(rel), start=start, end=end)
            except Exception as exc:  # the backend's own type; the caller names the blob
                out[rest[0]] = exc
        elif rest:
            found = self.fs.cat_ranges([self.path(items[i][0]) for i in rest], [items[i][1] for i in rest],
                                       [items[i][2] for i in rest], on_error="return")
            for i, data in zip(rest, found):
                out[i] = data
        return out

    def sizes(self, rels: Sequence[str]) -> list[int | None]:
        paths = [self.path(rel) for rel in rels]
        if getattr(self.fs, "async_impl", False) and len(paths) > 1:
            from fsspec.asyn import sync

            async def gather():
                return await asyncio.gather(*(self.fs._info(p) for p in paths), return_exceptions=True)

            infos = sync(self.fs.loop, gather)
        else:
            infos = []
            for p in paths:
                try:
                    infos.append(self.fs.info(p))
                except FileNotFoundError as exc:
                    infos.append(exc)
        sizes = []
        for info in infos:
            if isinstance(info, FileNotFoundError):
                sizes.append(None)
            elif isinstance(info, BaseException):
                raise info
            else:
                sizes.append(info.get("size"))
        return sizes

    def listdir(self, rel: str) -> list[str]:
        path = self.path(rel)
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return [os.path.basename(str(e).rstrip("/")) for e in entries]

    def put_many(self, blobs: dict[str, bytes | bytearray | memoryview]) -> None:
        """Overwriting writes of content-addressed blobs (each a single atomic put)."""
        if len(blobs) == 1:
            ((rel, data),) = blobs.items()
            self.fs.pipe_file(self.path(rel), bytes(data) if isinstance(data, memoryview) else data)
        elif blobs:
            self.fs.pipe({self.path(rel): bytes(d) if isinstance(d, memoryview) else d for rel, d in blobs.items()})

    def create(self, rel: str, data: bytes) -> bool:
        """Write `rel` only if it does not exist: True if this call created it, False if it already existed."""
        raise RegistryError(f"{type(self.fs).__name__} cannot create files exclusively")

    def delete(self, rel: str) -> None:
        try:
            self.fs.rm_file(self.path(rel))
        except FileNotFoundError:
            pass

    def walk(self, rel: str) -> list[tuple[str, int, float | None]]:
        """(rel path, size, modification time) of every file under `rel`."""
        path = self.path(rel)
        self.fs.invalidate_cache(path)
        try:
            found = self.fs.find(path, detail=True)
        except FileNotFoundError:
            return []
        prefix = self.root.rstrip("/") + "/"
        out = []
        for name, info in found.items():
            name = str(name)
            if info.get("type") == "directory" or not name.startswith(prefix):
                continue
            out.append((name[len(prefix):], int(info.get("size") or 0), _mtime(info)))
        return out

    def is_empty(self) -> bool:
        try:
            return not self.fs.exists(self.root) or not self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return True


class _MemoryBackend(_Backend):
    exclusive = "lock"

    def create(self, rel: str, data: bytes) -> bool:
        with _MEMORY_LOCK:  # memory:// lives in this process: a lock makes check-then-write atomic
            if self.fs.exists(self.path(rel)):
                return False
            self.fs.pipe_file(self.path(rel), data)
            return True


class _S3Backend(_Backend):
    exclusive = "if-none-match"

    def create(self, rel: str, data: bytes) -> bool:
        try:
            self.fs.pipe_file(self.path(rel), data, mode="create")  # PutObject with If-None-Match: *
        except FileExistsError:  # HTTP 412: the key exists
            return False
        return True


class _LocalBackend(_Backend):
    """Plain os calls: temp files in <root>/tmp, renamed (blobs) or hard-linked (exclusive create) into place."""

    exclusive = "link"

    def _tmp(self) -> str:
        tmp = os.path.join(self.root, "tmp")
        os.makedirs(tmp, exist_ok=True)
        return os.path.join(tmp, f"{uuid.uuid4().hex}.tmp")

    def _write_tmp(self, data: bytes | bytearray | memoryview, sync: bool = False) -> str:
        tmp, fd = self.new_temp()
        try:
            _write_all(fd, memoryview(data).cast("B"))
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        return tmp

    def read(self, rel: str) -> bytes:
        with open(self.path(rel), "rb") as handle:
            return handle.read()

    def read_ranges(self, items: Sequence[tuple[str, int, int]]) -> list[bytes | bytearray | BaseException]:
        out: list[bytes | bytearray | BaseException] = []
        for rel, start, end in items:
            if end <= start:
                out.append(b"")
                continue
            try:
                fd = os.open(self.path(rel), os.O_RDONLY)
            except FileNotFoundError as exc:
                out.append(exc)
                continue
            try:
                buf = bytearray(end - start)
                done = _pread_into(fd, memoryview(buf), start)
                if done < len(buf):
                    del buf[done:]
                out.append(buf)
            finally:
                os.close(fd)
        return out

    def new_temp(self) -> tuple[str, int]:
        """(path, fd) of a new temp file under <root>/tmp, open for writing."""
        tmp = self._tmp()
        return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)

    def publish(self, tmp: str, rel: str, size: int) -> bool:
        """Rename a complete temp file into place as blob `rel`, unless a blob of that size is there already
        (then the temp is dropped and the blob made young again, for gc's grace). True if it was written."""
        final = self.path(rel)
        try:
            if os.stat(final).st_size == size:
                os.unlink(tmp)
                with contextlib.suppress(FileNotFoundError):
                    os.utime(final)
                return False
        except FileNotFoundError:
            pass
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.replace(tmp, final)  # atomic: readers see no blob or the whole blob
        return True

    def sizes(self, rels: Sequence[str]) -> list[int | None]:
        sizes = []
        for rel in rels:
            try:
                sizes.append(os.stat(self.path(rel)).st_size)
            except FileNotFoundError:
                sizes.append(None)
        return sizes

    def listdir(self, rel: str) -> list[str]:
        try:
            return os.listdir(self.path(rel))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def put_many(self, blobs: dict[str, bytes | bytearray | memoryview]) -> None:
        for rel, data in blobs.items():
            tmp = self._write_tmp(data)
            final = self.path(rel)
            try:
                os.makedirs(os.path.dirname(final), exist_ok=True)
                os.replace(tmp, final)  # atomic: readers see no blob or the whole blob
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise

    def create(self, rel: str, data: bytes) -> bool:
        tmp = self._write_tmp(data, sync=True)
        final = self.path(rel)
        try:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.link(tmp, final)  # fails if `final` exists; publishes complete content atomically
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            raise RegistryError(f"{self.root}: this filesystem cannot hard-link ({_first_line(exc)}), which the "
                                "registry needs to create versions exclusively; use a local disk") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(rel))

    def touch(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path(rel))

    def walk(self, rel: str) -> list[tuple[str, int, float | None]]:
        out = []
        for directory, _, files in os.walk(self.path(rel)):
            for name in files:
                full = os.path.join(directory, name)
                try:
                    stat = os.stat(full)
                except FileNotFoundError:
                    continue
                out.append((os.path.relpath(full, self.root).replace(os.sep, "/"), stat.st_size, stat.st_mtime))
        return out

    def is_empty(self) -> bool:
        return not os.path.exists(self.root) or (os.path.isdir(self.root) and not os.listdir(self.root))


def _backend(fs, root: str) -> _Backend:
    if isinstance(fs, LocalFileSystem):
        return _LocalBackend(fs, root)
    protocols = set(fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))
    if "memory" in protocols:
        return _MemoryBackend(fs, root)
    if protocols & {"s3", "s3a"}:
        return _S3Backend(fs, root)
    return _Backend(fs, root)


# -- reports ---------------------------------------------------------------------------------------


@dataclass
class GcReport:
    blobs_removed: int = 0
    bytes_freed: int = 0
    temps_removed: int = 0
    stale_versions_removed: int = 0  # manifests of removed versions left behind by an interrupted rm
    blobs_kept_live: int = 0
    blobs_kept_young: int = 0  # unreachable, but younger than the grace period (a push may be in flight)


@dataclass
class BlobProblem:
    digest: str
    path: str
    problem: str  # "missing", "corrupt" or "wrong size"
    detail: str
    versions: list[str] = field(default_factory=list)  # the versions it breaks, as NAME@N
    tensors: list[str] = field(default_factory=list)  # in a damaged pack: the tensors it breaks, "NAME of REF"


@dataclass
class VerifyReport:
    blobs_checked: int = 0
    bytes_checked: int = 0
    versions_checked: int = 0
    problems: list[BlobProblem] = field(default_factory=list)
    bad_manifests: list[str] = field(default_factory=list)  # one line each

    @property
    def ok(self) -> bool:
        return not self.problems and not self.bad_manifests


@dataclass
class TensorDiff:
    name: str
    status: str  # "added", "removed", "changed", "unchanged"
    shape_a: tuple[int, ...] | None = None
    shape_b: tuple[int, ...] | None = None
    dtype_a: str | None = None
    dtype_b: str | None = None
    max_abs_diff: float | None = None
    relative_l2: float | None = None  # ||b - a|| / ||a||


@dataclass
class DiffReport:
    a: str
    b: str
    digest_a: str
    digest_b: str
    meta_changes: list[str]  # PatchMeta fields that differ (creation time aside)
    tensors: list[TensorDiff]

    @property
    def identical(self) -> bool:
        return self.digest_a == self.digest_b


# -- lazy tensors ----------------------------------------------------------------------------------


def _tensor_from(buf: bytes | bytearray, entry: TensorEntry) -> torch.Tensor:
    dtype = SAFETENSORS_DTYPES[entry.dtype]
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=dtype)
    writable = buf if isinstance(buf, bytearray) else bytearray(buf)
    return torch.frombuffer(writable, dtype=torch.uint8).view(dtype).reshape(entry.shape)


class RegistryTensors(Mapping[str, torch.Tensor]):
    """A version's tensors, each read from its blob (or its range of a pack) when looked up and checked
    against its sha256."""

    def __init__(self, registry: Registry, manifest: VersionManifest):
        self.registry = registry
        self.manifest = manifest
        self.shapes = {name: tuple(entry.shape) for name, entry in manifest.tensors.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        entry = self.manifest.tensors.get(name)
        if entry is None:
            raise KeyError(name)
        (buf,) = self.registry._read_verified([(name, entry)], self.manifest.ref)
        return _tensor_from(buf, entry)

    def __iter__(self) -> Iterator[str]:
        return iter(self.manifest.tensors)

    def __len__(self) -> int:
        return len(self.manifest.tensors)


# -- moving tensor bytes ---------------------------------------------------------------------------


_BUFFERS = threading.local()


def _piece_buffer() -> memoryview:
    """This thread's reusable IO_CHUNK buffer (fresh allocations fault their pages in slowly)."""
    view = getattr(_BUFFERS, "view", None)
    if view is None:
        view = _BUFFERS.view = memoryview(bytearray(IO_CHUNK))
    return view


@dataclass
class _Item:
    """One tensor of a patch being pushed: its bytes are `data`, or `nbytes` at `start` in the file `fd`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    data: memoryview | None = None
    fd: int | None = None
    start: int = 0


class _Source:
    """A patch's tensors as raw bytes, without a copy where possible: a local patch file is read in
    IO_CHUNK pieces into a reused per-thread buffer; any other tensor is viewed in place."""

    def __init__(self, patch: Patch):
        self.tensors = patch.tensors
        self.infos = None
        stored = getattr(patch.tensors, "stored", None)
        if (isinstance(patch.tensors, StoredTensors) and isinstance(stored, Checkpoint) and stored.is_local
                and getattr(stored, "_pickled", None) is None):
            self.infos, self.root = stored.tensors, stored.root
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def sizes(self, names: Sequence[str]) -> list[int]:
        """Each tensor's byte size, without reading it (an fp32 estimate where the source cannot say)."""
        if self.infos is not None:
            return [self.infos[n].nbytes for n in names]
        if isinstance(self.tensors, RegistryTensors):
            return [self.tensors.manifest.tensors[n].nbytes for n in names]
        shapes = getattr(self.tensors, "shapes", None)
        if shapes is not None:
            return [4 * prod(shapes[n]) for n in names]
        return [t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
                for t in (self.tensors[n] for n in names)]

    def open(self, name: str) -> _Item:
        if self.infos is not None:
            info = self.infos[name]
            with self._lock:
                fd = self._fds.get(info.shard)
                if fd is None:
                    fd = self._fds[info.shard] = os.open(os.path.join(self.root, info.shard), os.O_RDONLY)
            return _Item(name, DTYPE_TO_SAFETENSORS[info.dtype], tuple(info.shape), info.nbytes, fd=fd,
                         start=info.start)
        tensor = self.tensors[name]
        if not isinstance(tensor, torch.Tensor):
            raise RegistryError(f"patch tensor {name} is a {type(tensor).__name__}, not a tensor")
        code = DTYPE_TO_SAFETENSORS.get(tensor.dtype)
        if code is None:
            raise RegistryError(f"patch tensor {name} has dtype {tensor.dtype}, which safetensors cannot store")
        data = memoryview(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
        return _Item(name, code, tuple(tensor.shape), data.nbytes, data=data)

    def pieces(self, item: _Item) -> Iterator[memoryview]:
        """The tensor's bytes in IO_CHUNK pieces; a piece is valid until the next one is asked for."""
        if item.data is not None:
            for start in range(0, item.nbytes, IO_CHUNK):
                yield item.data[start:start + IO_CHUNK]
            return
        buf = _piece_buffer()
        done = 0
        while done < item.nbytes:
            got = os.preadv(item.fd, [buf[:min(IO_CHUNK, item.nbytes - done)]], item.start + done)
            if got <= 0:
                raise RegistryError(f"patch file ends inside tensor {item.name}")
            yield buf[:got]
            done += got

    def read_all(self, item: _Item) -> bytearray | memoryview:
        """The tensor's bytes in one buffer (for a remote put)."""
        if item.data is not None:
            return item.data
        buf = bytearray(item.nbytes)
        if _pread_into(item.fd, memoryview(buf), item.start) != item.nbytes:
            raise RegistryError(f"patch file ends inside tensor {item.name}")
        return buf

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


@dataclass
class _Read:
    """One read of a blob: bytes start..end, covering the tensors (index, name, entry) stored there."""

    rel: str
    start: int
    end: int
    members: list[tuple[int, str, TensorEntry]]

    @property
    def own(self) -> bool:
        """A blob of one tensor's own (read one byte past its end, to notice a blob that is too long)."""
        return len(self.members) == 1 and not self.members[0][2].packed


def _plan_reads(items: Sequence[tuple[str, TensorEntry]]) -> list[_Read]:
    """One read per large tensor's blob; one per pack, spanning just the ranges of it that are needed.
    Empty tensors need no read at all."""
    reads: list[_Read] = []
    packs: dict[str, _Read] = {}
    for index, (name, entry) in enumerate(items):
        if entry.nbytes == 0:
            continue
        if not entry.packed:
            reads.append(_Read(blob_rel(entry.digest), 0, entry.nbytes + 1, [(index, name, entry)]))
            continue
        read = packs.get(entry.blob)
        end = entry.offset + entry.nbytes
        if read is None:
            read = packs[entry.blob] = _Read(blob_rel(entry.blob), entry.offset, end, [])
            reads.append(read)
        read.start, read.end = min(read.start, entry.offset), max(read.end, end)
        read.members.append((index, name, entry))
    # a pack read spans from its first to its last needed byte: split it where a gap of unneeded bytes is big
    out: list[_Read] = []
    for read in reads:
        if read.own or len(read.members) == 1:
            out.append(read)
            continue
        members = sorted(read.members, key=lambda m: m[2].offset)
        current = _Read(read.rel, members[0][2].offset, members[0][2].offset, [])
        for member in members:
            entry = member[2]
            if current.members and entry.offset - current.end > SMALL_READ:
                out.append(current)
                current = _Read(read.rel, entry.offset, entry.offset, [])
            current.end = max(current.end, entry.offset + entry.nbytes)
            current.members.append(member)
        out.append(current)
    return out


def _batches(reads: list[_Read], batch: bool) -> list[list[_Read]]:
    """Reads grouped into jobs: each large one alone; consecutive small ones together when `batch`."""
    jobs: list[list[_Read]] = []
    current: list[_Read] = []
    current_bytes = 0
    for read in reads:
        size = read.end - read.start
        if not batch or size >= SMALL_READ:
            jobs.append([read])
            continue
        if current and (current_bytes + size > BATCH_BYTES or len(current) >= 256):
            jobs.append(current)
            current, current_bytes = [], 0
        current.append(read)
        current_bytes += size
    if current:
        jobs.append(current)
    return jobs


# -- the registry ----------------------------------------------------------------------------------


class Registry:
    """A patch registry at `url` (a local directory or any fsspec URL). Open one with `Registry.open`,
    create one with `Registry.init`."""

    def __init__(self, url: str, backend: _Backend, info: RegistryInfo):
        self.url = url
        self._backend = backend
        self.info = info
        # format 1 registries stay format 1 (every tensor its own blob), so an older splice can still read them
        self.pack_below = PACK_BELOW if info.format_version >= 2 else 0

    # -- opening ---------------------------------------------------------------------------------

    @staticmethod
    def _connect(url: str | os.PathLike | None, storage_options: dict | None) -> tuple[str, _Backend]:
        location = os.fspath(url) if url is not None else default_location()
        if not location:
            raise RegistryError("registry location is empty: give --registry URL or set SPLICE_REGISTRY")
        try:
            fs, root = split_location(location, storage_options)
        except (ImportError, ValueError, TypeError) as exc:
            raise RegistryError(f"cannot open registry {location}: {_first_line(exc)}") from None
        return location, _backend(fs, root)

    @classmethod
    def open(cls, url: str | os.PathLike | None = None, storage_options: dict | None = None) -> Registry:
        """An existing registry (made by `init`); `url` defaults to $SPLICE_REGISTRY or ~/.cache/splice/registry."""
        location, backend = cls._connect(url, storage_options)
        try:
            raw = backend.read(REGISTRY_FILE)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise RegistryError(f"no registry at {location}: create one with `splice registry init "
                                f"--registry {location}`") from None
        except Exception as exc:
            raise RegistryError(f"cannot open registry {location}: {_first_line(exc)}") from exc
        info = parse_model(RegistryInfo, raw, f"{location}/{REGISTRY_FILE}")
        if info.format != REGISTRY_FORMAT:
            raise RegistryError(f"{location}/{REGISTRY_FILE} is not a splice registry marker (format "
                                f"{info.format!r})")
        if info.format_version > REGISTRY_FORMAT_VERSION:
            raise RegistryError(f"registry {location} has format {info.format_version}, newer than this splice "
                                f"({REGISTRY_FORMAT_VERSION}); upgrade splice")
        return cls(location, backend, info)

    @classmethod
    def init(cls, url: str | os.PathLike | None = None, storage_options: dict | None = None) -> Registry:
        """Create a registry (an empty directory or a new prefix); opening it if it already exists."""
        location, backend = cls._connect(url, storage_options)
        try:
            with contextlib.suppress(RegistryError):
                if backend.sizes([REGISTRY_FILE])[0] is not None:
                    return cls.open(location, storage_options)
            if not backend.exclusive:
                raise RegistryError(cls._no_exclusive_message(location, backend))
            if not backend.is_empty():
                raise RegistryError(f"{location} exists and is not empty; a registry needs a new or empty "
                                    "location")
            cls._probe_exclusive_create(location, backend)
            info = RegistryInfo(exclusive_create=backend.exclusive)
            backend.create(REGISTRY_FILE, (info.model_dump_json(indent=2) + "\n").encode())
        except SpliceError:
            raise
        except Exception as exc:
            raise RegistryError(f"cannot create registry {location}: {_first_line(exc)}") from exc
        return cls.open(location, storage_options)

    @staticmethod
    def _no_exclusive_message(location: str, backend: _Backend) -> str:
        return (f"registry {location}: splice cannot create files exclusively on {type(backend.fs).__name__}, "
                "so version numbers could be handed out twice; it writes registries only to local directories, "
                "memory:// and S3")

    @staticmethod
    def _probe_exclusive_create(location: str, backend: _Backend) -> None:
        """An object store that ignores conditional writes would let two pushes take one version number."""
        if isinstance(backend, _LocalBackend):
            return
        probe = f"tmp/probe-{uuid.uuid4().hex}"
        try:
            first = backend.create(probe, b"1")
            second = backend.create(probe, b"2")
        finally:
            backend.delete(probe)
        if not first or second:
            raise RegistryError(f"registry {location}: this store does not honour exclusive creates "
                                "(If-None-Match), so version numbers could be handed out twice; splice will "
                                "not keep a registry there")

    def _require_writable(self) -> None:
        if not self._backend.exclusive:
            raise RegistryError(self._no_exclusive_message(self.url, self._backend))

    def __repr__(self) -> str:
        return f"Registry({self.url!r})"

    # -- reading manifests -----------------------------------------------------------------------

    def _where(self, rel: str) -> str:
        return f"{self.url.rstrip('/')}/{rel}"

    def _read_json(self, cls, rel: str):
        return parse_model(cls, self._backend.read(rel), self._where(rel))

    def _read_manifest(self, name: str, version: int) -> VersionManifest:
        rel = _version_rel(name, version)
        manifest: VersionManifest = self._read_json(VersionManifest, rel)
        if manifest.name != name or manifest.version != version:
            raise RegistryError(f"{self._where(rel)} is corrupt: it describes {manifest.ref}")
        if manifest.format_version > MANIFEST_FORMAT_VERSION:
            raise RegistryError(f"{self._where(rel)} has manifest format {manifest.format_version}, newer than "
                                f"this splice ({MANIFEST_FORMAT_VERSION}); upgrade splice")
        if manifest.computed_digest() != manifest.digest:
            raise RegistryError(f"{self._where(rel)} is corrupt: its content does not match its digest "
                                f"{manifest.digest}")
        return manifest

    def _version_numbers(self, name: str) -> tuple[set[int], set[int]]:
        """(live versions, removed versions) of a name."""
        removed = _numbers(self._backend.listdir(f"patches/{name}/removed"))
        stored = _numbers(self._backend.listdir(f"patches/{name}/versions"))
        return stored - removed, removed

    def _require_name(self, name: str) -> tuple[set[int], set[int]]:
        live, removed = self._version_numbers(name)
        if not live and not removed:
            raise RegistryError(f"no patch named {name} in registry {self.url}; `splice registry ls` lists them")
        return live, removed

    @staticmethod
    def _span(numbers: set[int]) -> str:
        return f"latest is {max(numbers)}" if numbers else "every version was removed"

    def _version(self, name: str, version: int) -> VersionManifest:
        if self._backend.sizes([_removed_rel(name, version)])[0] is not None:
            raise RegistryError(f"{name}@{version} was removed; its number is not reused")
        try:
            return self._read_manifest(name, version)
        except FileNotFoundError:
            live, _ = self._require_name(name)
            raise RegistryError(f"{name} has no version {version} ({self._span(live)})") from None

    @_storage_errors
    def resolve(self, ref: str | Ref) -> VersionManifest:
        """The version a reference names: `name` (latest), `name@3`, `name@prod`, `name@sha256:...`."""
        parsed = ref if isinstance(ref, Ref) else parse_ref(ref)
        name = parsed.name
        if parsed.version is not None:
            return self._version(name, parsed.version)
        if parsed.alias is not None:
            record = self._alias_current(name, parsed.alias)
            if record is None:
                self._require_name(name)
                known = sorted(self.aliases(name))
                raise RegistryError(f"{name} has no alias {parsed.alias} (aliases: {', '.join(known) or 'none'})")
            try:
                return self._version(name, record.version)
            except RegistryError as exc:
                raise RegistryError(f"alias {parsed.alias} of {name} points to version {record.version}: {exc}; "
                                    "move it with `splice registry tag`") from None
        live, _ = self._require_name(name)
        if parsed.digest is not None:
            for version in sorted(live, reverse=True):
                manifest = self._read_manifest(name, version)
                if manifest.digest == parsed.digest:
                    return manifest
            raise RegistryError(f"{name} has no version with content digest {parsed.digest}")
        if not live:
            raise RegistryError(f"{name}: every version was removed")
        return self._read_manifest(name, max(live))

    @_storage_errors
    def names(self) -> list[str]:
        """Every patch name with at least one version, live or removed."""
        return sorted(n for n in self._backend.listdir("patches") if not n.startswith("."))

    @_storage_errors
    def versions(self, name: str) -> list[VersionManifest]:
        """The live versions of a name, oldest first."""
        check_name(name)
        live, _ = self._require_name(name)
        return [self._read_manifest(name, v) for v in sorted(live)]

    def latest_version(self, name: str) -> int | None:
        live, _ = self._version_numbers(check_name(name))
        return max(live) if live else None

    # -- aliases -----------------------------------------------------------------------------------

    def _alias_generations(self, name: str, alias: str) -> set[int]:
        return _numbers(self._backend.listdir(f"patches/{name}/aliases/{alias}"))

    def _alias_current(self, name: str, alias: str) -> AliasRecord | None:
        generations = self._alias_generations(name, alias)
        if not generations:
            return None
        return self._read_json(AliasRecord, _alias_rel(name, alias, max(generations)))

    @_storage_errors
    def aliases(self, name: str) -> dict[str, AliasRecord]:
        """alias -> its current value."""
        check_name(name)
        found = {}
        for alias in sorted(self._backend.listdir(f"patches/{name}/aliases")):
            record = self._alias_current(name, alias)
            if record is not None:
                found[alias] = record
        return found

    @_storage_errors
    def alias_history(self, name: str, alias: str) -> list[AliasRecord]:
        """Every move of an alias, oldest first."""
        check_name(name)
        check_alias(alias)
        return [self._read_json(AliasRecord, _alias_rel(name, alias, g))
                for g in sorted(self._alias_generations(name, alias))]

    @_storage_errors
    def tag(self, name: str, alias: str, version: int, *, expect_generation: int | None = None) -> AliasRecord:
        """Point `alias` at `version` by compare-and-swap: read generation g, exclusively create g+1.
        `expect_generation`: the generation the caller last saw (0: the alias does not exist yet); a move
        from any other generation, or one that loses a race, raises AliasConflict."""
        self._require_writable()
        check_name(name)
        check_alias(alias)
        manifest = self._version(name, int(version))
        current = self._alias_current(name, alias)
        generation = current.generation if current else 0
        if expect_generation is not None and expect_generation != generation:
            raise self._conflict(name, alias, current)
        if expect_generation is not None:
            generation = expect_generation
        record = AliasRecord(alias=alias, generation=generation + 1, version=manifest.version,
                             digest=manifest.digest)
        if not self._backend.create(_alias_rel(name, alias, record.generation),
                                    (record.model_dump_json(indent=2) + "\n").encode()):
            raise self._conflict(name, alias, self._alias_current(name, alias))
        return record

    @staticmethod
    def _conflict(name: str, alias: str, current: AliasRecord | None) -> AliasConflict:
        now_at = f"now version {current.version}" if current else "now unset"
        return AliasConflict(f"alias {alias} of {name} was moved by someone else ({now_at}); re-run to move it again")

    # -- push ---------------------------------------------------------------------------------------

    @_storage_errors
    def push(self, name: str, patch: Patch | str | os.PathLike, *, alias: str | None = None, message: str = "",
             base: str | os.PathLike | None = None) -> VersionManifest:
        """Store a patch (a Patch, a splice patch directory or a PEFT adapter directory) as the next version of
        `name`. Blobs are written first and the manifest last, so a push that dies leaves no visible version.
        A patch without a base record needs `base` (the model it was made on) to fingerprint it."""
        self._require_writable()
        check_name(name)
        if alias is not None:
            check_alias(alias)
        started = time.perf_counter()
        loaded, meta = self._prepare(patch, base)
        table, stats = self._store_tensors(loaded)
        digest = content_digest(meta, table)
        pushed_at = now()
        manifest_format = MANIFEST_FORMAT_VERSION if any(e.packed for e in table.values()) else 1

        def body(version: int) -> bytes:
            return VersionManifest(format_version=manifest_format, name=name, version=version, digest=digest,
                                   meta=meta, tensors=table, pushed_at=pushed_at, message=message).to_json()

        version = self._create_version(name, body)
        manifest = VersionManifest.model_validate_json(body(version))
        stats.seconds = time.perf_counter() - started
        manifest._push_stats = stats
        if alias is not None:
            try:
                self.tag(name, alias, version)
            except RegistryError as exc:
                raise RegistryError(f"pushed {manifest.ref}, but did not move alias {alias}: {exc}") from None
        return manifest

    @staticmethod
    def _prepare(patch: Patch | str | os.PathLike, base: str | os.PathLike | None) -> tuple[Patch, PatchMeta]:
        from splice.adapters.compose import patch_steps
        from splice.adapters.fingerprint import fingerprint_base
        from splice.adapters.sources import load_patch
        from splice.tensors.checkpoint import Checkpoint

        checkpoint = Checkpoint.open(base) if base is not None else None
        try:
            loaded = load_patch(patch, base=checkpoint)  # the base lets a PEFT adapter's names be mapped
            meta = loaded.meta
            if meta.base is None:
                if checkpoint is None:
                    raise RegistryError("this patch has no record of the base model it was made on (a PEFT "
                                        "adapter?); pass --base MODEL_DIR (base=...) so the registry can fingerprint "
                                        "the base tensors it touches")
                meta = meta.model_copy(update={"base": fingerprint_base(checkpoint, patch_steps(loaded).keys())})
            elif checkpoint is not None:
                loaded.check_base(checkpoint)
        finally:
            if checkpoint is not None:
                checkpoint.close()
        return loaded, meta

    def _store_tensors(self, patch: Patch) -> tuple[dict[str, TensorEntry], PushStats]:
        """Hash every tensor and write the blobs and packs not yet stored, on a few threads. Locally a large
        tensor is hashed and written to its temp file in the same pass over its bytes."""
        names = list(patch.tensors)
        source = _Source(patch)
        local = isinstance(self._backend, _LocalBackend)
        jobs: list[tuple[str, list[int]]] = []  # ("pack", indices) or ("own", indices)
        pack: list[int] = []
        pack_bytes = 0
        own: list[int] = []
        own_bytes = 0
        for index, size in enumerate(source.sizes(names)):
            if size < self.pack_below:
                if pack and pack_bytes + size > PACK_BYTES:
                    jobs.append(("pack", pack))
                    pack, pack_bytes = [], 0
                pack.append(index)
                pack_bytes += size
            elif local or size >= SMALL_READ:
                jobs.append(("own", [index]))
            else:  # format 1 on a remote store: small blobs of their own, checked and put in batches
                if own and (own_bytes + size > BATCH_BYTES or len(own) >= 256):
                    jobs.append(("own", own))
                    own, own_bytes = [], 0
                own.append(index)
                own_bytes += size
        jobs += [("pack", pack)] if pack else []
        jobs += [("own", own)] if own else []
        lock = threading.Lock()
        stats = PushStats()
        seen_stored = threading.Event()  # a blob was already stored: hash before writing from then on

        def count(written: int, written_bytes: int, reused: int, reused_bytes: int) -> None:
            with lock:
                stats.blobs_written += written
                stats.bytes_written += written_bytes
                stats.blobs_reused += reused
                stats.bytes_reused += reused_bytes

        def put(blobs: list[tuple[str, int, bytes | bytearray | memoryview]]) -> None:
            """Write the (rel, size, bytes) blobs not already stored at that size."""
            sizes = self._backend.sizes([rel for rel, _, _ in blobs])
            missing: dict[str, bytes | bytearray | memoryview] = {}
            reused = reused_bytes = 0
            for (rel, size, data), stored in zip(blobs, sizes):
                if stored == size:
                    reused += 1
                    reused_bytes += size
                    if local:
                        self._backend.touch(rel)  # a reused orphan is young again: gc's grace protects it
                elif rel not in missing:
                    missing[rel] = data  # absent, or the wrong size (a damaged blob: write it again)
            self._backend.put_many(missing)
            count(len(missing), sum(len(memoryview(d).cast("B")) for d in missing.values()), reused, reused_bytes)

        def stream_local(item: _Item) -> TensorEntry:
            """Hash a large tensor while writing it to a temp file, then rename it into place (or drop it if
            the blob is stored); once a blob turned out stored, hash first and write only what is missing."""
            backend: _LocalBackend = self._backend  # type: ignore[assignment]
            digest = None
            if seen_stored.is_set():
                hasher = hashlib.sha256()
                for piece in source.pieces(item):
                    hasher.update(piece)
                digest = hasher.hexdigest()
                if backend.sizes([blob_rel(digest)])[0] == item.nbytes:
                    backend.touch(blob_rel(digest))
                    count(0, 0, 1, item.nbytes)
                    return TensorEntry(digest=digest, dtype=item.dtype, shape=item.shape, nbytes=item.nbytes)
            tmp, fd = backend.new_temp()
            try:
                try:
                    hasher = hashlib.sha256()
                    for piece in source.pieces(item):
                        hasher.update(piece)
                        _write_all(fd, piece)
                finally:
                    os.close(fd)
                if digest is not None and hasher.hexdigest() != digest:
                    raise RegistryError(f"patch tensor {item.name} changed while it was being pushed")
                digest = hasher.hexdigest()
                written = backend.publish(tmp, blob_rel(digest), item.nbytes)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            if written:
                count(1, item.nbytes, 0, 0)
            else:
                seen_stored.set()
                count(0, 0, 1, item.nbytes)
            return TensorEntry(digest=digest, dtype=item.dtype, shape=item.shape, nbytes=item.nbytes)

        def run_own(job: list[int]) -> list[TensorEntry]:
            items = [source.open(names[i]) for i in job]
            if local and len(items) == 1 and items[0].data is None:
                return [stream_local(items[0])]
            blobs, entries = [], []
            for item in items:
                data = source.read_all(item)
                digest = hashlib.sha256(data).hexdigest()
                entries.append(TensorEntry(digest=digest, dtype=item.dtype, shape=item.shape, nbytes=item.nbytes))
                blobs.append((blob_rel(digest), item.nbytes, data))
            put(blobs)
            return entries

        def run_pack(job: list[int]) -> list[TensorEntry]:
            buf = bytearray()
            members = []
            for index in job:
                item = source.open(names[index])
                hasher = hashlib.sha256()
                offset = len(buf)
                for piece in source.pieces(item):
                    hasher.update(piece)
                    buf += piece
                members.append((item, hasher.hexdigest(), offset))
            blob = hashlib.sha256(buf).hexdigest()
            put([(blob_rel(blob), len(buf), buf)])
            return [TensorEntry(digest=digest, dtype=item.dtype, shape=item.shape, nbytes=item.nbytes,
                                blob=None if digest == blob else blob, offset=0 if digest == blob else offset)
                    for item, digest, offset in members]

        workers = 16 if not local else max(2, min(4, (os.cpu_count() or 2) + 1))
        entries: dict[str, TensorEntry] = {}
        try:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="splice-push") as pool:
                futures = [(job, pool.submit(run_pack if kind == "pack" else run_own, job)) for kind, job in jobs]
                try:
                    for job, future in futures:
                        for index, entry in zip(job, future.result()):
                            entries[names[index]] = entry
                except BaseException:
                    for _, future in futures:
                        future.cancel()
                    raise
        finally:
            source.close()
        return {name: entries[name] for name in names}, stats

    def _create_version(self, name: str, body: Callable[[int], bytes]) -> int:
        """Exclusively create the next version's manifest; on a conflict take the next number and retry."""
        floor = 0
        for attempt in range(1000):
            live, removed = self._version_numbers(name)
            version = max(max(live | removed, default=0), floor) + 1
            if self._backend.create(_version_rel(name, version), body(version)):
                return version
            floor = version  # someone else took it: never try it again, even if a listing lags
            time.sleep(random.uniform(0, 0.002 * min(attempt + 1, 20)))
        raise RegistryError(f"could not take a version number for {name} after 1000 attempts; too many concurrent "
                            "pushes")

    # -- reading tensors ---------------------------------------------------------------------------

    def _tensor_where(self, read: _Read, name: str, entry: TensorEntry, ref: str) -> str:
        where = f"blob {self._where(read.rel)} (tensor {name} of {ref}"
        if entry.packed:
            where += f", bytes {entry.offset}..{entry.offset + entry.nbytes} of the pack"
        return where + ")"

    def _checked(self, read: _Read, data: bytes | bytearray | BaseException, ref: str
                 ) -> list[tuple[int, str, TensorEntry, memoryview]]:
        """Each member of a read with its bytes, hash-checked; a RegistryError naming the blob and tensor."""
        out = []
        for index, name, entry in read.members:
            where = self._tensor_where(read, name, entry, ref)
            if isinstance(data, FileNotFoundError):
                raise RegistryError(f"{where} is missing; run `splice registry verify`")
            if isinstance(data, BaseException):
                raise RegistryError(f"{where}: cannot read it: {_first_line(data)}") from data
            view = memoryview(data)[entry.offset - read.start:entry.offset - read.start + entry.nbytes]
            if read.own and len(data) != entry.nbytes:
                raise RegistryError(f"{where} is corrupt: {len(data)}{'+' if len(data) > entry.nbytes else ''} "
                                    f"bytes, expected {entry.nbytes}; run `splice registry verify`")
            if len(view) != entry.nbytes:
                raise RegistryError(f"{where} is corrupt: the pack ends {entry.nbytes - len(view)} bytes before "
                                    "the tensor does; run `splice registry verify`")
            actual = hashlib.sha256(view).hexdigest()
            if actual != entry.digest:
                what = "its name" if read.own else "the tensor's sha256"
                raise RegistryError(f"{where} is corrupt: its bytes hash to {actual[:12]}..., not {what}; "
                                    "run `splice registry verify`")
            out.append((index, name, entry, view))
        return out

    def _read_verified(self, items: Sequence[tuple[str, TensorEntry]], ref: str) -> list[bytes | bytearray]:
        """The bytes of each (tensor name, entry), hash-checked, reading only the byte ranges they occupy."""
        reads = _plan_reads(items)
        results = self._backend.read_ranges([(r.rel, r.start, r.end) for r in reads])
        out: list[bytes | bytearray] = [b""] * len(items)
        for read, data in zip(reads, results):
            for index, _, _, view in self._checked(read, data, ref):
                out[index] = data if read.own else bytearray(view)
        return out

    def _stream_own_local(self, read: _Read, ref: str, out_fd: int, out_offset: int) -> None:
        """A large blob copied to `out_fd` at `out_offset` in pieces, hashed on the way; a RegistryError
        (and partly written bytes, which the caller discards) if it is not what the manifest says."""
        _, name, entry = read.members[0]
        where = self._tensor_where(read, name, entry, ref)
        try:
            fd = os.open(self._backend.path(read.rel), os.O_RDONLY)
        except FileNotFoundError:
            raise RegistryError(f"{where} is missing; run `splice registry verify`") from None
        try:
            size = os.fstat(fd).st_size
            if size != entry.nbytes:
                raise RegistryError(f"{where} is corrupt: {size} bytes, expected {entry.nbytes}; run "
                                    "`splice registry verify`")
            buf = _piece_buffer()
            hasher = hashlib.sha256()
            done = 0
            while done < entry.nbytes:
                got = os.preadv(fd, [buf[:min(IO_CHUNK, entry.nbytes - done)]], done)
                if got <= 0:
                    raise RegistryError(f"{where} is corrupt: it ends at byte {done}, expected {entry.nbytes}")
                hasher.update(buf[:got])
                _write_all(out_fd, buf[:got], out_offset + done)
                done += got
        finally:
            os.close(fd)
        actual = hasher.hexdigest()
        if actual != entry.digest:
            raise RegistryError(f"{where} is corrupt: its bytes hash to {actual[:12]}..., not its name; "
                                "run `splice registry verify`")

    def _fetch_into(self, manifest: VersionManifest, out_fd: int, offsets: list[int]) -> None:
        """Every tensor of a version, hash-checked, written into `out_fd` at its offset, on a few threads."""
        items = list(manifest.tensors.items())
        local = isinstance(self._backend, _LocalBackend)
        jobs = _batches(_plan_reads(items), batch=not local)

        def run(job: list[_Read]) -> None:
            if local and len(job) == 1 and job[0].own and job[0].end - job[0].start > IO_CHUNK:
                self._stream_own_local(job[0], manifest.ref, out_fd, offsets[job[0].members[0][0]])
                return
            results = self._backend.read_ranges([(r.rel, r.start, r.end) for r in job])
            for read, data in zip(job, results):
                for index, _, _, view in self._checked(read, data, manifest.ref):
                    _write_all(out_fd, view, offsets[index])

        workers = 16 if not local else max(2, min(4, (os.cpu_count() or 2) + 1))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="splice-pull") as pool:
            futures = [pool.submit(run, job) for job in jobs]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

    @_storage_errors
    def load(self, ref: str | Ref) -> Patch:
        """The patch a reference names; its tensors are read (and hash-checked) only when looked up."""
        manifest = self.resolve(ref)
        return Patch(RegistryTensors(self, manifest), manifest.meta.model_copy(deep=True))

    @_storage_errors
    def pull(self, ref: str | Ref, out: str | os.PathLike, force: bool = False) -> Path:
        """Write the version a reference names as a splice patch directory (patch.json + tensors.safetensors,
        byte for byte what `Patch.save` writes), every tensor hash-checked before the directory appears at
        `out`; nothing appears there unless all of them are right."""
        from splice.tensors.safetensors import OutputTensor, header_bytes
        from splice.tensors.writer import ensure_output_free, staged_output

        ensure_output_free(out, force)
        manifest = self.resolve(ref)
        outputs = [OutputTensor(name, SAFETENSORS_DTYPES[entry.dtype], tuple(entry.shape))
                   for name, entry in manifest.tensors.items()]
        header = header_bytes(outputs, {"format": "pt", "splice_patch_kind": manifest.meta.kind.value})
        offsets = []
        position = len(header)
        for entry in manifest.tensors.values():
            offsets.append(position)
            position += entry.nbytes
        with staged_output(out, force) as staging:
            fd = os.open(staging / TENSORS, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                _write_all(fd, memoryview(header), 0)
                os.ftruncate(fd, position)
                self._fetch_into(manifest, fd, offsets)
            finally:
                os.close(fd)
            (staging / MANIFEST).write_text(manifest.meta.model_dump_json(indent=2) + "\n")
        return Path(out)

    # -- removal and garbage collection ----------------------------------------------------------

    @_storage_errors
    def remove(self, ref: str | Ref) -> VersionManifest:
        """Remove the version a reference names; its number is never handed out again. Its blobs stay until
        `gc` finds no other version uses them."""
        self._require_writable()
        manifest = self.resolve(ref)
        tombstone = Tombstone(version=manifest.version, digest=manifest.digest)
        # The tombstone first: from then on the version is removed, whatever happens to its manifest.
        self._backend.create(_removed_rel(manifest.name, manifest.version),
                             (tombstone.model_dump_json(indent=2) + "\n").encode())
        self._backend.delete(_version_rel(manifest.name, manifest.version))
        return manifest

    def _live_manifests(self, report_bad: list[str] | None = None) -> list[VersionManifest]:
        manifests = []
        for name in self.names():
            live, _ = self._version_numbers(name)
            for version in sorted(live):
                try:
                    manifests.append(self._read_manifest(name, version))
                except RegistryError as exc:
                    if report_bad is None:
                        raise RegistryError(f"{exc}; gc stops rather than free blobs this version may "
                                            "need") from None
                    report_bad.append(str(exc))
        return manifests

    @_storage_errors
    def gc(self, grace_seconds: float = 3600) -> GcReport:
        """Remove blobs no live version uses, and stale temp files, when older than `grace_seconds`
        (so a push in flight, whose blobs are written before its manifest, is left alone)."""
        self._require_writable()
        report = GcReport()
        for name in self.names():  # manifests of removed versions whose rm was interrupted
            stored = _numbers(self._backend.listdir(f"patches/{name}/versions"))
            for version in stored & _numbers(self._backend.listdir(f"patches/{name}/removed")):
                self._backend.delete(_version_rel(name, version))
                report.stale_versions_removed += 1
        live = {entry.blob_digest for m in self._live_manifests() for entry in m.tensors.values()}
        cutoff = time.time() - grace_seconds
        for rel, size, mtime in self._backend.walk("blobs"):
            digest = rel.rsplit("/", 1)[-1]
            if rel != blob_rel(digest):
                continue  # not a blob name: not ours to remove
            if digest in live:
                report.blobs_kept_live += 1
            elif grace_seconds > 0 and (mtime is None or mtime > cutoff):
                report.blobs_kept_young += 1
            else:
                self._backend.delete(rel)
                report.blobs_removed += 1
                report.bytes_freed += size
        for rel, _, mtime in self._backend.walk("tmp"):
            if grace_seconds <= 0 or (mtime is not None and mtime <= cutoff):
                self._backend.delete(rel)
                report.temps_removed += 1
        return report

    def _hash_blob(self, rel: str) -> tuple[str, int]:
        """(sha256, size) of a stored blob, read in pieces locally; FileNotFoundError if it is gone."""
        if isinstance(self._backend, _LocalBackend):
            fd = os.open(self._backend.path(rel), os.O_RDONLY)
            try:
                buf = _piece_buffer()
                hasher = hashlib.sha256()
                done = 0
                while True:
                    got = os.preadv(fd, [buf], done)
                    if got <= 0:
                        break
                    hasher.update(buf[:got])
                    done += got
                return hasher.hexdigest(), done
            finally:
                os.close(fd)
        data = self._backend.read(rel)
        return hashlib.sha256(data).hexdigest(), len(data)

    @_storage_errors
    def verify(self) -> VerifyReport:
        """Re-hash every blob and check every live version's manifest and blobs; changes nothing. A damaged
        pack is reported with the tensors in it whose bytes no longer match, and the versions they break."""
        report = VerifyReport()
        manifests = self._live_manifests(report.bad_manifests)
        report.versions_checked = len(manifests) + len(report.bad_manifests)
        users: dict[str, list[tuple[str, str, TensorEntry]]] = {}  # blob digest -> (ref, tensor, entry)
        for manifest in manifests:
            for name, entry in manifest.tensors.items():
                users.setdefault(entry.blob_digest, []).append((manifest.ref, name, entry))
        stored = {}
        for rel, size, _ in self._backend.walk("blobs"):
            digest = rel.rsplit("/", 1)[-1]
            if rel == blob_rel(digest):
                stored[digest] = size

        def versions_of(found: list[tuple[str, str, TensorEntry]]) -> list[str]:
            return list(dict.fromkeys(ref for ref, _, _ in found))

        for digest, size in sorted(stored.items()):
            rel = blob_rel(digest)
            using = users.get(digest, [])
            try:
                actual, size = self._hash_blob(rel)
            except FileNotFoundError as exc:
                report.problems.append(BlobProblem(digest, self._where(rel), "missing", _first_line(exc),
                                                   versions_of(using)))
                continue
            report.blobs_checked += 1
            report.bytes_checked += size
            wrong_size = [u for u in using if not u[2].packed and u[2].nbytes != size]
            if actual == digest and not wrong_size:
                continue
            if actual == digest:
                report.problems.append(BlobProblem(digest, self._where(rel), "wrong size",
                                                   f"{size} bytes, manifests say {wrong_size[0][2].nbytes}",
                                                   versions_of(wrong_size)))
                continue
            # which tensors does the damage reach? a blob of its own: all of its users; a pack: those
            # whose byte range no longer hashes to their sha256
            damaged = [u for u in using if not u[2].packed]
            packed = [u for u in using if u[2].packed and u[2].nbytes]
            ranges = self._backend.read_ranges([(rel, e.offset, e.offset + e.nbytes) for _, _, e in packed])
            for user, data in zip(packed, ranges):
                entry = user[2]
                if (isinstance(data, BaseException) or len(data) != entry.nbytes
                        or hashlib.sha256(data).hexdigest() != entry.digest):
                    damaged.append(user)
            detail = f"its bytes hash to {actual[:12]}..., not its name"
            tensors = [f"{name} of {ref}" for ref, name, entry in damaged if entry.packed]
            if tensors:
                shown = ", ".join(tensors[:4]) + (f" and {len(tensors) - 4} more" if len(tensors) > 4 else "")
                detail += f"; damaged tensors: {shown}"
            elif using and not damaged:
                detail += "; every tensor in it still checks out"
            report.problems.append(BlobProblem(digest, self._where(rel), "corrupt", detail, versions_of(damaged),
                                               tensors))
        for digest in sorted(set(users) - set(stored)):
            report.problems.append(BlobProblem(digest, self._where(blob_rel(digest)), "missing",
                                               "no such blob", versions_of(users[digest])))
        return report

    # -- diff --------------------------------------------------------------------------------------

    @_storage_errors
    def diff(self, ref_a: str | Ref, ref_b: str | Ref) -> DiffReport:
        """Tensor by tensor: added, removed, changed (max |b - a| and ||b - a|| / ||a||) or unchanged."""
        a, b = self.resolve(ref_a), self.resolve(ref_b)
        meta_a = a.meta.model_dump(mode="json", exclude={"created"})
        meta_b = b.meta.model_dump(mode="json", exclude={"created"})
        meta_changes = sorted(k for k in meta_a.keys() | meta_b.keys() if meta_a.get(k) != meta_b.get(k))
        out = []
        for name in list(a.tensors) + [n for n in b.tensors if n not in a.tensors]:
            ea, eb = a.tensors.get(name), b.tensors.get(name)
            entry = TensorDiff(name, "unchanged", ea.shape if ea else None, eb.shape if eb else None,
                               ea.dtype if ea else None, eb.dtype if eb else None)
            if ea is None:
                entry.status = "added"
            elif eb is None:
                entry.status = "removed"
            elif ea.digest != eb.digest:
                entry.status = "changed"
                if ea.shape == eb.shape:
                    (da,) = self._read_verified([(name, ea)], a.ref)
                    (db,) = self._read_verified([(name, eb)], b.ref)
                    ta, tb = _tensor_from(da, ea).double(), _tensor_from(db, eb).double()
                    delta = tb - ta
                    if delta.numel():
                        entry.max_abs_diff = float(delta.abs().max())
                        norm_a, norm_d = float(ta.norm()), float(delta.norm())
                        entry.relative_l2 = norm_d / norm_a if norm_a else (0.0 if norm_d == 0 else float("inf"))
            out.append(entry)
        return DiffReport(a.ref, b.ref, a.digest, b.digest, meta_changes, out)
