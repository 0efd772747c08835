"""An elementwise kernel's cache-sized slices run on the calling thread alone (splice.tensors.threads): on torch's
OpenMP builds by a thread count set for the calling thread only and restored after; elsewhere by slices no larger
than torch's grain size, with nothing changed. Either way the output is the one call over the whole tensor gives."""

from __future__ import annotations

import threading

import pytest
import torch

import splice.tensors.stream as stream
import splice.tensors.threads as threads
from splice.tensors.stream import Kernel


def test_the_thread_count_is_per_thread_where_the_module_says_so():
    """What `calling_thread_only` relies on, checked against torch itself: where the module says the count is per
    thread, a count set on another thread leaves this thread's alone; where it says process-wide, it does not."""
    mine = torch.get_num_threads()
    seen = []

    def elsewhere():
        torch.set_num_threads(mine + 1)
        seen.append(torch.get_num_threads())

    worker = threading.Thread(target=elsewhere)
    worker.start()
    worker.join(timeout=30)
    try:
        assert seen == [mine + 1]
        assert (torch.get_num_threads() == mine) == threads.threads_are_set_per_thread()
    finally:
        torch.set_num_threads(mine)


@pytest.fixture
def two_threads():
    """This thread's torch pool at 2 threads (on a 1-core machine too), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def observing_kernel(calls: list[tuple[int, int]]) -> Kernel:
    """A weighted sum that records (elements, torch's thread count) of every call."""

    def compute(name, tensors):
        calls.append((tensors[0].numel(), torch.get_num_threads()))
        return tensors[0] * 0.25 + tensors[1] * 0.75

    return Kernel(compute, elementwise=True)


def inputs() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(700, 300, generator=generator).to(torch.bfloat16) for _ in range(2)]


def expected(tensors: list[torch.Tensor]) -> torch.Tensor:
    return (tensors[0].float() * 0.25 + tensors[1].float() * 0.75).to(torch.bfloat16)


def test_slices_run_on_the_calling_thread_alone_and_the_count_comes_back(monkeypatch, two_threads):
    monkeypatch.setattr(stream, "COMPUTE_SLICE", 60_000)
    calls: list[tuple[int, int]] = []
    tensors = inputs()
    result, finite = stream._computed_in_slices(observing_kernel(calls), "w", tensors, torch.bfloat16)
    assert finite and torch.equal(result, expected(tensors))
    assert sum(elements for elements, _ in calls) == 700 * 300
    if threads.threads_are_set_per_thread():  # one thread for the slices, which are as large as asked
        assert len(calls) == 4 and {count for _, count in calls} == {1}
        assert max(elements for elements, _ in calls) == 60_000 // 300 * 300
    else:  # the count untouched, slices within the grain
        assert {count for _, count in calls} == {2}
        assert max(elements for elements, _ in calls) <= threads.GRAIN_SIZE
    assert torch.get_num_threads() == 2


def test_where_the_count_is_process_wide_slices_shrink_to_the_grain_and_nothing_is_set(monkeypatch, two_threads):
    monkeypatch.setattr(threads, "threads_are_set_per_thread", lambda: False)
    monkeypatch.setattr(stream, "COMPUTE_SLICE", 10**6)
    before = torch.get_num_threads()
    calls: list[tuple[int, int]] = []
    tensors = inputs()
    result, finite = stream._computed_in_slices(observing_kernel(calls), "w", tensors, torch.bfloat16)
    assert finite and torch.equal(result, expected(tensors))
    assert max(elements for elements, _ in calls) <= threads.GRAIN_SIZE
    assert sum(elements for elements, _ in calls) == 700 * 300
    assert {count for _, count in calls} == {before} == {2}


def test_a_slice_whose_entries_overflow_only_in_their_sum_is_still_finite():
    """Each slice's sum stands for its entries; a sum that overflows though every entry is finite is looked at."""
    big = torch.full((400, 400), 3.0e38)
    result, finite = stream._computed_in_slices(
        Kernel(lambda name, t: t[0], elementwise=True), "big", [big], torch.float32
    )
    assert finite and torch.equal(result, big)
    big[123, 7] = float("inf")
    _, finite = stream._computed_in_slices(Kernel(lambda name, t: t[0], elementwise=True), "big", [big], torch.float32)
    assert not finite
