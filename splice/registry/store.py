"""A versioned patch registry on any fsspec location: content-addressed blobs, immutable version manifests,
aliases moved by compare-and-swap.

Layout under the registry's root::

    registry.json                                   format marker (written once, by `init`)
    blobs/sha256/<2 hex>/<64 hex>                   one blob per tensor: its raw bytes, named by their sha256
    patches/<name>/versions/<n>.json                immutable manifests, created exclusively (numbers never reused)
    patches/<name>/removed/<n>.json                 tombstones: version n was removed; n is never handed out again
    patches/<name>/aliases/<alias>/<generation>.json  alias moves; the highest generation is the alias's value
    tmp/                                            local temp files (renamed or linked into place; swept by gc)

Every write is atomic: a blob or manifest is either absent or complete. A push writes its blobs first and its
manifest last, so a push that dies leaves no visible version, only unreachable blobs that `gc` removes after a
grace period. Version manifests and alias moves are created with an exclusive create (a hard link locally, an
in-process lock for memory://, a conditional put `If-None-Match: *` on S3); a filesystem that offers none of
these is refused for writing rather than risk handing out a version number twice.
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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from fsspec.implementations.local import LocalFileSystem

from splice.adapters.patch import MANIFEST, TENSORS, Patch, PatchMeta
from splice.errors import SpliceError
from splice.registry.manifest import (
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
from splice.tensors.checkpoint import DTYPE_TO_SAFETENSORS, SAFETENSORS_DTYPES, split_location

ENV_VAR = "SPLICE_REGISTRY"
DEFAULT_LOCATION = "~/.cache/splice/registry"
REGISTRY_FILE = "registry.json"
SMALL_BLOB = 1 << 20  # blobs below this travel in batches to remote registries
BATCH_BYTES = 8 << 20  # at most this many bytes of small blobs in one batch
IO_CHUNK = 1 << 20  # local reads and writes go in pieces of this size
IN_FLIGHT_BYTES = 256 << 20  # a pull holds at most this much fetched-but-unwritten data (or one tensor)
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

    def read_blobs(self, items: Sequence[tuple[str, int]]) -> list[bytes | BaseException]:
        """Blob bytes for (rel, expected size) pairs, each read no further than one byte past its size."""
        out: list[bytes | BaseException | None] = [None] * len(items)
        empty = [i for i, (_, size) in enumerate(items) if size == 0]  # a range read of nothing is an error on S3
        for i, size in zip(empty, self.sizes([items[i][0] for i in empty])):
            out[i] = FileNotFoundError(items[i][0]) if size is None else b"\0" * min(size, 1)
        rest = [i for i, (_, size) in enumerate(items) if size > 0]
        if len(rest) == 1:
            rel, size = items[rest[0]]
            try:
                out[rest[0]] = self.fs.cat_file(self.path(rel), start=0, end=size + 1)
            except Exception as exc:  # the backend's own type; the caller names the blob
                out[rest[0]] = exc
        elif rest:
            found = self.fs.cat_ranges([self.path(items[i][0]) for i in rest], [0] * len(rest),
                                       [items[i][1] + 1 for i in rest], on_error="return")
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

    def put_many(self, blobs: dict[str, bytes | memoryview]) -> None:
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

    def _write_tmp(self, data: bytes | memoryview, sync: bool = False) -> str:
        tmp = self._tmp()
        view = memoryview(data).cast("B")
        with open(tmp, "wb", buffering=0) as handle:
            for start in range(0, len(view), IO_CHUNK):  # moderate writes: much faster than one huge one here
                handle.write(view[start:start + IO_CHUNK])
            if sync:
                handle.flush()
                os.fsync(handle.fileno())
        return tmp

    def read(self, rel: str) -> bytes:
        with open(self.path(rel), "rb") as handle:
            return handle.read()

    def read_blobs(self, items: Sequence[tuple[str, int]]) -> list[bytes | BaseException]:
        out: list[bytes | BaseException] = []
        for rel, size in items:
            try:
                with open(self.path(rel), "rb", buffering=0) as handle:
                    actual = os.fstat(handle.fileno()).st_size
                    if actual != size:  # never read a blob of the wrong size (it could be huge)
                        out.append(bytearray(min(actual, size + 1)))
                        continue
                    buf = bytearray(size)
                    view, done = memoryview(buf), 0
                    while done < size:
                        got = handle.readinto(view[done:done + IO_CHUNK])
                        if not got:
                            break
                        done += got
                    out.append(buf if done == size else buf[:done])
            except FileNotFoundError as exc:
                out.append(exc)
        return out

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

    def put_many(self, blobs: dict[str, bytes | memoryview]) -> None:
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


def _write_in_pieces(writer, name: str, tensor: torch.Tensor) -> None:
    """Hand a large tensor to the writer in blocks of rows of about IO_CHUNK bytes (faster than one huge write)."""
    row_bytes = tensor[0].numel() * tensor.element_size() if tensor.dim() and tensor.shape[0] else 0
    if tensor.dim() < 2 or row_bytes == 0 or tensor.numel() * tensor.element_size() <= IO_CHUNK:
        writer.write(name, tensor)
        return
    step = max(1, IO_CHUNK // row_bytes)
    for start in range(0, tensor.shape[0], step):
        stop = min(start + step, tensor.shape[0])
        writer.write(name, tensor[start:stop], rows=(start, stop))


class RegistryTensors(Mapping[str, torch.Tensor]):
    """A version's tensors, each read from its blob when looked up and checked against its sha256."""

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


# -- the registry ----------------------------------------------------------------------------------


def _jobs(entries: Sequence[tuple[str, int]], batch: bool) -> list[list[int]]:
    """Indices grouped into jobs: one per large item; consecutive small ones batched when `batch`."""
    jobs: list[list[int]] = []
    current: list[int] = []
    current_bytes = 0
    for index, (_, nbytes) in enumerate(entries):
        if not batch or nbytes >= SMALL_BLOB:
            if current:
                jobs.append(current)
                current, current_bytes = [], 0
            jobs.append([index])
            continue
        if current and (current_bytes + nbytes > BATCH_BYTES or len(current) >= 256):
            jobs.append(current)
            current, current_bytes = [], 0
        current.append(index)
        current_bytes += nbytes
    if current:
        jobs.append(current)
    return jobs


class Registry:
    """A patch registry at `url` (a local directory or any fsspec URL). Open one with `Registry.open`,
    create one with `Registry.init`."""

    def __init__(self, url: str, backend: _Backend, info: RegistryInfo):
        self.url = url
        self._backend = backend
        self.info = info

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

        def body(version: int) -> bytes:
            return VersionManifest(name=name, version=version, digest=digest, meta=meta, tensors=table,
                                   pushed_at=pushed_at, message=message).to_json()

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
        from splice.adapters.apply import load_patch
        from splice.adapters.patch import fingerprint_base
        from splice.adapters.steps import patch_steps
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
        """Hash every tensor and write the blobs not yet stored, overlapping reads, hashing and writes."""
        names = list(patch.tensors)
        shapes = patch.shapes
        estimates = [(n, 4 * int(torch.Size(shapes[n]).numel())) for n in names]
        remote = not isinstance(self._backend, _LocalBackend)
        jobs = _jobs(estimates, batch=remote)
        lock = threading.Lock()
        stats = PushStats()

        def run(job: list[int]) -> list[TensorEntry]:
            items = []
            for index in job:
                name = names[index]
                tensor = patch.tensors[name]
                if not isinstance(tensor, torch.Tensor):
                    raise RegistryError(f"patch tensor {name} is a {type(tensor).__name__}, not a tensor")
                code = DTYPE_TO_SAFETENSORS.get(tensor.dtype)
                if code is None:
                    raise RegistryError(f"patch tensor {name} has dtype {tensor.dtype}, which safetensors cannot "
                                        "store")
                data = memoryview(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
                digest = hashlib.sha256(data).hexdigest()
                items.append((TensorEntry(digest=digest, dtype=code, shape=tuple(tensor.shape),
                                          nbytes=data.nbytes), data))
            rels = [blob_rel(entry.digest) for entry, _ in items]
            sizes = self._backend.sizes(rels)
            missing: dict[str, memoryview] = {}
            reused = 0
            for rel, size, (entry, data) in zip(rels, sizes, items):
                if size == entry.nbytes:
                    reused += entry.nbytes
                    if isinstance(self._backend, _LocalBackend):
                        self._backend.touch(rel)  # a reused orphan is young again: gc's grace protects it
                elif rel not in missing:
                    missing[rel] = data  # absent, or the wrong size (a damaged blob: write it again)
            self._backend.put_many(missing)
            with lock:
                stats.blobs_written += len(missing)
                stats.bytes_written += sum(d.nbytes for d in missing.values())
                stats.blobs_reused += len(items) - len(missing)
                stats.bytes_reused += reused
            return [entry for entry, _ in items]

        workers = 16 if remote else max(2, min(8, (os.cpu_count() or 2) + 1))
        entries: dict[str, TensorEntry] = {}
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="splice-push") as pool:
            futures = [(job, pool.submit(run, job)) for job in jobs]
            try:
                for job, future in futures:
                    for index, entry in zip(job, future.result()):
                        entries[names[index]] = entry
            except BaseException:
                for _, future in futures:
                    future.cancel()
                raise
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

    def _read_verified(self, items: Sequence[tuple[str, TensorEntry]], ref: str) -> list[bytes | bytearray]:
        """The bytes of each (tensor name, entry), hash-checked; a RegistryError naming the blob otherwise."""
        results = self._backend.read_blobs([(blob_rel(entry.digest), entry.nbytes) for _, entry in items])
        out = []
        for (name, entry), data in zip(items, results):
            rel = blob_rel(entry.digest)
            where = f"blob {self._where(rel)} (tensor {name} of {ref})"
            if isinstance(data, FileNotFoundError):
                raise RegistryError(f"{where} is missing; run `splice registry verify`")
            if isinstance(data, BaseException):
                raise RegistryError(f"{where}: cannot read it: {_first_line(data)}") from data
            if len(data) != entry.nbytes:
                raise RegistryError(f"{where} is corrupt: {len(data)}{'+' if len(data) > entry.nbytes else ''} "
                                    f"bytes, expected {entry.nbytes}; run `splice registry verify`")
            actual = hashlib.sha256(data).hexdigest()
            if actual != entry.digest:
                raise RegistryError(f"{where} is corrupt: its bytes hash to {actual[:12]}..., not its name; "
                                    "run `splice registry verify`")
            out.append(data)
        return out

    def _stream(self, manifest: VersionManifest) -> Iterator[tuple[str, TensorEntry, bytes | bytearray]]:
        """Every tensor's verified bytes in manifest order, fetched ahead on threads within a byte budget."""
        items = list(manifest.tensors.items())
        remote = not isinstance(self._backend, _LocalBackend)
        jobs = _jobs([(name, entry.nbytes) for name, entry in items], batch=remote)
        workers = 16 if remote else 3

        def fetch(job: list[int]) -> list[bytes | bytearray]:
            return self._read_verified([items[i] for i in job], manifest.ref)

        pending: list[tuple[list[int], int, Future]] = []
        in_flight = 0
        next_job = 0
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="splice-pull") as pool:
            try:
                while next_job < len(jobs) or pending:
                    while next_job < len(jobs):
                        size = sum(items[i][1].nbytes for i in jobs[next_job])
                        if pending and (in_flight + size > IN_FLIGHT_BYTES or len(pending) >= 4 * workers):
                            break
                        pending.append((jobs[next_job], size, pool.submit(fetch, jobs[next_job])))
                        in_flight += size
                        next_job += 1
                    job, size, future = pending.pop(0)
                    for index, data in zip(job, future.result()):
                        name, entry = items[index]
                        yield name, entry, data
                    in_flight -= size
            finally:
                for _, _, future in pending:
                    future.cancel()

    @_storage_errors
    def load(self, ref: str | Ref) -> Patch:
        """The patch a reference names; its tensors are read (and hash-checked) only when looked up."""
        manifest = self.resolve(ref)
        return Patch(RegistryTensors(self, manifest), manifest.meta.model_copy(deep=True))

    @_storage_errors
    def pull(self, ref: str | Ref, out: str | os.PathLike, force: bool = False) -> Path:
        """Write the version a reference names as a splice patch directory (patch.json + tensors.safetensors),
        streamed blob by blob, each hash-checked before it is written; nothing appears at `out` unless all are."""
        from splice.tensors.writer import OutputTensor, ShardedWriter, ensure_output_free, staged_output

        ensure_output_free(out, force)
        manifest = self.resolve(ref)
        outputs = [OutputTensor(name, SAFETENSORS_DTYPES[entry.dtype], tuple(entry.shape))
                   for name, entry in manifest.tensors.items()]
        with staged_output(out, force) as staging:
            writer = ShardedWriter(staging, outputs, metadata={"splice_patch_kind": manifest.meta.kind.value},
                                   single_file=TENSORS)
            try:
                for name, entry, data in self._stream(manifest):
                    _write_in_pieces(writer, name, _tensor_from(data, entry))
                writer.close()
            except BaseException:
                writer.abort()
                raise
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
        live = {entry.digest for m in self._live_manifests() for entry in m.tensors.values()}
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

    @_storage_errors
    def verify(self) -> VerifyReport:
        """Re-hash every blob and check every live version's manifest and blobs; changes nothing."""
        report = VerifyReport()
        manifests = self._live_manifests(report.bad_manifests)
        report.versions_checked = len(manifests) + len(report.bad_manifests)
        users: dict[str, list[str]] = {}
        sizes: dict[str, int] = {}
        for manifest in manifests:
            for entry in manifest.tensors.values():
                refs = users.setdefault(entry.digest, [])
                if manifest.ref not in refs:
                    refs.append(manifest.ref)
                sizes[entry.digest] = entry.nbytes
        stored = {}
        for rel, size, _ in self._backend.walk("blobs"):
            digest = rel.rsplit("/", 1)[-1]
            if rel == blob_rel(digest):
                stored[digest] = size
        for digest, size in sorted(stored.items()):
            rel = blob_rel(digest)
            (data,) = self._backend.read_blobs([(rel, size)])
            if isinstance(data, BaseException):
                problem = BlobProblem(digest, self._where(rel), "missing", _first_line(data))
            else:
                report.blobs_checked += 1
                report.bytes_checked += len(data)
                actual = hashlib.sha256(data).hexdigest()
                if actual == digest and sizes.get(digest, size) == size:
                    continue
                if actual != digest:
                    problem = BlobProblem(digest, self._where(rel), "corrupt",
                                          f"its bytes hash to {actual[:12]}..., not its name")
                else:
                    problem = BlobProblem(digest, self._where(rel), "wrong size",
                                          f"{size} bytes, manifests say {sizes[digest]}")
            problem.versions = users.get(digest, [])
            report.problems.append(problem)
        for digest in sorted(set(users) - set(stored)):
            report.problems.append(BlobProblem(digest, self._where(blob_rel(digest)), "missing",
                                               "no such blob", users[digest]))
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
