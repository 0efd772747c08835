"""Moving tensor bytes in and out of a registry's blobs, every byte hashed on the way.

Push: tensors of at least `pack_below` bytes get a blob of their own (deduplicated tensor by tensor across
every version and name); smaller ones are packed, in manifest order, into pack blobs of at most PACK_BYTES, so a
push of hundreds of small tensors costs a handful of requests. Locally a large tensor is read from the patch file
in IO_CHUNK pieces into a reused per-thread buffer, hashed and written to its temp file in the same pass, on a few
threads (hashlib releases the GIL). Remote stores get one existence check and one PUT per blob or pack.
A blob already stored is reused only if its bytes are right (its MD5 ETag, or a re-hash; see Backend.holds),
so same-size damage is written over.

Pull: one read per large blob, one per pack spanning just the needed ranges (remote small reads batched into one
`cat_ranges`); every tensor's bytes are checked against its sha256 before they are used, and a pull writes each
verified piece straight to its offset in the output file.

torch is imported only where tensors are made or read.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING, Literal

from splice.errors import first_line
from splice.registry.backends import Backend, Bytes, LocalBackend, pread_into, read_pieces, write_all
from splice.registry.layout import BATCH_BYTES, BATCH_COUNT, IO_CHUNK, PACK_BYTES, SMALL_READ, blob_rel, located
from splice.registry.manifest import PushStats, TensorEntry, VersionManifest
from splice.registry.refs import RegistryError

if TYPE_CHECKING:
    import torch

    from splice.adapters.patch import Patch


def run_jobs(workers: int, prefix: str, work: Callable, jobs: Sequence) -> list:
    """`work(job)` for every job on a thread pool, results in job order; the first failure cancels the rest."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=prefix) as pool:
        futures = [pool.submit(work, job) for job in jobs]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def tensor_from(buf: bytes | bytearray, entry: TensorEntry) -> torch.Tensor:
    import torch

    from splice.tensors.safetensors import SAFETENSORS_DTYPES

    dtype = SAFETENSORS_DTYPES[entry.dtype]
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=dtype)
    writable = buf if isinstance(buf, bytearray) else bytearray(buf)
    return torch.frombuffer(writable, dtype=torch.uint8).view(dtype).reshape(entry.shape)


# -- reading -------------------------------------------------------------------------------------


@dataclass
class BlobRead:
    """One read of a blob: bytes start..end, covering the tensors (index, name, entry) stored there."""

    rel: str
    start: int
    end: int
    members: list[tuple[int, str, TensorEntry]]

    @property
    def own(self) -> bool:
        """A blob of one tensor's own (read one byte past its end, to notice a blob that is too long)."""
        return len(self.members) == 1 and not self.members[0][2].packed


def _split_at_gaps(read: BlobRead) -> list[BlobRead]:
    """A pack read spans from its first to its last needed byte: split it where a gap of unneeded bytes is big."""
    members = sorted(read.members, key=lambda m: m[2].offset)
    out: list[BlobRead] = []
    current = BlobRead(read.rel, members[0][2].offset, members[0][2].offset, [])
    for member in members:
        entry = member[2]
        if current.members and entry.offset - current.end > SMALL_READ:
            out.append(current)
            current = BlobRead(read.rel, entry.offset, entry.offset, [])
        current.end = max(current.end, entry.offset + entry.nbytes)
        current.members.append(member)
    out.append(current)
    return out


def plan_reads(items: Sequence[tuple[str, TensorEntry]]) -> list[BlobRead]:
    """One read per large tensor's blob; one per pack, spanning just the ranges of it that are needed.
    Empty tensors need no read at all."""
    reads: list[BlobRead] = []
    packs: dict[str, BlobRead] = {}
    for index, (name, entry) in enumerate(items):
        if entry.nbytes == 0:
            continue
        if not entry.packed:
            reads.append(BlobRead(blob_rel(entry.digest), 0, entry.nbytes + 1, [(index, name, entry)]))
            continue
        read = packs.get(entry.blob_digest)
        end = entry.offset + entry.nbytes
        if read is None:
            read = packs[entry.blob_digest] = BlobRead(blob_rel(entry.blob_digest), entry.offset, end, [])
            reads.append(read)
        read.start, read.end = min(read.start, entry.offset), max(read.end, end)
        read.members.append((index, name, entry))
    out: list[BlobRead] = []
    for read in reads:
        out += [read] if read.own or len(read.members) == 1 else _split_at_gaps(read)
    return out


def batch_small(sizes: Sequence[int], batch: bool) -> list[list[int]]:
    """Indices grouped into jobs: each large one alone; consecutive small ones together when `batch`."""
    jobs: list[list[int]] = []
    current: list[int] = []
    current_bytes = 0
    for index, size in enumerate(sizes):
        if not batch or size >= SMALL_READ:
            jobs.append([index])
            continue
        if current and (current_bytes + size > BATCH_BYTES or len(current) >= BATCH_COUNT):
            jobs.append(current)
            current, current_bytes = [], 0
        current.append(index)
        current_bytes += size
    if current:
        jobs.append(current)
    return jobs


class BlobReader:
    """Verified reads of a registry's tensor bytes: every tensor checked against its sha256 before use."""

    def __init__(self, backend: Backend, url: str):
        self.backend = backend
        self.url = url

    def _tensor_where(self, read: BlobRead, name: str, entry: TensorEntry, ref: str) -> str:
        where = f"blob {located(self.url, read.rel)} (tensor {name} of {ref}"
        if entry.packed:
            where += f", bytes {entry.offset}..{entry.offset + entry.nbytes} of the pack"
        return where + ")"

    def checked(
        self, read: BlobRead, data: bytes | bytearray | BaseException, ref: str
    ) -> list[tuple[int, str, TensorEntry, memoryview]]:
        """Each member of a read with its bytes, hash-checked; a RegistryError naming the blob and tensor."""
        out = []
        for index, name, entry in read.members:
            where = self._tensor_where(read, name, entry, ref)
            if isinstance(data, FileNotFoundError):
                raise RegistryError(f"{where} is missing; run `splice registry verify`")
            if isinstance(data, BaseException):
                raise RegistryError(f"{where}: cannot read it: {first_line(data)}") from data
            view = memoryview(data)[entry.offset - read.start : entry.offset - read.start + entry.nbytes]
            if read.own and len(data) != entry.nbytes:
                raise RegistryError(
                    f"{where} is corrupt: {len(data)}{'+' if len(data) > entry.nbytes else ''} "
                    f"bytes, expected {entry.nbytes}; run `splice registry verify`"
                )
            if len(view) != entry.nbytes:
                raise RegistryError(
                    f"{where} is corrupt: the pack ends {entry.nbytes - len(view)} bytes before "
                    "the tensor does; run `splice registry verify`"
                )
            actual = hashlib.sha256(view).hexdigest()
            if actual != entry.digest:
                what = "its name" if read.own else "the tensor's sha256"
                raise RegistryError(
                    f"{where} is corrupt: its bytes hash to {actual[:12]}..., not {what}; run `splice registry verify`"
                )
            out.append((index, name, entry, view))
        return out

    def read_verified(self, items: Sequence[tuple[str, TensorEntry]], ref: str) -> list[bytes | bytearray]:
        """The bytes of each (tensor name, entry), hash-checked, reading only the byte ranges they occupy."""
        reads = plan_reads(items)
        results = self.backend.read_ranges([(r.rel, r.start, r.end) for r in reads])
        out: list[bytes | bytearray] = [b""] * len(items)
        for read, data in zip(reads, results):
            for index, _, _, view in self.checked(read, data, ref):
                out[index] = data if read.own and isinstance(data, (bytes, bytearray)) else bytearray(view)
        return out

    def _stream_own_file(self, local: LocalBackend, read: BlobRead, ref: str, out_fd: int, out_offset: int) -> None:
        """A large local blob copied to `out_fd` at `out_offset` in pieces, hashed on the way; a RegistryError
        (and partly written bytes, which the caller discards) if it is not what the manifest says."""
        _, name, entry = read.members[0]
        where = self._tensor_where(read, name, entry, ref)
        try:
            fd = local.open_read(read.rel)
        except FileNotFoundError:
            raise RegistryError(f"{where} is missing; run `splice registry verify`") from None
        try:
            size = os.fstat(fd).st_size
            if size != entry.nbytes:
                raise RegistryError(
                    f"{where} is corrupt: {size} bytes, expected {entry.nbytes}; run `splice registry verify`"
                )
            hasher = hashlib.sha256()
            done = 0
            for piece in read_pieces(fd, 0, entry.nbytes):
                hasher.update(piece)
                write_all(out_fd, piece, out_offset + done)
                done += len(piece)
            if done < entry.nbytes:
                raise RegistryError(f"{where} is corrupt: it ends at byte {done}, expected {entry.nbytes}")
        finally:
            os.close(fd)
        actual = hasher.hexdigest()
        if actual != entry.digest:
            raise RegistryError(
                f"{where} is corrupt: its bytes hash to {actual[:12]}..., not its name; run `splice registry verify`"
            )

    def fetch_into(self, manifest: VersionManifest, out_fd: int, offsets: list[int]) -> None:
        """Every tensor of a version, hash-checked, written into `out_fd` at its offset, on a few threads."""
        reads = plan_reads(list(manifest.tensors.items()))
        groups = batch_small([r.end - r.start for r in reads], self.backend.batches_small_io)

        def run(group: list[int]) -> None:
            job = [reads[i] for i in group]
            large = len(job) == 1 and job[0].own and job[0].end - job[0].start > IO_CHUNK
            if large and isinstance(self.backend, LocalBackend):
                self._stream_own_file(self.backend, job[0], manifest.ref, out_fd, offsets[job[0].members[0][0]])
                return
            results = self.backend.read_ranges([(r.rel, r.start, r.end) for r in job])
            for read, data in zip(job, results):
                for index, _, _, view in self.checked(read, data, manifest.ref):
                    write_all(out_fd, view, offsets[index])

        run_jobs(self.backend.workers, "splice-pull", run, groups)


class RegistryTensors(Mapping[str, "torch.Tensor"]):
    """A version's tensors (name -> torch.Tensor), each read from its blob (or its range of a pack) when
    looked up and checked against its sha256: `splice.adapters.lazy.LazyTensors`."""

    def __init__(self, reader: BlobReader, manifest: VersionManifest):
        self.reader = reader
        self.manifest = manifest
        self.shapes = {name: tuple(entry.shape) for name, entry in manifest.tensors.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        entry = self.manifest.tensors.get(name)
        if entry is None:
            raise KeyError(name)
        (buf,) = self.reader.read_verified([(name, entry)], self.manifest.ref)
        return tensor_from(buf, entry)

    def __iter__(self) -> Iterator[str]:
        return iter(self.manifest.tensors)

    def __len__(self) -> int:
        return len(self.manifest.tensors)

    def read_all(self) -> dict[str, torch.Tensor]:
        """Every tensor at once, in one batch of ranged reads (one per pack or large blob), each hash-checked."""
        items = list(self.manifest.tensors.items())
        buffers = self.reader.read_verified(items, self.manifest.ref)
        return {name: tensor_from(buf, entry) for (name, entry), buf in zip(items, buffers)}


# -- pushing -------------------------------------------------------------------------------------


@dataclass
class PushItem:
    """One tensor of a patch being pushed: its bytes are `nbytes` at `start` in the file `fd`, or else `data`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    data: memoryview = memoryview(b"")
    fd: int | None = None
    start: int = 0

    def entry(self, digest: str, blob: str | None = None, offset: int = 0) -> TensorEntry:
        return TensorEntry(
            digest=digest, dtype=self.dtype, shape=self.shape, nbytes=self.nbytes, blob=blob, offset=offset
        )


class TensorSource:
    """A patch's tensors as raw bytes, without a copy where possible: a local patch file is read in
    IO_CHUNK pieces into a reused per-thread buffer; any other tensor is viewed in place."""

    def __init__(self, patch: Patch):
        from splice.adapters.patch import StoredTensors

        self.tensors = patch.tensors
        stored = patch.tensors.stored if isinstance(patch.tensors, StoredTensors) else None
        first = next(iter(patch.tensors), None)
        local = stored is not None and first is not None and stored.local_byte_range(first) is not None
        self.stored = stored if local else None  # a local safetensors patch file: its bytes are read directly

    def sizes(self, names: Sequence[str]) -> list[int]:
        """Each tensor's byte size, without reading it (an fp32 estimate where lazy tensors cannot say)."""
        import torch

        from splice.adapters.lazy import LazyTensors

        if self.stored is not None:
            return [self.stored.tensors[n].nbytes for n in names]
        if isinstance(self.tensors, RegistryTensors):
            return [self.tensors.manifest.tensors[n].nbytes for n in names]
        if isinstance(self.tensors, LazyTensors):
            return [4 * prod(self.tensors.shapes[n]) for n in names]
        return [
            t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0 for t in (self.tensors[n] for n in names)
        ]

    def open(self, name: str) -> PushItem:
        import torch

        from splice.tensors.safetensors import DTYPE_TO_SAFETENSORS

        if self.stored is not None and (located := self.stored.local_byte_range(name)) is not None:
            info = self.stored.tensors[name]
            fd, start, end = located
            return PushItem(name, DTYPE_TO_SAFETENSORS[info.dtype], tuple(info.shape), end - start, fd=fd, start=start)
        tensor = self.tensors[name]
        if not isinstance(tensor, torch.Tensor):
            raise RegistryError(f"patch tensor {name} is a {type(tensor).__name__}, not a tensor")
        code = DTYPE_TO_SAFETENSORS.get(tensor.dtype)
        if code is None:
            raise RegistryError(f"patch tensor {name} has dtype {tensor.dtype}, which safetensors cannot store")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data
        return PushItem(name, code, tuple(tensor.shape), data.nbytes, data=data)

    @staticmethod
    def pieces(item: PushItem) -> Iterator[memoryview]:
        """The tensor's bytes in IO_CHUNK pieces; a piece is valid until the next one is asked for."""
        if item.fd is None:
            for start in range(0, item.nbytes, IO_CHUNK):
                yield item.data[start : start + IO_CHUNK]
            return
        done = 0
        for piece in read_pieces(item.fd, item.start, item.nbytes):
            yield piece
            done += len(piece)
        if done < item.nbytes:
            raise RegistryError(f"patch file ends inside tensor {item.name}")

    @staticmethod
    def read_all(item: PushItem) -> bytearray | memoryview:
        """The tensor's bytes in one buffer (for a remote put)."""
        if item.fd is None:
            return item.data
        buf = bytearray(item.nbytes)
        if pread_into(item.fd, memoryview(buf), item.start) != item.nbytes:
            raise RegistryError(f"patch file ends inside tensor {item.name}")
        return buf


PushJob = tuple[Literal["pack", "own"], list[int]]
"""Tensors (by index) pushed together: into one pack, or each as its own blob."""


def plan_push(sizes: Sequence[int], pack_below: int, batch: bool) -> list[PushJob]:
    """("pack", indices) jobs of consecutive small tensors, at most PACK_BYTES each, and ("own", indices) jobs
    of the others: each alone, or small ones (format 1 on a remote store) checked and put in batches."""
    jobs: list[PushJob] = []
    pack: list[int] = []
    pack_bytes = 0
    own: list[int] = []
    for index, size in enumerate(sizes):
        if size >= pack_below:
            own.append(index)
            continue
        if pack and pack_bytes + size > PACK_BYTES:
            jobs.append(("pack", pack))
            pack, pack_bytes = [], 0
        pack.append(index)
        pack_bytes += size
    jobs += [("pack", pack)] if pack else []
    return jobs + [("own", [own[i] for i in group]) for group in batch_small([sizes[i] for i in own], batch)]


class TensorPusher:
    """Hash every tensor of a patch and write the blobs and packs not yet stored, on a few threads."""

    def __init__(self, backend: Backend, pack_below: int):
        self.backend = backend
        self.pack_below = pack_below
        self.stats = PushStats()
        self._lock = threading.Lock()
        self._seen_stored = threading.Event()  # a blob was already stored: hash before writing from then on

    def push(self, patch: Patch) -> tuple[dict[str, TensorEntry], PushStats]:
        """The manifest's tensor table (in the patch's order) and what the push wrote and reused."""
        names = list(patch.tensors)
        self.source = TensorSource(patch)
        jobs = plan_push(self.source.sizes(names), self.pack_below, self.backend.batches_small_io)

        def run(job: PushJob) -> list[TensorEntry]:
            kind, indices = job
            items = [self.source.open(names[i]) for i in indices]
            return self._pack(items) if kind == "pack" else self._own(items)

        entries: dict[str, TensorEntry] = {}
        for (_, indices), found in zip(jobs, run_jobs(self.backend.workers, "splice-push", run, jobs)):
            entries.update((names[i], entry) for i, entry in zip(indices, found))
        return {name: entries[name] for name in names}, self.stats

    def _count(self, written: int, written_bytes: int, reused: int, reused_bytes: int) -> None:
        with self._lock:
            self.stats.blobs_written += written
            self.stats.bytes_written += written_bytes
            self.stats.blobs_reused += reused
            self.stats.bytes_reused += reused_bytes

    def _put(self, blobs: Sequence[tuple[str, int, Bytes]]) -> None:
        """Write the (rel, size, bytes) blobs not already stored with exactly those bytes."""
        held = self.backend.holds(blobs)
        missing: dict[str, Bytes] = {}
        reused = reused_bytes = 0
        for (rel, size, data), stored in zip(blobs, held):
            if stored:
                reused += 1
                reused_bytes += size
                self.backend.touch(rel)  # a reused orphan is young again: gc's grace protects it
            elif rel not in missing:
                missing[rel] = data  # absent or damaged: write it (again)
        self.backend.put_many(missing)
        self._count(len(missing), sum(len(memoryview(d).cast("B")) for d in missing.values()), reused, reused_bytes)

    def _own(self, items: list[PushItem]) -> list[TensorEntry]:
        if isinstance(self.backend, LocalBackend) and len(items) == 1 and items[0].fd is not None:
            return [self._stream_file(self.backend, items[0])]
        blobs, entries = [], []
        for item in items:
            data = self.source.read_all(item)
            digest = hashlib.sha256(data).hexdigest()
            entries.append(item.entry(digest))
            blobs.append((blob_rel(digest), item.nbytes, data))
        self._put(blobs)
        return entries

    def _pack(self, items: list[PushItem]) -> list[TensorEntry]:
        buf = bytearray()
        members = []
        for item in items:
            hasher = hashlib.sha256()
            offset = len(buf)
            for piece in self.source.pieces(item):
                hasher.update(piece)
                buf += piece
            members.append((item, hasher.hexdigest(), offset))
        blob = hashlib.sha256(buf).hexdigest()
        self._put([(blob_rel(blob), len(buf), buf)])
        return [
            item.entry(digest) if digest == blob else item.entry(digest, blob, offset)
            for item, digest, offset in members
        ]

    def _hash(self, item: PushItem) -> str:
        hasher = hashlib.sha256()
        for piece in self.source.pieces(item):
            hasher.update(piece)
        return hasher.hexdigest()

    def _stream_file(self, local: LocalBackend, item: PushItem) -> TensorEntry:
        """Hash a large tensor while writing it to a temp file, then rename it into place (or drop it if
        the blob is stored); once a blob turned out stored, hash first and write only what is missing."""
        digest = None
        if self._seen_stored.is_set():
            digest = self._hash(item)
            if self.backend.holds([(blob_rel(digest), item.nbytes, None)])[0]:
                self.backend.touch(blob_rel(digest))
                self._count(0, 0, 1, item.nbytes)
                return item.entry(digest)
        tmp, fd = local.new_temp()
        try:
            try:
                hasher = hashlib.sha256()
                for piece in self.source.pieces(item):
                    hasher.update(piece)
                    write_all(fd, piece)
            finally:
                os.close(fd)
            if digest is not None and hasher.hexdigest() != digest:
                raise RegistryError(f"patch tensor {item.name} changed while it was being pushed")
            digest = hasher.hexdigest()
            written = local.publish(tmp, blob_rel(digest), item.nbytes)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        if not written:
            self._seen_stored.set()
        self._count(int(written), item.nbytes if written else 0, int(not written), 0 if written else item.nbytes)
        return item.entry(digest)
