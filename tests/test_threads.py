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


def test_values_past_the_output_range_that_round_to_its_largest_are_finite_and_those_past_that_are_not():
    """Each slice's least and greatest values stand for its entries; values past the output dtype's largest finite
    value are looked at in the output itself, where those that rounded down to it are finite."""
    largest = torch.finfo(torch.bfloat16).max
    just_past = torch.nextafter(torch.tensor(largest), torch.tensor(float("inf")))  # fp32; rounds down in bf16
    assert torch.isfinite(just_past.to(torch.bfloat16))
    values = torch.full((400, 400), float(just_past))
    identity = Kernel(lambda name, t: t[0], elementwise=True)
    result, finite = stream._computed_in_slices(identity, "big", [values], torch.bfloat16)
    assert finite and torch.equal(result, values.to(torch.bfloat16))
    assert not stream.fits_in(values, torch.bfloat16)  # the one-pass range check alone would not know
    values[123, 7] = 3.4e38  # past bf16's rounding boundary: inf once cast
    _, finite = stream._computed_in_slices(identity, "big", [values], torch.bfloat16)
    assert not finite
    values[123, 7] = float("nan")
    _, finite = stream._computed_in_slices(identity, "big", [values], torch.bfloat16)
    assert not finite
    assert stream.fits_in(torch.randn(50), torch.float16) and stream.fits_in(torch.empty(0), torch.float16)


def test_a_whole_tensor_kernel_is_checked_on_its_working_values_and_then_on_its_output():
    from splice.errors import NonFiniteOutputError
    from splice.tensors.stream import StreamItem, compute_one
    from splice.tensors.writer import OutputTensor

    largest = torch.finfo(torch.bfloat16).max
    just_past = float(torch.nextafter(torch.tensor(largest), torch.tensor(float("inf"))))
    inputs = [torch.ones(30, 20)]
    item = StreamItem(OutputTensor("w", torch.bfloat16, (30, 20)), ())
    scaled = Kernel(lambda name, t: t[0] * just_past)  # not elementwise: computed whole
    result = compute_one(item, inputs, scaled, torch.device("cpu"), lambda: inputs)
    assert torch.equal(result, torch.full((30, 20), just_past).to(torch.bfloat16))
    overflowing = Kernel(lambda name, t: t[0] * 3.4e38)
    with pytest.raises(NonFiniteOutputError, match="output tensor w would hold NaN/Inf"):
        compute_one(item, inputs, overflowing, torch.device("cpu"), lambda: inputs)


def test_every_unit_runs_its_operations_on_its_compute_thread_alone(tmp_path, two_threads):
    """Whole tensors computed one at a time (mergekit's kernels, patches, ports) as well as a sliced kernel's units
    on several compute threads: torch's pool costs more than it gains beside the stream's reader and writer
    (`stream.compute_workers`), and the caller's count comes back."""
    from safetensors.torch import save_file

    from splice.options import RunOptions
    from splice.tensors.checkpoint import Checkpoint
    from splice.tensors.stream import StreamItem, stream_to_memory
    from splice.tensors.writer import OutputTensor

    save_file({f"w{i}": torch.randn(64, 32) for i in range(4)}, str(tmp_path / "model.safetensors"))
    checkpoint = Checkpoint.open(tmp_path)
    items = [StreamItem(OutputTensor(n, torch.float32, (64, 32)), ((checkpoint, n),)) for n in checkpoint.tensors]
    counts: dict[str, list[int]] = {"whole": [], "sliced": []}

    def recorder(kind: str):
        def compute(name, tensors):
            counts[kind].append(torch.get_num_threads())
            return tensors[0] * 2

        return compute

    whole = stream_to_memory(items, Kernel(recorder("whole")), run=RunOptions(compute_threads=2))
    sliced = stream_to_memory(items, Kernel(recorder("sliced"), elementwise=True), run=RunOptions(compute_threads=2))
    assert all(torch.equal(whole[n], checkpoint.read(n) * 2) and torch.equal(sliced[n], whole[n]) for n in whole)
    assert len(counts["whole"]) == 4 and counts["sliced"]
    if threads.threads_are_set_per_thread():
        assert set(counts["whole"]) == set(counts["sliced"]) == {1}
    assert torch.get_num_threads() == 2
