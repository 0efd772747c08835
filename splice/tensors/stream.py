"""The executor every streamed engine runs on.

Output tensors are produced in the storage order of the first input (so each input shard is read
front to back, once). A background thread reads the inputs of the next output tensors while the
current one is computed; the queue between them bounds memory to `read_ahead` tensor groups.
Float inputs are moved to the compute device in fp32, the kernel runs there, and the result is cast
to the output dtype and handed to the writer.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from splice.errors import IncompatibleModelsError, NonFiniteOutputError, SpliceError
from splice.options import CHUNK_BYTES, DEFAULT_MAX_CONCURRENCY, RunOptions
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.device import compute_dtype_for, dtype_name, resolve_device
from splice.tensors.ranged import PART_BYTES, RangeFetcher
from splice.tensors.threads import calling_thread_only
from splice.tensors.transfer import Copies, CudaCopies, Downloads, StagingLimits, Uploads, plan_batches
from splice.tensors.turns import DrawingTurns, drawn, my_turn
from splice.tensors.writer import (
    OutputTensor,
    ShardedWriter,
    copy_side_files,
    ensure_output_free,
    staged_output,
)

log = logging.getLogger("splice.stream")

Compute = Callable[[str, list[torch.Tensor]], torch.Tensor]
"""(output tensor name, input tensors on the compute device in their working precision) -> output tensor."""
Slices = Callable[[], Iterator[list[torch.Tensor]]]
"""A fresh pass over a tensor's inputs in slices of rows, in order, each slice in the working precision."""
Prepare = Callable[[str, Sequence[torch.Tensor], Slices], "Compute | None"]
"""(output tensor name, its inputs as stored, their slices) -> what computes the slices, or None."""


@runtime_checkable
class Filling(Protocol):
    """What `Kernel.prepare` may return beside a plain Compute: it computes the slices, and can also compute the
    whole output in one compiled pass over the stored inputs (splice.merge.fused), bit for bit the slices' output."""

    def __call__(self, name: str, part: list[torch.Tensor]) -> torch.Tensor: ...

    def fill(self, inputs: Sequence[torch.Tensor], out: torch.Tensor) -> bool:
        """Whether it computed every value of `out` (the output dtype) from `inputs` (as stored), each finite and
        within the output dtype's range. False: it could not (a dtype it does not write, a value that does not fit),
        and `out` is unfinished: the stream computes the slices instead."""
        ...


@dataclass(frozen=True)
class Precision:
    """In what dtype a kernel's float inputs reach it.

    exact (the default): in fp32 (fp64 stays fp64), whatever the stored dtype; the result is cast to the output
      dtype once, at the end.
    not exact (mergekit's `dtype:` semantics): cast to `inputs_as` when given, else as stored, so a bf16 merge
      computes in bf16 as mergekit-yaml does.
    """

    exact: bool = True
    inputs_as: torch.dtype | None = None

    def working_dtype(self, stored: torch.dtype) -> torch.dtype:
        if self.exact:
            return compute_dtype_for(stored)
        return self.inputs_as or stored


@dataclass(frozen=True)
class Kernel:
    """What the stream runs for every output tensor, and what the executor may do with it.

    elementwise: each output row depends only on the same rows of the inputs, so the stream may feed the kernel
      blocks of rows (memory then stays flat however large a tensor is).
    passes_through: names of the tensors the kernel returns as its first input: the writer copies them as their
      first source stores them (inside the kernel when both sides are local files), nothing is read or computed.
    prepare: for a kernel whose output entries depend on the same entries of the inputs once a few statistics of
      the whole tensors are known (TIES: each delta's magnitude threshold): given the tensor's name, its inputs as
      stored and their slices, it returns what computes the slices, called on them in order (None: `compute` on the
      whole tensors). On the CPU the stream then computes the tensor in cache-sized slices as for `elementwise`;
      elsewhere `compute` runs on whole tensors, and both must give the same output bit for bit.
    in_order: the kernel draws from torch's default generator (DARE, DELLA), so its tensors draw in the plan's
      order: one seed, the same draws. Where its tensors are computed on several threads (on the CPU, `prepare`d),
      each draws in its turn (tensors/turns.py), in `prepare`, and is merged beside the next one's draws; else they
      are computed one at a time in the plan's order, whatever `RunOptions.compute_threads` says.
    prepare_waits_to_draw: the kernel's `prepare` waits for its turn itself (`turns.my_turn`) right before it
      draws, so what it computes before that runs beside the other tensors' draws; else the turn is waited for
      before `prepare` is called. Either way a tensor computed whole is computed in its turn.
    """

    compute: Compute
    elementwise: bool = False
    passes_through: frozenset[str] = frozenset()
    precision: Precision = Precision()
    prepare: Prepare | None = None
    in_order: bool = False
    prepare_waits_to_draw: bool = False

    @property
    def sliceable(self) -> bool:
        """Whether the CPU may compute a tensor of it in cache-sized slices of rows."""
        return self.elementwise or self.prepare is not None


@dataclass(frozen=True)
class OutputExtras:
    """What a streamed output carries beside its tensors and its source's side files."""

    metadata: Mapping[str, str] | None = None  # in every shard's safetensors header
    files: Mapping[str, bytes] | None = None  # name -> content, written beside the weights (after the side files)
    config_updates: Mapping[str, Any] | None = None  # set in the copied config.json (dotted: nested)
    replaced_side_files: Collection[str] = ()  # side files not copied: `files` replaces them (a new tokenizer)


@dataclass(frozen=True)
class StreamItem:
    """One output tensor and the stored tensors it is computed from."""

    output: OutputTensor
    sources: tuple[tuple[Checkpoint, str], ...]

    @property
    def input_bytes(self) -> int:
        return sum(ckpt.tensors[name].nbytes for ckpt, name in self.sources)


@dataclass
class StreamReport:
    out: Path
    tensors: int
    bytes_read: int
    bytes_written: int
    shard_files: list[str]
    device: str
    seconds: float
    side_files: list[str] = field(default_factory=list)
    method_report: Any = None  # what the method says of its run (a data-dependent merge: its rules and solves)


def _float_names(checkpoint: Checkpoint) -> list[str]:
    return [name for name, info in checkpoint.tensors.items() if info.dtype.is_floating_point]


def check_same_tensors(checkpoints: Sequence[Checkpoint], limit: int = 5) -> None:
    """All inputs must hold the same float tensors (names, shapes, dtypes).

    Integer and bool buffers (e.g. BERT's position_ids, which older transformers saved and newer ones do
    not) may be absent from some inputs; where present they must agree, which the stream checks.
    """
    reference = checkpoints[0]
    problems: list[str] = []
    for other in checkpoints[1:]:
        missing = [n for n in _float_names(reference) if n not in other.tensors]
        extra = [n for n in _float_names(other) if n not in reference.tensors]
        problems += [f"{n} is in {reference.location} but not in {other.location}" for n in missing]
        problems += [f"{n} is in {other.location} but not in {reference.location}" for n in extra]
        for name, info in reference.tensors.items():
            theirs = other.tensors.get(name)
            if theirs is None:
                continue
            if theirs.shape != info.shape:
                problems.append(
                    f"{name} has shape {list(info.shape)} in {reference.location} "
                    f"but {list(theirs.shape)} in {other.location}"
                )
            elif theirs.dtype != info.dtype:
                problems.append(
                    f"{name} is {dtype_name(info.dtype)} in {reference.location} "
                    f"but {dtype_name(theirs.dtype)} in {other.location}"
                )
    if problems:
        shown = "; ".join(problems[:limit])
        more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
        raise IncompatibleModelsError(f"models do not match tensor for tensor: {shown}{more}")


def plan_same_name(checkpoints: Sequence[Checkpoint], out_dtype: torch.dtype | None) -> list[StreamItem]:
    """Output tensor i from input tensors of the same name, in the first input's storage order.

    Non-float buffers come from the inputs that hold them (the first input decides which are kept).
    """
    check_same_tensors(checkpoints)
    items = []
    for name, info in checkpoints[0].tensors.items():
        floating = info.dtype.is_floating_point
        dtype = out_dtype if (out_dtype is not None and floating) else info.dtype
        sources = tuple((c, name) for c in checkpoints if floating or name in c.tensors)
        items.append(StreamItem(OutputTensor(name, dtype, info.shape), sources))
    return items


_DONE = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


Rows = tuple[int, int] | None
Reads = Sequence[tuple[Checkpoint, str, Rows]]
"""What one step reads: (checkpoint, tensor name, rows of dim 0 or None for all) per input."""


def read_all(reads: Reads) -> list[torch.Tensor]:
    return [ckpt.read(name, rows) for ckpt, name, rows in reads]


def read_ahead(
    groups: Sequence[Any],
    depth: int,
    read: Callable[[Any], Any] | None = None,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
) -> Iterator[tuple[int, Any]]:
    """Yield (group position, `read(group)`: by default its tensors), reading up to `depth` groups in advance on a
    background thread. By default remote tensors are requested on a pool of `max_concurrency` ranged requests
    (`splice.tensors.ranged`) as the thread reaches their group, so the groups read ahead are fetched together;
    memory stays `depth` + 2 groups."""
    slots: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    fetcher = RangeFetcher(max_concurrency)

    def offer(value: object) -> bool:
        while not stop.is_set():
            try:
                slots.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for position, group in enumerate(groups):
                value = read(group) if read is not None else [c.start_read(n, r, fetcher) for c, n, r in group]
                if not offer((position, value)):
                    return
            offer(_DONE)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            offer(_Failure(exc))

    thread = threading.Thread(target=produce, name="splice-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            value = slots.get()
            if value is _DONE:
                return
            if isinstance(value, _Failure):
                raise value.error
            position, got = value
            yield position, got if read is not None else [pending.result() for pending in got]
    finally:
        stop.set()
        thread.join()
        fetcher.close()


def compute_one(
    item: StreamItem,
    tensors: list[torch.Tensor],
    kernel: Kernel,
    device: torch.device,
    reread: Callable[[], list[torch.Tensor]],
) -> torch.Tensor:
    """The kernel's output for one work unit, in the output dtype, refused if it holds NaN/Inf where the inputs
    (read again by `reread`, as a kernel may change its inputs in place) held none."""
    out = item.output
    if not all(t.dtype.is_floating_point for t in tensors):
        # Integer/bool buffers (position ids, masks) are not merged: they must agree and are copied.
        first = tensors[0]
        if any(t.dtype != first.dtype or not torch.equal(t, first) for t in tensors[1:]):
            raise IncompatibleModelsError(f"non-float tensor {out.name} differs between inputs; cannot merge it")
        return first.to(out.dtype)
    sliced = _computed_in_slices(kernel, out.name, tensors, out.dtype) if _in_slices(kernel, tensors, device) else None
    if sliced is not None:
        result, finite = sliced
        if not finite:
            refuse_new_non_finite(out.name, result, reread)
        return result
    moved = [t.to(device=device, dtype=kernel.precision.working_dtype(t.dtype)) for t in tensors]
    my_turn()  # a kernel that draws draws as it computes the whole tensor
    computed = kernel.compute(out.name, moved)
    result = computed.to(dtype=out.dtype)
    if not fits_in(computed, out.dtype):  # only then can the cast hold NaN/Inf: look at the output itself
        refuse_new_non_finite(out.name, result, reread)
    return result.to("cpu")


def fits_in(values: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether float `values` are all within `dtype`'s finite range (no NaN, no Inf), so that cast to `dtype` every
    entry is finite. One pass over the values in their working precision, where a sum of a bf16 output costs ~17x an
    fp32 one. False does not mean the cast holds NaN/Inf (values just past the largest round down to it): the caller
    then looks at the cast values."""
    if values.numel() == 0:
        return True
    low, high = torch.aminmax(values)
    return within(low, high, dtype)


def within(low: torch.Tensor, high: torch.Tensor, dtype: torch.dtype) -> bool:
    largest = torch.finfo(dtype).max
    return bool((low >= -largest) & (high <= largest))  # NaN compares False


COMPUTE_SLICE = 1 << 17
"""Elements per slice of an elementwise kernel's work on the CPU (512 KB in fp32): each input's slice, converted to
the working dtype, the kernel's temporaries and the output's slice stay in the CPU's cache. Converting whole blocks
first (4 MB of bf16 = 8 MB of fp32 per input) ran a 3 x 1.6 GB bf16 soup 2.8x slower (benchmarks/throughput.py).
The slices run on the calling thread alone (splice.tensors.threads says why)."""


def _in_slices(kernel: Kernel, tensors: Sequence[torch.Tensor], device: torch.device) -> bool:
    first = tensors[0]
    return (
        kernel.sliceable
        and device.type == "cpu"
        and first.dim() > 0
        and first.numel() > COMPUTE_SLICE
        and all(t.shape == first.shape for t in tensors[1:])
    )


def _computed_in_slices(
    kernel: Kernel, name: str, tensors: Sequence[torch.Tensor], dtype: torch.dtype
) -> tuple[torch.Tensor, bool] | None:
    """An elementwise kernel (or one `prepare`d for it) run on blocks of rows of about COMPUTE_SLICE elements, each
    cast into the output as it is done: the same arithmetic on every entry as one call over the whole block (its
    rows depend only on theirs). With it, whether every output entry is finite: each slice's least and greatest
    values are kept while the slice is in the cache (`fits_in`), and the output's entries are looked at only where
    those pass the output dtype's range. None when `prepare` declines (the whole tensors are computed instead)."""
    first = tensors[0]
    with calling_thread_only(COMPUTE_SLICE) as slice_elements:
        rows = max(1, slice_elements // max(1, first[0].numel()))
        starts = range(0, first.shape[0], rows)

        def slices() -> Iterator[list[torch.Tensor]]:
            for start in starts:
                yield [t[start : start + rows].to(dtype=kernel.precision.working_dtype(t.dtype)) for t in tensors]

        in_fp32 = all(kernel.precision.working_dtype(t.dtype) == torch.float32 for t in tensors)
        if kernel.prepare is not None and not in_fp32:  # its whole-tensor statistics are taken in fp32 (and its fill)
            return None
        compute = kernel.compute if kernel.prepare is None else kernel.prepare(name, tensors, slices)
        if compute is None:
            return None
        drawn()  # whatever this tensor draws is drawn: the next one may draw while it is merged
        result = torch.empty(first.shape, dtype=dtype)
        if isinstance(compute, Filling) and compute.fill(tensors, result):
            return result, True
        lows, highs = [], []
        for start, part in zip(starts, slices()):
            computed = compute(name, part)
            result[start : start + rows].copy_(computed)
            low, high = torch.aminmax(computed)
            lows.append(low)
            highs.append(high)
        fits = within(torch.stack(lows).min(), torch.stack(highs).max(), dtype)
        finite = fits or bool(torch.isfinite(result).all())
    return result, finite


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry of a float tensor is finite. A sum is finite only if every entry is, and summing is
    ~10x cheaper than `torch.isfinite(t).all()`, which runs only when the sum is not (finite entries whose sum
    overflows)."""
    return bool(torch.isfinite(tensor.sum(dtype=torch.float32))) or bool(torch.isfinite(tensor).all())


def refuse_new_non_finite(name: str, output: torch.Tensor, inputs: Callable[[], Sequence[torch.Tensor]]) -> None:
    """Refuse an output tensor (in its output dtype, on the compute device) holding NaN/Inf where its inputs held
    none: a bad weight or scale, or a value too large for the output dtype. Inputs that already hold NaN/Inf (a
    mask) pass. `inputs` is called only when the output is not finite, so a finite merge pays one summation."""
    if all_finite(output) or not all(all_finite(t) for t in inputs()):
        return
    raise NonFiniteOutputError(
        f"output tensor {name} would hold NaN/Inf ({dtype_name(output.dtype)}) although its "
        f"inputs are finite; nothing was written: check the weights and parameters (a value "
        f"too large for {dtype_name(output.dtype)}?)"
    )


def refuse_new_non_finite_state(state: Mapping[str, torch.Tensor], sources: Sequence[Checkpoint]) -> None:
    """`refuse_new_non_finite` for an engine that writes a whole model at once (greedy soup, fusion): each
    float output tensor against the tensors of that name in `sources`, read only if the output is not finite."""
    for name, tensor in state.items():
        if tensor.is_floating_point():
            refuse_new_non_finite(name, tensor, partial(read_where_held, name, sources))


def read_where_held(name: str, sources: Sequence[Checkpoint]) -> list[torch.Tensor]:
    """Tensor `name` of each of `sources` that holds one (what a refused non-finite output is compared with)."""
    return [c.read(name) for c in sources if name in c]


class WriteBehind:
    """Hands computed tensors to the writer on a background thread, so writing one tensor overlaps
    computing the next; at most `depth` results wait in between."""

    _STOP = None

    def __init__(self, writer: ShardedWriter, depth: int = 2):
        self.writer = writer
        self.pending: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._drain, name="splice-write-behind", daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        while (job := self.pending.get()) is not self._STOP:
            if self.error is None:
                try:
                    action, arguments = job
                    action(*arguments)
                except BaseException as exc:  # re-raised on the caller's thread
                    self.error = exc

    def submit(self, name: str, tensor: torch.Tensor, rows: Rows = None) -> None:
        if self.error is not None:
            raise self.error
        self.pending.put((self.writer.write, (name, tensor, rows)))

    def submit_copy(self, name: str, source: Checkpoint, stored_name: str) -> None:
        """Queue tensor `name` to be written as `source` stores it (named `stored_name` there), without reading it
        here."""
        if self.error is not None:
            raise self.error
        self.pending.put((self.writer.copy_stored, (name, source, stored_name)))

    def finish(self) -> None:
        """Wait until everything submitted is written; raise what the writer raised."""
        self.stop()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        if self.thread.is_alive():
            self.pending.put(self._STOP)
            self.thread.join()


@dataclass(frozen=True)
class WorkUnit:
    """One kernel call: a whole output tensor, or a block of its rows."""

    item: StreamItem
    rows: Rows = None
    verbatim: bool = False  # copied as stored by the writer: nothing to read or compute

    @property
    def reads(self) -> Reads:
        return [] if self.verbatim else [(ckpt, name, self.rows) for ckpt, name in self.item.sources]

    @property
    def input_bytes(self) -> int:
        if self.rows is None:
            return self.item.input_bytes
        rows, (start, stop) = self.item.output.shape[0], self.rows
        return sum(ckpt.tensors[name].nbytes // rows * (stop - start) for ckpt, name in self.item.sources)

    @property
    def completes_item(self) -> bool:
        return self.rows is None or self.rows[1] == self.item.output.shape[0]


def work_units(
    plan: Sequence[StreamItem], chunked: bool, chunk_bytes: int = CHUNK_BYTES, verbatim: Collection[str] = ()
) -> list[WorkUnit]:
    """One unit per output tensor, or with `chunked`, blocks of rows of about `chunk_bytes` per input; of at least
    `ranged.PART_BYTES` when an input is remote, one ranged request each (4 MB requests cost moto's S3 and its
    client 35% more CPU per byte than 8 MB ones: benchmarks/README.md)."""
    units = []
    for item in plan:
        if item.output.name in verbatim:
            units.append(WorkUnit(item, verbatim=True))
            continue
        biggest = max(ckpt.tensors[name].nbytes for ckpt, name in item.sources)
        shape = item.output.shape
        floating = all(ckpt.tensors[name].dtype.is_floating_point for ckpt, name in item.sources)
        limit = chunk_bytes if all(ckpt.is_local for ckpt, _ in item.sources) else max(chunk_bytes, PART_BYTES)
        if not (chunked and floating and shape and shape[0] > 1 and biggest > limit):
            units.append(WorkUnit(item))
            continue
        step = max(1, limit // (biggest // shape[0]))
        units += [WorkUnit(item, (row, min(row + step, shape[0]))) for row in range(0, shape[0], step)]
    return units


def computed(
    units: Sequence[WorkUnit], kernel: Kernel, device: torch.device, run: RunOptions
) -> Iterator[tuple[WorkUnit, torch.Tensor | None]]:
    """Each work unit with the kernel's output for it (on the CPU), inputs read ahead on a background thread;
    None for a unit the kernel passes through as stored. Progress is told as each unit completes."""
    if device.type == "cuda":
        yield from computed_with_copies(units, kernel, CudaCopies(device), run)
        return
    workers = compute_workers(kernel, device, run)
    if workers > 1:
        yield from _computed_in_parallel(units, kernel, device, run, workers)
        return
    progress = run.reporter
    with torch.inference_mode():
        for position, tensors in read_ahead(
            [unit.reads for unit in units], run.read_ahead_depth, max_concurrency=run.max_concurrency
        ):
            unit = units[position]
            result = None if unit.verbatim else _compute_unit(unit, tensors, kernel, device)
            yield unit, result
            progress.advance(int(unit.completes_item), unit.input_bytes)


def compute_workers(kernel: Kernel, device: torch.device, run: RunOptions) -> int:
    """How many threads compute work units at once: `run.compute_threads` (0: one per core, at most
    AUTO_COMPUTE_THREADS) for a kernel the CPU computes in slices, each on its thread alone; 1 for every other
    kernel (mergekit's random methods draw from one generator in order), its operations on that thread alone too
    (`_compute_unit`: on 2 cores torch's pool made patch apply and port 20-40% slower, its threads spinning beside
    the reader, the writer and the hashes). A kernel that draws (`Kernel.in_order`) draws in turns
    (`_computed_in_parallel`)."""
    if device.type != "cpu" or not kernel.sliceable:
        return 1
    return run.compute_threads or min(AUTO_COMPUTE_THREADS, os.cpu_count() or 1)


AUTO_COMPUTE_THREADS = 4
COMPUTE_BYTES_IN_FLIGHT = 256 * 1024 * 1024
"""The stored bytes of the inputs the compute threads may hold together (one unit larger than this is computed
alone)."""


def _compute_unit(
    unit: WorkUnit,
    tensors: list[torch.Tensor],
    kernel: Kernel,
    device: torch.device,
    turn: contextlib.AbstractContextManager[None] | None = None,
) -> torch.Tensor:
    """`turn`: held while the unit draws (`DrawingTurns.taken`), for a kernel that draws on several threads."""
    tick = time.perf_counter()
    # inference mode and torch's thread count are per thread: a compute thread sets its own, and runs its
    # operations alone (the whole tensors below COMPUTE_SLICE too), the threads together using the cores
    with turn or contextlib.nullcontext(), torch.inference_mode(), calling_thread_only(COMPUTE_SLICE):
        result = compute_one(unit.item, tensors, kernel, device, partial(read_all, unit.reads))
    log.debug(
        "%s rows %s from %d inputs in %.1f ms",
        unit.item.output.name,
        unit.rows or "all",
        len(tensors),
        1000 * (time.perf_counter() - tick),
    )
    return result


def _computed_in_parallel(
    units: Sequence[WorkUnit], kernel: Kernel, device: torch.device, run: RunOptions, workers: int
) -> Iterator[tuple[WorkUnit, torch.Tensor | None]]:
    """`computed` with `workers` units computed at once on threads of their own, results handed on in the units'
    order: besides the units read ahead and written behind, at most `workers` + 1 units in hand, and no more than
    one while their inputs pass COMPUTE_BYTES_IN_FLIGHT (whole tensors of a large vocabulary are computed one or two
    at a time: memory stays flat in the model's size)."""
    progress = run.reporter
    in_flight: deque[tuple[WorkUnit, concurrent.futures.Future | None]] = deque()
    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="splice-compute")
    turns = DrawingTurns() if kernel.in_order else None  # the pool starts the units in the order they are handed
    handed = 0

    def oldest() -> tuple[WorkUnit, torch.Tensor | None]:
        unit, job = in_flight.popleft()
        return unit, None if job is None else job.result()

    def no_room_for(unit: WorkUnit) -> bool:
        held = [other.input_bytes for other, job in in_flight if job is not None]
        too_large = held and not unit.verbatim and sum(held) + unit.input_bytes > COMPUTE_BYTES_IN_FLIGHT
        return len(in_flight) > workers or bool(too_large)

    try:
        for position, tensors in read_ahead(
            [unit.reads for unit in units], run.read_ahead_depth, max_concurrency=run.max_concurrency
        ):
            unit = units[position]
            while no_room_for(unit):
                done, result = oldest()
                yield done, result
                progress.advance(int(done.completes_item), done.input_bytes)
            job = None
            if not unit.verbatim:
                turn = None if turns is None else turns.taken(handed, wait=not kernel.prepare_waits_to_draw)
                job = pool.submit(_compute_unit, unit, tensors, kernel, device, turn)
                handed += 1
            in_flight.append((unit, job))
        while in_flight:
            unit, result = oldest()
            yield unit, result
            progress.advance(int(unit.completes_item), unit.input_bytes)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def computed_with_copies(
    units: Sequence[WorkUnit],
    kernel: Kernel,
    copies: Copies,
    run: RunOptions,
    limits: StagingLimits = StagingLimits(),
) -> Iterator[tuple[WorkUnit, torch.Tensor | None]]:
    """`computed` on a device the host copies to and from (a GPU: `CudaCopies`): inputs are staged in pinned memory
    and uploaded on a side stream while earlier units compute, small units several to a copy; each result comes
    back while the next is computed (tensors/transfer.py). Inputs reach the device as stored and are converted
    there, where `compute_one` converts them on the host: to fp32 that is exact, so the kernel sees the same values,
    bit for bit (a `Precision` narrower than the stored dtype rounds to nearest even on either side: the same
    numbers, NaN payloads aside); the kernel, the cast and the NaN/Inf refusal are `compute_one`'s."""
    progress = run.reporter
    uploads, downloads = Uploads(copies, limits), Downloads[WorkUnit](copies, limits)

    def finished(keep: int) -> Iterator[tuple[WorkUnit, torch.Tensor | None]]:
        for unit, result, finite in downloads.finished(keep):
            if not finite:
                assert result is not None
                refuse_new_non_finite(unit.item.output.name, result, partial(read_all, unit.reads))
            yield unit, result
            progress.advance(int(unit.completes_item), unit.input_bytes)

    batches = plan_batches([unit.reads for unit in units], limits)
    with torch.inference_mode():
        for _, arrived in read_ahead(batches, run.read_ahead_depth, read=uploads.load):
            copies.use(arrived.ticket, arrived.buffers)
            for position, tensors in zip(arrived.batch.positions, arrived.inputs):
                unit = units[position]
                out = unit.item.output
                if unit.verbatim:
                    downloads.ready(unit, None)
                elif arrived.batch.on_host:  # integer buffers: compared and copied on the host
                    cpu = torch.device("cpu")
                    downloads.ready(unit, compute_one(unit.item, tensors, kernel, cpu, partial(read_all, unit.reads)))
                else:
                    moved = [t.to(dtype=kernel.precision.working_dtype(t.dtype)) for t in tensors]
                    downloads.start(unit, kernel.compute(out.name, moved).to(dtype=out.dtype))
                yield from finished(keep=1)  # the result before this one, while this one computes
        yield from finished(keep=0)


def stream_to_memory(
    plan: Sequence[StreamItem], kernel: Kernel, *, run: RunOptions | None = None, description: str = "merging"
) -> dict[str, torch.Tensor]:
    """Every planned output tensor, computed as `run_stream` computes it, held in memory (stored names, output
    dtypes, on the CPU) instead of written: a candidate a search evaluates without writing it."""
    run = run or RunOptions()
    units = work_units(plan, False, run.chunk_bytes, kernel.passes_through)  # whole tensors: nothing to assemble
    progress = run.reporter
    total_in = sum(item.input_bytes for item in plan)
    progress.start(description, len(plan), total_in)
    state: dict[str, torch.Tensor] = {}
    try:
        for unit, result in computed(units, kernel, resolve_device(run.device), run):
            name = unit.item.output.name
            if result is None:
                checkpoint, stored_name = unit.item.sources[0]
                result = checkpoint.read(stored_name)
            state[name] = result
    finally:
        progress.finish()
    return state


def write_side_files(
    source: Checkpoint, directory: Path, out_dtype: torch.dtype | None, extras: OutputExtras
) -> list[str]:
    """What a streamed output holds beside its weights, written to `directory`: `source`'s side files (its config
    recording `out_dtype` and the extras' config updates), then the extras' own files. Their names, in order."""
    side = copy_side_files(source, directory, out_dtype, extras.config_updates, extras.replaced_side_files)
    for name, content in (extras.files or {}).items():
        (directory / name).write_bytes(content)
        side.append(name)
    return side


def run_stream(
    plan: Sequence[StreamItem],
    kernel: Kernel,
    out: str | os.PathLike,
    *,
    side_files_from: Checkpoint,
    run: RunOptions | None = None,
    out_dtype: torch.dtype | None = None,
    extras: OutputExtras | None = None,
    description: str = "merging",
    then: Callable[[], None] | None = None,
) -> StreamReport:
    """Compute every planned output tensor and publish the model directory at `out`, with the side files of
    `side_files_from` (its config recording `out_dtype`) and `extras` written before it is published. `then` is
    called once every tensor is computed (the last ones may still be being written), before the side files: what
    the kernel measured on the way can then join `extras.files`, and an error it raises publishes nothing."""
    run = run or RunOptions()
    torch_device = resolve_device(run.device)
    units = work_units(plan, kernel.elementwise, run.chunk_bytes, kernel.passes_through)

    def produce(behind: WriteBehind) -> None:
        for unit, result in computed(units, kernel, torch_device, run):
            if result is None:
                behind.submit_copy(unit.item.output.name, *unit.item.sources[0])
            else:
                behind.submit(unit.item.output.name, result, unit.rows)
        if then is not None:
            then()

    progress = run.reporter
    total_in = sum(item.input_bytes for item in plan)
    progress.start(description, len(plan), total_in)
    try:
        return publish_model(
            [item.output for item in plan],
            produce,
            out,
            side_files_from=side_files_from,
            run=run,
            out_dtype=out_dtype,
            extras=extras,
            bytes_read=total_in,
        )
    finally:
        progress.finish()


def publish_model(
    outputs: Sequence[OutputTensor],
    produce: Callable[[WriteBehind], None],
    out: str | os.PathLike,
    *,
    side_files_from: Checkpoint,
    run: RunOptions,
    out_dtype: torch.dtype | None = None,
    extras: OutputExtras | None = None,
    bytes_read: int = 0,
) -> StreamReport:
    """The model directory at `out`, written by the output rule: `produce` hands every tensor of `outputs`, in
    that order, to the writer it is given; then the side files of `side_files_from` (its config recording
    `out_dtype`) and `extras`; then it is published. What streamed engines and the block walk write through."""
    extras = extras or OutputExtras()
    torch_device = resolve_device(run.device)
    ensure_output_free(out, run.force)
    started = time.perf_counter()
    with staged_output(out, run.force) as staging:
        writer = ShardedWriter(staging, list(outputs), run.shard_size, extras.metadata)
        behind = WriteBehind(writer, depth=run.read_ahead_depth)
        try:
            produce(behind)
            behind.finish()
            writer.close()
        except BaseException:
            behind.stop()
            writer.abort()
            raise
        side = write_side_files(side_files_from, staging, out_dtype, extras)
    return StreamReport(
        out=Path(out),
        tensors=len(outputs),
        bytes_read=bytes_read,
        bytes_written=writer.total_bytes,
        shard_files=writer.file_names,
        device=str(torch_device),
        seconds=time.perf_counter() - started,
        side_files=side,
    )


def read_model(checkpoint: Checkpoint, depth: int = 2) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of one model, in storage order, read ahead on a background thread."""
    names = list(checkpoint.tensors)
    for position, (tensor,) in read_ahead([((checkpoint, name, None),) for name in names], depth):
        yield names[position], tensor


def read_floats(checkpoint: Checkpoint, device: torch.device) -> dict[str, torch.Tensor]:
    """A whole model with float tensors in their working precision on `device` (engines that need it all)."""
    state = {}
    for name, tensor in read_model(checkpoint):
        if tensor.dtype.is_floating_point:
            tensor = tensor.to(device=device, dtype=compute_dtype_for(tensor.dtype))
        state[name] = tensor
    return state


def open_all(locations: Sequence[str], storage_options: dict | None = None) -> list[Checkpoint]:
    if not locations:
        raise SpliceError("no models given")
    return [Checkpoint.open(loc, storage_options) for loc in locations]
