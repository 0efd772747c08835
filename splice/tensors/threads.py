"""How many threads torch's operations use on the calling thread while a stream computes an elementwise kernel in
cache-sized slices.

On a slice of 128K elements, torch's intra-op pool costs more than it gains: its threads wake for every operation,
then spin waiting for the next, on the cores the stream's reader and writer threads need; with other load on the
machine a 3 x 1.6 GB bf16 soup on 2 cores took 63-76 s instead of 4 s (benchmarks/throughput.py). So the slices
run on the calling thread alone. torch's OpenMP builds (Linux, Windows) keep the thread count per thread, so it is
set to 1 on the calling thread for the slices and restored after, which no other thread sees; where the setting is
process-wide (torch's native thread pool), nothing is changed and the slices are cut to GRAIN_SIZE elements, below
which torch runs an operation on the calling thread anyway."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

GRAIN_SIZE = 32768
"""at::internal::GRAIN_SIZE: torch runs an operation on at most this many elements on the calling thread alone."""


@functools.cache
def threads_are_set_per_thread() -> bool:
    """Whether torch.set_num_threads changes the calling thread's setting only: OpenMP keeps it per thread."""
    return "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()


@contextlib.contextmanager
def calling_thread_only(slice_elements: int) -> Iterator[int]:
    """Within: torch operations of at most the yielded number of elements (`slice_elements`, or GRAIN_SIZE where
    the thread count is process-wide) run on the calling thread alone."""
    if not threads_are_set_per_thread():
        yield min(slice_elements, GRAIN_SIZE)
        return
    previous = torch.get_num_threads()
    if previous == 1:
        yield slice_elements
        return
    torch.set_num_threads(1)
    try:
        yield slice_elements
    finally:
        torch.set_num_threads(previous)
