"""Storage backends: relative paths under a registry's root, every write atomic, `create` exclusive or refused.

The base `Backend` works on any fsspec filesystem; memory:// and S3 add how they create exclusively.
`LocalBackend` is plain os calls: temp files in <root>/tmp, renamed (blobs) or hard-linked (exclusive create)
into place, large blobs streamed in IO_CHUNK pieces, reads and puts one at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import random
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import TypeVar

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from splice.errors import SpliceError, first_line
from splice.registry.layout import IO_CHUNK, blob_digest_of, located, temp_name
from splice.registry.refs import RegistryError

T = TypeVar("T")

_MEMORY_LOCK = threading.Lock()
_STORAGE_MODULES = {"botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "gcsfs", "adlfs", "requests"}
_BUFFERS = threading.local()

Bytes = bytes | bytearray | memoryview


def storage_errors(method):
    """Turn the storage backend's own errors (OSError, botocore, aiohttp, ...) into one-line RegistryErrors."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except SpliceError:
            raise
        except Exception as exc:
            if isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in _STORAGE_MODULES:
                raise RegistryError(f"registry {self.url}: {first_line(exc)}") from exc
            raise

    return wrapper


def piece_buffer() -> memoryview:
    """This thread's reusable IO_CHUNK buffer (fresh allocations fault their pages in slowly)."""
    view = getattr(_BUFFERS, "view", None)
    if view is None:
        view = _BUFFERS.view = memoryview(bytearray(IO_CHUNK))
    return view


def read_pieces(fd: int, start: int, nbytes: int | None = None) -> Iterator[memoryview]:
    """`nbytes` (None: to the end of the file) of `fd` from `start`, in IO_CHUNK pieces of this thread's
    buffer; fewer where the file ends sooner. A piece is valid until the next one is asked for."""
    buf = piece_buffer()
    done = 0
    while nbytes is None or done < nbytes:
        want = IO_CHUNK if nbytes is None else min(IO_CHUNK, nbytes - done)
        got = os.preadv(fd, [buf[:want]], start + done)
        if got <= 0:
            return
        yield buf[:got]
        done += got


def pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill `view` from `fd` at `offset` in IO_CHUNK pieces; the bytes read (fewer at the end of the file)."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done : done + IO_CHUNK]], offset + done)
        if got <= 0:
            break
        done += got
    return done


def write_all(fd: int, view: memoryview, offset: int | None = None) -> None:
    """Write `view` to `fd` (at `offset` with pwrite, else at the file position) in IO_CHUNK pieces."""
    done = 0
    while done < len(view):
        piece = view[done : done + IO_CHUNK]
        done += os.write(fd, piece) if offset is None else os.pwrite(fd, piece, offset + done)


def _mtime(info: Mapping) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "created", "updated"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
    return None


def _as_bytes(data: Bytes) -> bytes | bytearray:
    return bytes(data) if isinstance(data, memoryview) else data


class Backend:
    """Relative paths under the registry root; every write atomic; `create` exclusive or nothing."""

    exclusive: str = ""  # how `create` is exclusive; "" when it cannot be
    batches_small_io = True  # small reads and puts travel together (a request each costs a round trip)

    def __init__(self, fs: AbstractFileSystem, root: str):
        self.fs = fs
        self.root = root

    @property
    def workers(self) -> int:
        """Threads moving blobs at once."""
        return 16

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def read(self, rel: str) -> bytes:
        self.fs.invalidate_cache(self.path(rel))
        return self.fs.cat_file(self.path(rel))

    def read_small(self, rel: str, url: str) -> bytes:
        """A small registry file (a lease, a record): FileNotFoundError if it is gone, a one-line RegistryError
        naming it if anything else stands there (a directory, an unreadable file)."""
        try:
            return self.read(rel)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise RegistryError(f"{located(url, rel)} is not a readable file ({first_line(exc)})") from None

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
            found = self.fs.cat_ranges(
                [self.path(items[i][0]) for i in rest],
                [items[i][1] for i in rest],
                [items[i][2] for i in rest],
                on_error="return",
            )
            for i, data in zip(rest, found):
                out[i] = data
        return out

    def infos(self, rels: Sequence[str]) -> list[dict | None]:
        """Each file's info, asked of the store past fsspec's listing cache (others write here too); None where
        it does not exist."""
        paths = [self.path(rel) for rel in rels]
        for p in paths:
            self.fs.invalidate_cache(p)
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
        out: list[dict | None] = []
        for info in infos:
            if isinstance(info, FileNotFoundError):
                out.append(None)
            elif isinstance(info, BaseException):
                raise info
            else:
                out.append(info)
        return out

    def sizes(self, rels: Sequence[str]) -> list[int | None]:
        """Each blob's size, None where it does not exist (never from a cached listing)."""
        return [None if info is None else info.get("size") for info in self.infos(rels)]

    def holds(self, blobs: Sequence[tuple[str, int, Bytes | None]]) -> list[bool]:
        """For each (blob rel, size, its bytes or None): is that blob stored with exactly those bytes? Same-size
        damage is caught: by the store's MD5 ETag of a single-part object where the bytes are at hand, else by
        reading the stored blob and hashing it against its name."""
        found = []
        for (rel, size, data), info in zip(blobs, self.infos([rel for rel, _, _ in blobs])):
            if info is None or info.get("size") != size:
                found.append(False)
                continue
            etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
            if data is not None and len(etag) == 32 and all(c in "0123456789abcdef" for c in etag):
                found.append(hashlib.md5(data, usedforsecurity=False).hexdigest() == etag)
                continue
            try:
                found.append(self.hash_blob(rel) == (blob_digest_of(rel), size))
            except FileNotFoundError:
                found.append(False)
        return found

    def _listed(self, rel: str, lister: Callable[[str], T]) -> T | None:
        """`lister(path)` of `rel` past fsspec's listing cache (others write here too); None if it is absent."""
        path = self.path(rel)
        self.fs.invalidate_cache(path)
        try:
            return lister(path)
        except FileNotFoundError:
            return None

    def listdir(self, rel: str) -> list[str]:
        entries = self._listed(rel, lambda path: self.fs.ls(path, detail=False)) or []
        return [os.path.basename(str(e).rstrip("/")) for e in entries]

    def put_many(self, blobs: dict[str, Bytes]) -> None:
        """Overwriting writes of content-addressed blobs (each a single atomic put)."""
        if len(blobs) == 1:
            ((rel, data),) = blobs.items()
            self.fs.pipe_file(self.path(rel), _as_bytes(data))
        elif blobs:
            self.fs.pipe({self.path(rel): _as_bytes(d) for rel, d in blobs.items()})

    def create(self, rel: str, data: bytes) -> bool:
        """Write `rel` only if it does not exist: True if this call created it, False if it already existed."""
        raise RegistryError(f"{type(self.fs).__name__} cannot create files exclusively")

    def check_exclusive_create(self, location: str) -> None:
        """An object store that ignores conditional writes would let two pushes take one version number."""
        probe = f"tmp/probe-{uuid.uuid4().hex}"
        try:
            first = self.create(probe, b"1")
            second = self.create(probe, b"2")
        finally:
            self.delete(probe)
        if not first or second:
            raise RegistryError(
                f"registry {location}: this store does not honour exclusive creates "
                "(If-None-Match), so version numbers could be handed out twice; splice will "
                "not keep a registry there"
            )

    def delete(self, rel: str) -> None:
        try:
            self.fs.rm_file(self.path(rel))
        except FileNotFoundError:
            pass

    def remove_entry(self, rel: str) -> None:
        """Remove whatever is at `rel`, a file or a directory (a directory where a small file should be)."""
        try:
            self.fs.rm(self.path(rel), recursive=True)
        except FileNotFoundError:
            pass

    def touch(self, rel: str) -> None:
        """Make a reused blob young again for gc's grace, where the store lets a write do that cheaply."""

    def walk(self, rel: str) -> list[tuple[str, int, float | None]]:
        """(rel path, size, modification time) of every file under `rel`."""
        found = self._listed(rel, lambda path: self.fs.find(path, detail=True)) or {}
        prefix = self.root.rstrip("/") + "/"
        out = []
        for name, info in found.items():
            name = str(name)
            if info.get("type") == "directory" or not name.startswith(prefix):
                continue
            out.append((name[len(prefix) :], int(info.get("size") or 0), _mtime(info)))
        return out

    def is_empty(self) -> bool:
        self.fs.invalidate_cache(self.root)
        try:
            return not self.fs.exists(self.root) or not self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return True

    def hash_blob(self, rel: str) -> tuple[str, int]:
        """(sha256, size) of a stored blob; FileNotFoundError if it is gone."""
        data = self.read(rel)
        return hashlib.sha256(data).hexdigest(), len(data)


class MemoryBackend(Backend):
    exclusive = "lock"

    def create(self, rel: str, data: bytes) -> bool:
        with _MEMORY_LOCK:  # memory:// lives in this process: a lock makes check-then-write atomic
            if self.fs.exists(self.path(rel)):
                return False
            self.fs.pipe_file(self.path(rel), data)
            return True


class S3Backend(Backend):
    exclusive = "if-none-match"

    touch_after = 60.0  # a reused blob younger than this is left as it is (gc's grace still covers it)

    def touch(self, rel: str) -> None:
        """Copy an object older than `touch_after` onto itself with new metadata: its LastModified is now, so
        gc's grace protects it again. (Correctness does not rest on this: see Registry._settle.)"""
        (info,) = self.infos([rel])
        mtime = None if info is None else _mtime(info)
        if mtime is None or time.time() - mtime < self.touch_after:
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.setxattr(self.path(rel), copy_kwargs={}, splice_reused=f"{time.time():.3f}")

    conflict_retries = 8  # S3 answers 409 ConditionalRequestConflict while another conditional put of the key runs

    def create(self, rel: str, data: bytes) -> bool:
        for attempt in range(self.conflict_retries + 1):
            try:
                self.fs.pipe_file(self.path(rel), data, mode="create")  # PutObject with If-None-Match: *
            except FileExistsError:  # HTTP 412: the key exists
                return False
            except OSError as exc:
                if not _conditional_conflict(exc) or attempt == self.conflict_retries:
                    raise
                time.sleep(random.uniform(0.02, 0.1) * (attempt + 1))  # the other put settles: then 412 or ours
            else:
                return True
        return False  # not reached: the last attempt returns or raises


def _conditional_conflict(exc: OSError) -> bool:
    """S3's 409 for two conditional writes of one key at once: retry, and the loser then sees 412."""
    cause = exc.__cause__
    response = getattr(cause, "response", None) or {}
    code = response.get("Error", {}).get("Code")
    return code == "ConditionalRequestConflict" or "ConditionalRequestConflict" in str(exc)


class LocalBackend(Backend):
    """Plain os calls: temp files in <root>/tmp, renamed (blobs) or hard-linked (exclusive create) into place."""

    exclusive = "link"
    batches_small_io = False

    @property
    def workers(self) -> int:  # hashing local bytes is CPU-bound: a few threads (hashlib releases the GIL)
        return max(2, min(4, (os.cpu_count() or 2) + 1))

    def inside(self, rel: str) -> str:
        """The path of `rel`, refused if any part of it below the root is a symbolic link: the registry never
        follows a link out of itself (gc deletes what it finds, and writes land where links point)."""
        path = self.root
        for part in rel.split("/"):
            path = os.path.join(path, part)
            if os.path.islink(path):
                raise RegistryError(
                    f"{located(self.root, rel)}: {path} is a symbolic link (to {os.readlink(path)}); "
                    "the registry never follows a link out of itself: replace it with a directory"
                )
        return path

    def new_temp(self) -> tuple[str, int]:
        """(path, fd) of a new temp file under <root>/tmp, open for writing."""
        tmp_dir = self.inside("tmp")
        os.makedirs(tmp_dir, exist_ok=True)
        tmp = os.path.join(tmp_dir, temp_name())
        return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)

    def _write_tmp(self, data: Bytes, sync: bool = False) -> str:
        tmp, fd = self.new_temp()
        try:
            write_all(fd, memoryview(data).cast("B"))
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        return tmp

    def _replace(self, tmp: str, rel: str) -> None:
        final = self.inside(rel)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.replace(tmp, final)  # atomic: readers see no blob or the whole blob

    def publish(self, tmp: str, rel: str, size: int) -> bool:
        """Rename a complete temp file into place as blob `rel`, unless that blob is there with the right bytes
        (then the temp is dropped and the blob made young again, for gc's grace). True if it was written."""
        if self.holds([(rel, size, None)])[0]:
            os.unlink(tmp)
            self.touch(rel)
            return False
        self._replace(tmp, rel)
        return True

    def open_read(self, rel: str) -> int:
        """An fd of a stored blob, open for reading; FileNotFoundError if it is gone."""
        return os.open(self.path(rel), os.O_RDONLY)

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
                fd = self.open_read(rel)
            except FileNotFoundError as exc:
                out.append(exc)
                continue
            try:
                buf = bytearray(end - start)
                done = pread_into(fd, memoryview(buf), start)
                if done < len(buf):
                    del buf[done:]
                out.append(buf)
            finally:
                os.close(fd)
        return out

    def holds(self, blobs: Sequence[tuple[str, int, Bytes | None]]) -> list[bool]:
        """Stored with exactly these bytes? A blob of the right size is re-hashed (reading is cheaper than the
        write it saves, and same-size damage in place must not be reused)."""
        found = []
        for (rel, size, _), stored in zip(blobs, self.sizes([rel for rel, _, _ in blobs])):
            try:
                found.append(stored == size and self.hash_blob(rel) == (blob_digest_of(rel), size))
            except FileNotFoundError:
                found.append(False)
        return found

    def sizes(self, rels: Sequence[str]) -> list[int | None]:
        sizes: list[int | None] = []
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

    def put_many(self, blobs: dict[str, Bytes]) -> None:
        for rel, data in blobs.items():
            tmp = self._write_tmp(data)
            try:
                self._replace(tmp, rel)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise

    def create(self, rel: str, data: bytes) -> bool:
        final = self.inside(rel)
        tmp = self._write_tmp(data, sync=True)
        try:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.link(tmp, final)  # fails if `final` exists; publishes complete content atomically
            return True
        except FileExistsError:
            return False
        except FileNotFoundError:
            if os.path.exists(tmp):
                raise
            raise RegistryError(
                f"{located(self.root, rel)} was not created: its temp file {tmp} was removed "
                "before it could be linked into place (a `splice registry gc` on another machine "
                "sharing this disk?); nothing changed: run it again"
            ) from None
        except OSError as exc:
            raise RegistryError(
                f"{self.root}: this filesystem cannot hard-link ({first_line(exc)}), which the "
                "registry needs to create versions exclusively; use a local disk"
            ) from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def check_exclusive_create(self, location: str) -> None:
        """A hard link is exclusive wherever it works (`create` says so where it does not)."""

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(rel))

    def remove_entry(self, rel: str) -> None:
        path = self.inside(rel)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            self.delete(rel)

    def touch(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path(rel))

    def walk(self, rel: str) -> list[tuple[str, int, float | None]]:
        out: list[tuple[str, int, float | None]] = []
        for directory, _, files in os.walk(self.inside(rel)):
            for name in files:
                full = os.path.join(directory, name)
                try:
                    stat = os.lstat(full)
                except FileNotFoundError:
                    continue
                out.append((os.path.relpath(full, self.root).replace(os.sep, "/"), stat.st_size, stat.st_mtime))
        return out

    def is_empty(self) -> bool:
        return not os.path.exists(self.root) or (os.path.isdir(self.root) and not os.listdir(self.root))

    def hash_blob(self, rel: str) -> tuple[str, int]:
        fd = self.open_read(rel)
        try:
            hasher = hashlib.sha256()
            size = 0
            for piece in read_pieces(fd, 0):
                hasher.update(piece)
                size += len(piece)
            return hasher.hexdigest(), size
        finally:
            os.close(fd)


def backend_for(fs: AbstractFileSystem, root: str) -> Backend:
    """The backend for a filesystem: local, memory://, S3, or the plain one (which cannot create exclusively)."""
    if isinstance(fs, LocalFileSystem):
        return LocalBackend(fs, root)
    protocols = set(fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))
    if "memory" in protocols:
        return MemoryBackend(fs, root)
    if protocols & {"s3", "s3a"}:
        return S3Backend(fs, root)
    return Backend(fs, root)
