"""Remote tensor bytes fetched by ranged requests: several in flight at once, each retried when it fails for a reason
that can pass, each written into the destination tensor's buffer.

A range larger than `PART_BYTES` is fetched in parts; a `RangeFetcher` keeps at most `max_concurrency` requests in
flight (a pool of that many threads, shared by every read it starts), so an object store's latency is paid once per
`max_concurrency` requests instead of once per tensor. fsspec hands a range back as the response body's `bytes`, and
that body is copied once, into the tensor's own buffer, and dropped.

A request that fails is tried `ATTEMPTS` times in all, waiting 0.25 s, 0.5 s, then 1 s in between (times 0.5 to 1 at
random, so parallel requests do not retry in step): at most 1.75 s of waiting per request, on top of the retries the
backend makes on its own (botocore's and s3fs's for S3). A failure that cannot pass on retry (a missing object,
permission denied, an invalid range) is not retried. What is left is one `CheckpointError` naming the file, the
tensor and the backend's reason.
"""

from __future__ import annotations

import errno
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import fsspec
import torch

from splice.errors import CheckpointError, SpliceError, first_line

PART_BYTES = 8 * 1024 * 1024
"""The largest single request: a larger range is fetched in parts of this size, concurrently (object stores serve
ranges of 8-16 MB at full speed; smaller ones pay the request's latency more often)."""

ATTEMPTS = 4
FIRST_WAIT_S = 0.25  # doubled after each failed attempt: 0.25 + 0.5 + 1.0 = 1.75 s at most

# Failures a retry cannot mend: the object is not there, may not be read, or the request itself is wrong.
_PERMANENT_TYPES = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    ValueError,
    TypeError,
    NotImplementedError,
    SpliceError,
)
_PERMANENT_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EINVAL, errno.ENAMETOOLONG, errno.ENOSYS}


def is_permanent(error: BaseException) -> bool:
    """Whether a request's failure cannot pass on retry (fsspec backends map 404 and 403 to these types)."""
    if isinstance(error, _PERMANENT_TYPES):
        return True
    return isinstance(error, OSError) and error.errno in _PERMANENT_ERRNOS


@dataclass(frozen=True)
class RemoteRange:
    """Where a tensor's bytes (or a block of its rows) lie in a remote file, and what they hold."""

    fs: fsspec.AbstractFileSystem
    path: str  # as the filesystem names it
    start: int
    end: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    where: str  # the file as the user named it, for messages
    tensor: str

    def empty(self) -> torch.Tensor:
        """The bytes' destination: a buffer of the range's size."""
        return torch.empty(self.end - self.start, dtype=torch.uint8)

    def value(self, raw: torch.Tensor) -> torch.Tensor:
        return raw.view(self.dtype).reshape(self.shape)


def fetch_part(span: RemoteRange, start: int, end: int, into: memoryview, stop: threading.Event | None = None) -> None:
    """Bytes start..end-1 of the span's file, written into `into` (their size), retried as the module says; `stop`
    ends the waits between attempts early (the read is no longer wanted)."""
    waited = 0.0
    for attempt in range(1, ATTEMPTS + 1):
        try:
            data = span.fs.cat_file(span.path, start=start, end=end)
        except Exception as exc:  # the backend's own error types: botocore, aiohttp, OSError, ...
            if is_permanent(exc):
                raise CheckpointError(f"{span.where}: cannot read tensor {span.tensor}: {first_line(exc)}") from exc
            if attempt == ATTEMPTS:
                raise CheckpointError(
                    f"{span.where}: cannot read tensor {span.tensor}: {first_line(exc)} ({ATTEMPTS} attempts over "
                    f"{waited:.1f} s); check that the store is reachable, then run again"
                ) from exc
            delay = FIRST_WAIT_S * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)
            if stop is None:
                time.sleep(delay)
            elif stop.wait(delay):
                raise CheckpointError(f"{span.where}: reading tensor {span.tensor} was abandoned") from exc
            waited += delay
            continue
        if len(data) != end - start:
            raise CheckpointError(f"{span.where}: file ends inside tensor {span.tensor}")
        into[:] = data
        return


def read_range(span: RemoteRange) -> torch.Tensor:
    """The span's value, fetched by one request (retried as the module says): a read made on its own."""
    raw = span.empty()
    if span.end > span.start:
        fetch_part(span, span.start, span.end, memoryview(raw.numpy()))  # type: ignore[arg-type]
    return span.value(raw)


class PendingRead:
    """A tensor whose bytes may still be on their way: `result()` waits for them."""

    def __init__(self, tensor: torch.Tensor, parts: Sequence[Future] = ()):
        self._tensor = tensor
        self._parts = list(parts)

    def result(self) -> torch.Tensor:
        """The tensor, once every part has arrived; the first part's failure (the others are cancelled)."""
        if self._parts:
            done, _ = wait(self._parts, return_when=FIRST_EXCEPTION)
            failed = [part for part in self._parts if part in done and part.exception() is not None]
            if failed:
                for part in self._parts:
                    part.cancel()
                raise failed[0].exception()  # type: ignore[misc]
            self._parts = []
        return self._tensor


class RangeFetcher:
    """Fetches remote spans in parts of at most `part_bytes` (default `PART_BYTES`), with at most `max_concurrency`
    requests in flight.

    Memory: the fetcher holds no bytes of its own; each read's destination tensor is allocated when the read
    starts, so the bytes in flight are those of the reads its caller has started and not yet consumed (the stream's
    read-ahead bounds them)."""

    def __init__(self, max_concurrency: int, part_bytes: int | None = None):
        self.max_concurrency = max_concurrency
        self.part_bytes = part_bytes or PART_BYTES
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="splice-fetch")

    def start(self, span: RemoteRange) -> PendingRead:
        """Begin fetching the span: its parts are queued for the pool, and the read is returned at once."""
        raw = span.empty()
        view = memoryview(raw.numpy())  # type: ignore[arg-type]  # numpy: a buffer on 3.12+ only
        parts = [
            self._pool.submit(fetch_part, span, begin, stop, view[begin - span.start : stop - span.start], self._stop)
            for begin in range(span.start, span.end, self.part_bytes)
            for stop in (min(begin + self.part_bytes, span.end),)
        ]
        return PendingRead(span.value(raw), parts)

    def close(self) -> None:
        """Cancel the requests not yet started and wait for those in flight (no retry waits again)."""
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> RangeFetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
