"""Moving a stream's tensors between the host and a CUDA device while the kernel runs.

The stream's inputs are read straight into pinned host slabs and uploaded on a side stream, each batch with an
event the compute stream waits on (it waits for its own inputs only); results go back through other pinned slabs on
a third stream while the next kernel runs, and are copied once into pageable tensors the caller owns. Work units
whose inputs are small (norms, biases) are packed together, several units to a slab: one copy, views on the device.

Memory: pinned host memory is `StagingLimits.pinned_bytes` (5 slabs of 4 MiB by default), whatever the model's
size: an input larger than a slab travels in slab-sized blocks of rows, a result in slab-sized pieces. Device memory
holds the inputs of the batches read ahead (`read_ahead_depth`) and of the two in hand, in their stored dtype, and
the results on their way back.

What is device-specific sits behind `Copies` (`CudaCopies` for a GPU), so every other line here runs the same on a
machine without one: the tests drive it with copies that run as late as CUDA would allow them to.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, Protocol, TypeVar

import torch

from splice.errors import SpliceError
from splice.tensors.checkpoint import Checkpoint, stored_span

ALIGN = 64
"""Where each input starts in a batch, in bytes: a multiple of every dtype's size, so each is viewed in place."""

Rows = tuple[int, int] | None
Read = tuple[Checkpoint, str, Rows]
Ticket = Any
"""A queued copy, as its `Copies` tracks it (a CUDA event); None: nothing was queued."""


@dataclass(frozen=True)
class StagingLimits:
    """The pinned host memory transfers go through, and which work units count as small.

    slab_bytes: one pinned staging buffer: the most one copy moves. 4 MiB holds one of the stream's row blocks
      (CHUNK_BYTES) per copy, where a PCIe copy runs at nearly full speed, and keeps the slabs the reader writes
      into in the CPU's cache: reading a 0.4 GB bf16 stream into 4 x 16 MiB slabs ran 1.2-1.7x slower than into
      fresh tensors (2-core VM, 32 MB L3), into 2-3 x 4 MiB slabs as fast. A power of two: torch's pinned memory
      allocator rounds every request up to one.
    upload_slabs, download_slabs: the slabs each direction cycles through. A PCIe 4 upload (~25 GB/s) outruns the
      reads that fill it (page cache or NVMe, <= ~8 GB/s), so three keep the reader from waiting; two let one
      result come back while the next is computed.
    small_unit_bytes: a work unit whose inputs are together no larger than this is packed with the small units
      around it, up to a slab: a copy costs ~10 us of latency, the time 256 KB take at 25 GB/s.
    """

    slab_bytes: int = 4 * 1024 * 1024
    upload_slabs: int = 3
    download_slabs: int = 2
    small_unit_bytes: int = 256 * 1024

    def __post_init__(self) -> None:
        if self.slab_bytes < 2 * ALIGN or self.slab_bytes % ALIGN or self.upload_slabs < 1 or self.download_slabs < 1:
            raise SpliceError(f"staging limits too small: {self}")
        if not 0 <= self.small_unit_bytes <= self.slab_bytes:
            raise SpliceError(f"`small_unit_bytes` must be between 0 and `slab_bytes`, got {self}")

    @property
    def pinned_bytes(self) -> int:
        return (self.upload_slabs + self.download_slabs) * self.slab_bytes


class Copies(Protocol):
    """The device-specific half of the transfers: memory, asynchronous copies and their ordering."""

    device: torch.device

    def staging_buffer(self, nbytes: int) -> torch.Tensor:
        """A uint8 host buffer asynchronous copies can run from and into (pinned)."""
        ...

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        """uint8 device memory for the uploads to fill."""
        ...

    def upload(self, host: torch.Tensor, target: torch.Tensor) -> Ticket:
        """Queue a copy of `host` into device memory `target` on the upload stream."""
        ...

    def use(self, ticket: Ticket, buffers: Sequence[torch.Tensor]) -> None:
        """Make the compute stream wait for `ticket` (and the uploads before it), and tell the device memory of
        `buffers` that the compute stream uses them."""
        ...

    def download(self, source: torch.Tensor, target: torch.Tensor) -> Ticket:
        """Queue a copy of device tensor `source` into host buffer `target`, after everything the compute stream
        was given so far."""
        ...

    def wait(self, ticket: Ticket) -> None:
        """Block until `ticket`'s copy (and those queued before it on its stream) is done."""
        ...


class CudaCopies:
    """`Copies` for one CUDA device: pinned staging, uploads on one side stream and downloads on another, ordered
    against the compute stream (the current one when made: where the stream's kernels run) by events."""

    def __init__(self, device: torch.device):
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        self.compute = torch.cuda.current_stream(self.device)
        self.uploading = torch.cuda.Stream(self.device)
        self.downloading = torch.cuda.Stream(self.device)

    def staging_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        with torch.cuda.stream(self.uploading):  # its memory belongs to the upload stream until `use` says more
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def upload(self, host: torch.Tensor, target: torch.Tensor) -> Ticket:
        with torch.cuda.stream(self.uploading):
            target.copy_(host, non_blocking=True)
        return _recorded(self.uploading)

    def use(self, ticket: Ticket, buffers: Sequence[torch.Tensor]) -> None:
        if ticket is not None:
            self.compute.wait_event(ticket)
        for buffer in buffers:  # freed later, its memory is not handed out again before the compute stream is done
            buffer.record_stream(self.compute)

    def download(self, source: torch.Tensor, target: torch.Tensor) -> Ticket:
        self.downloading.wait_stream(self.compute)
        with torch.cuda.stream(self.downloading):
            target.copy_(source, non_blocking=True)
        source.record_stream(self.downloading)
        return _recorded(self.downloading)

    def wait(self, ticket: Ticket) -> None:
        ticket.synchronize()


def _recorded(stream: torch.cuda.Stream) -> torch.cuda.Event:
    event = torch.cuda.Event()
    event.record(stream)
    return event


# -- the plan: which work units travel together, and where each input lies ----------------------------------------


@dataclass(frozen=True)
class Placement:
    """One read (or a block of rows of one) in a batch's device buffer: bytes offset .. offset + nbytes."""

    checkpoint: Checkpoint
    name: str
    rows: Rows
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Segment:
    """Bytes start .. stop of a batch's device buffer, staged in one slab and uploaded in one copy (staged in
    pageable memory when larger than a slab: a single row larger than a slab)."""

    start: int
    stop: int
    placements: tuple[Placement, ...]


@dataclass(frozen=True)
class InputView:
    """Where one input of a work unit lies in its batch's device buffer, and what it is."""

    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Batch:
    """Consecutive work units whose inputs travel in one device buffer. `on_host`: units with nothing to upload
    (nothing to read, or integer buffers, which the stream compares on the host): read into host memory."""

    positions: tuple[int, ...]
    reads: tuple[tuple[Read, ...], ...]
    nbytes: int = 0
    segments: tuple[Segment, ...] = ()
    views: tuple[tuple[InputView, ...], ...] = ()
    on_host: bool = False


def _aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


def _packed_end(end: int, sizes: Sequence[int]) -> int:
    """Where a batch laid out up to `end` ends with reads of `sizes` bytes added, each aligned."""
    for size in sizes:
        end = _aligned(end) + size
    return end


def _span(read: Read) -> tuple[tuple[int, ...], int]:
    checkpoint, name, rows = read
    shape, start, end = stored_span(checkpoint.tensors[name], rows)
    return shape, end - start


def plan_batches(units_reads: Sequence[Sequence[Read]], limits: StagingLimits) -> list[Batch]:
    """The batches a stream of work units (each given by its reads, in order) travels in: a run of consecutive
    small float units packed into one slab; every other float unit in a batch of its own, its reads laid end to end
    and cut into slab-sized segments (a read larger than a slab in blocks of rows); the rest on the host."""
    batches: list[Batch] = []
    small: list[int] = []
    small_end = 0

    def pack_small() -> None:
        nonlocal small_end
        if small:
            batches.append(_laid_out(small, units_reads, limits.slab_bytes))
            small.clear()
            small_end = 0

    for position, reads in enumerate(units_reads):
        if not reads or not all(ckpt.tensors[name].dtype.is_floating_point for ckpt, name, _ in reads):
            pack_small()
            batches.append(Batch((position,), (tuple(reads),), on_host=True))
            continue
        sizes = [_span(read)[1] for read in reads]
        if sum(sizes) > limits.small_unit_bytes:
            pack_small()
            batches.append(_laid_out([position], units_reads, limits.slab_bytes))
            continue
        if small and _packed_end(small_end, sizes) > limits.slab_bytes:
            pack_small()
        small.append(position)
        small_end = _packed_end(small_end, sizes)
    pack_small()
    return batches


def _laid_out(positions: Sequence[int], units_reads: Sequence[Sequence[Read]], slab_bytes: int) -> Batch:
    segments: list[Segment] = []
    current: list[Placement] = []
    views: list[tuple[InputView, ...]] = []
    cursor = 0

    def close() -> None:
        if current:
            segments.append(Segment(current[0].offset, current[-1].offset + current[-1].nbytes, tuple(current)))
            current.clear()

    for position in positions:
        unit_views = []
        for read in units_reads[position]:
            checkpoint, name, rows = read
            shape, nbytes = _span(read)
            start = _aligned(cursor)
            if nbytes <= slab_bytes:
                if current and start + nbytes - current[0].offset > slab_bytes:
                    close()
                current.append(Placement(checkpoint, name, rows, start, nbytes))
            else:
                close()
                segments += _in_row_blocks(read, start, nbytes, slab_bytes)
            unit_views.append(InputView(start, nbytes, checkpoint.tensors[name].dtype, shape))
            cursor = start + nbytes
        views.append(tuple(unit_views))
    close()
    return Batch(
        tuple(positions),
        tuple(tuple(units_reads[p]) for p in positions),
        nbytes=cursor,
        segments=tuple(segments),
        views=tuple(views),
    )


def _in_row_blocks(read: Read, start: int, nbytes: int, slab_bytes: int) -> list[Segment]:
    """A read larger than a slab as consecutive segments of whole rows, each at most a slab (one segment of one row
    when a row alone is larger), laid end to end from `start`."""
    checkpoint, name, rows = read
    info = checkpoint.tensors[name]
    first, stop = rows if rows is not None else (0, info.shape[0] if info.shape else 1)
    row_bytes = nbytes // max(1, stop - first)
    step = max(1, slab_bytes // max(1, row_bytes))
    segments = []
    offset = start
    for row in range(first, stop, step):
        block = (row, min(row + step, stop))
        size = (block[1] - block[0]) * row_bytes
        segments.append(Segment(offset, offset + size, (Placement(checkpoint, name, block, offset, size),)))
        offset += size
    return segments


# -- staging ------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Lent:
    slab: torch.Tensor
    ticket: Ticket
    landed: Callable[[], None] | None  # run once the copy is done, before the slab is handed out again
    done: bool = False


class StagingRing:
    """At most `count` staging slabs of `slab_bytes`, handed out again in the order they were lent to copies: when
    every slab is in flight, the host waits for the oldest copy (and runs what it asked for when it lands)."""

    def __init__(self, copies: Copies, slab_bytes: int, count: int):
        self.copies, self.slab_bytes, self.count = copies, slab_bytes, count
        self.made = 0
        self.free: list[torch.Tensor] = []
        self.in_flight: deque[_Lent] = deque()

    def take(self) -> torch.Tensor:
        if self.free:
            return self.free.pop()
        if self.made < self.count:
            self.made += 1
            return self.copies.staging_buffer(self.slab_bytes)
        lent = self.in_flight[0]
        self.settle(lent)
        return self.free.pop()

    def lend(self, slab: torch.Tensor, ticket: Ticket, landed: Callable[[], None] | None = None) -> _Lent:
        lent = _Lent(slab, ticket, landed)
        self.in_flight.append(lent)
        return lent

    def settle(self, through: _Lent) -> None:
        """Wait for every copy lent up to `through`, in order, and take their slabs back."""
        while not through.done:
            lent = self.in_flight.popleft()
            self.copies.wait(lent.ticket)
            if lent.landed is not None:
                lent.landed()
            lent.done = True
            self.free.append(lent.slab)


# -- uploads: run on the stream's read-ahead thread ---------------------------------------------------------------


@dataclass
class Arrived:
    """A batch's inputs: device views in their stored dtype once `ticket` is used (host tensors for a batch
    `on_host`), one list per work unit; `buffers`: the device memory they view."""

    batch: Batch
    inputs: list[list[torch.Tensor]]
    ticket: Ticket = None
    buffers: list[torch.Tensor] = field(default_factory=list)


class Uploads:
    """Reads each batch's inputs into staging slabs and queues their upload."""

    def __init__(self, copies: Copies, limits: StagingLimits):
        self.copies = copies
        self.ring = StagingRing(copies, limits.slab_bytes, limits.upload_slabs)

    def load(self, batch: Batch) -> Arrived:
        if batch.on_host:
            return Arrived(batch, [[ckpt.read(name, rows) for ckpt, name, rows in reads] for reads in batch.reads])
        buffer = self.copies.device_buffer(batch.nbytes)
        ticket = None
        for segment in batch.segments:
            queued = self._upload(segment, buffer)
            ticket = ticket if queued is None else queued
        inputs = [
            [buffer[v.offset : v.offset + v.nbytes].view(v.dtype).reshape(v.shape) for v in unit_views]
            for unit_views in batch.views
        ]
        return Arrived(batch, inputs, ticket, [buffer])

    def _upload(self, segment: Segment, buffer: torch.Tensor) -> Ticket:
        size = segment.stop - segment.start
        if size == 0:
            return None
        pageable = size > self.ring.slab_bytes  # one row larger than a slab
        slab = torch.empty(size, dtype=torch.uint8) if pageable else self.ring.take()
        for placement in segment.placements:
            at = placement.offset - segment.start
            placement.checkpoint.read_into(placement.name, placement.rows, slab[at : at + placement.nbytes])
        ticket = self.copies.upload(slab[:size], buffer[segment.start : segment.stop])
        if pageable:
            self.copies.wait(ticket)
        else:
            self.ring.lend(slab, ticket)
        return ticket


# -- downloads: on the computing thread ---------------------------------------------------------------------------

U = TypeVar("U")


@dataclass(eq=False)
class _Result(Generic[U]):
    unit: U
    host: torch.Tensor | None
    finite: bool = True
    last: _Lent | None = None  # its last piece's copy: the result is complete when it has landed


class Downloads(Generic[U]):
    """Results on their way to the host, in the order they were computed: each copied asynchronously into the
    download slabs after its kernel (with whether all its entries are finite, decided on the device), then once
    into a pageable tensor the caller owns."""

    def __init__(self, copies: Copies, limits: StagingLimits):
        self.copies = copies
        self.ring = StagingRing(copies, limits.slab_bytes, limits.download_slabs)
        self.piece_bytes = limits.slab_bytes - ALIGN  # a slab's last bytes carry the finiteness flag
        self.pending: deque[_Result[U]] = deque()

    def ready(self, unit: U, host: torch.Tensor | None) -> None:
        """A unit whose result is on the host already (or None: nothing computed), kept in its place in order."""
        self.pending.append(_Result(unit, host))

    def start(self, unit: U, result: torch.Tensor) -> None:
        """Queue `result` (on the device) for the host."""
        result = result.to(self.copies.device).contiguous()
        entry = _Result(unit, torch.empty(result.shape, dtype=result.dtype))
        finite = torch.isfinite(result).all().reshape(1).view(torch.uint8)
        source = result.reshape(-1).view(torch.uint8)
        target = entry.host.reshape(-1).view(torch.uint8)  # type: ignore[union-attr]
        total = source.numel()
        for start in range(0, max(total, 1), self.piece_bytes):
            stop = min(start + self.piece_bytes, total)
            slab = self.ring.take()
            ticket = self.copies.download(source[start:stop], slab[: stop - start])
            last = stop == total
            if last:
                ticket = self.copies.download(finite, slab[-1:])
            landed = partial(_landed, entry, target[start:stop], slab, last)
            entry.last = self.ring.lend(slab, ticket, landed)
        self.pending.append(entry)

    def finished(self, keep: int = 0) -> Iterator[tuple[U, torch.Tensor | None, bool]]:
        """(unit, its result on the host, whether every entry is finite) for all but the last `keep` results, in
        order, each waited for."""
        while len(self.pending) > keep:
            entry = self.pending.popleft()
            if entry.last is not None:
                self.ring.settle(entry.last)
            yield entry.unit, entry.host, entry.finite


def _landed(entry: _Result, target: torch.Tensor, slab: torch.Tensor, last: bool) -> None:
    target.copy_(slab[: target.numel()])
    if last:
        entry.finite = bool(slab[-1])
