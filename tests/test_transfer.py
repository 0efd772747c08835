"""Host <-> device transfers of the stream (splice/tensors/transfer.py): the plan of batches, the bounded staging,
and the whole overlapped path against the plain CPU path, driven on the CPU by copies that run as late as CUDA
would let them; on a machine with a GPU, the real CUDA path against the CPU, bit for bit, and its overlap."""

from __future__ import annotations

import json
import threading
from collections import deque
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import splice
import splice.tensors.stream as stream
from splice.errors import NonFiniteOutputError, SpliceError
from splice.merge.kernels import method_kernel, weighted_average
from splice.options import RunOptions
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.stream import Kernel, computed, computed_with_copies, plan_same_name, work_units
from splice.tensors.transfer import ALIGN, Batch, StagingLimits, Uploads, plan_batches
from splice.tensors.views import DerivedCheckpoint

from helpers import load_dir

NO_GPU = "needs a CUDA GPU: this machine has no CUDA GPU"
CPU = torch.device("cpu")

# Small enough that the tiny tensors below take every path: packed, split in row blocks, one row over a slab.
LIMITS = StagingLimits(slab_bytes=1024, upload_slabs=2, download_slabs=2, small_unit_bytes=256)


class _Ticket:
    def __init__(self, queue: str):
        self.queue = queue
        self.done = False


class DeferredCopies:
    """`Copies` on the CPU, as asynchronous as CUDA allows: a copy waits in its stream's queue and runs only when the
    host waits for it or the compute stream is made to (or for a later copy of the same stream). A device buffer
    read before its upload was waited for holds the 0xFF it was made with (NaN in any float dtype); a staging slab
    written again before its copy ran hands the copy the new bytes."""

    device = torch.device("cpu")

    def __init__(self, waits: bool = True):
        self.waits = waits  # False: `wait` returns at once (the mistake a caller must not make)
        self.queues: dict[str, deque] = {"up": deque(), "down": deque()}
        self.lock = threading.Lock()
        self.staging: list[int] = []  # the size of every staging buffer made
        self.device_buffers: list[torch.Tensor] = []
        self.used: list[torch.Tensor] = []
        self.copied = {"up": 0, "down": 0}

    def staging_buffer(self, nbytes: int) -> torch.Tensor:
        self.staging.append(nbytes)
        return torch.full((nbytes,), 0xAB, dtype=torch.uint8)

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        buffer = torch.full((nbytes,), 0xFF, dtype=torch.uint8)
        self.device_buffers.append(buffer)
        return buffer

    def _queued(self, queue: str, source: torch.Tensor, target: torch.Tensor) -> _Ticket:
        assert source.shape == target.shape and source.dtype == target.dtype == torch.uint8
        with self.lock:
            ticket = _Ticket(queue)
            self.queues[queue].append((ticket, source, target))
            self.copied[queue] += 1
        return ticket

    def upload(self, host: torch.Tensor, target: torch.Tensor) -> _Ticket:
        return self._queued("up", host, target)

    def download(self, source: torch.Tensor, target: torch.Tensor) -> _Ticket:
        return self._queued("down", source, target)

    def use(self, ticket: _Ticket | None, buffers) -> None:
        if ticket is not None:
            self._run_through(ticket)
        self.used += buffers

    def wait(self, ticket: _Ticket) -> None:
        if self.waits:
            self._run_through(ticket)

    def _run_through(self, ticket: _Ticket) -> None:
        with self.lock:
            while not ticket.done:
                queued, source, target = self.queues[ticket.queue].popleft()
                target.copy_(source)
                queued.done = True


def synthetic_models(root: Path, dtype: torch.dtype, count: int = 3) -> list[Path]:
    """`count` models of tensors sized for LIMITS (sizes for fp32; safetensors stores int64 first, then by name):
    an integer buffer; a 2560-byte matrix (row blocks); four small units that pack into one slab (one of them a
    scalar, one empty); a matrix exactly a slab per input; six norms that fill a slab and spill into a second;
    a matrix whose every row is larger than a slab."""
    generator = torch.Generator().manual_seed(7)
    dirs = []
    for index in range(count):
        floats = {
            "a.embed": (40, 16),
            "b.norm": (16,),
            "c.bias": (16,),
            "d.scale": (),
            "e.empty": (0, 16),
            "f.proj": (16, 16),
            **{f"g.norm{i}": (16,) for i in range(6)},
            "h.wide": (2, 600),
        }
        tensors = {name: torch.randn(shape, generator=generator).to(dtype) for name, shape in floats.items()}
        tensors["ids"] = torch.arange(10)
        directory = root / f"{str(dtype).removeprefix('torch.')}-{index}"
        directory.mkdir()
        save_file(tensors, directory / "model.safetensors")
        (directory / "config.json").write_text(json.dumps({"architectures": ["Synthetic"]}))
        dirs.append(directory)
    return dirs


def plan_of(dirs: list[Path], kernel: Kernel, chunk_bytes: int = 1 << 30):
    checkpoints = [Checkpoint.open(d) for d in dirs]
    return work_units(plan_same_name(checkpoints, None), kernel.elementwise, chunk_bytes, kernel.passes_through)


def results(pairs) -> list[tuple[str, object, torch.Tensor | None]]:
    return [(unit.item.output.name, unit.rows, result) for unit, result in pairs]


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


def assert_same_results(got, expected) -> None:
    """The same units in the same order, each result of the same dtype and shape and bit for bit the same."""
    assert [(name, rows) for name, rows, _ in got] == [(name, rows) for name, rows, _ in expected]
    for (name, rows, ours), (_, _, theirs) in zip(got, expected):
        if theirs is None:
            assert ours is None, name
            continue
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, (name, rows)
        assert torch.equal(bits(ours), bits(theirs)), (name, rows)


class Told:
    """A progress reporter that keeps what it was told."""

    def __init__(self):
        self.advances: list[tuple[int, int]] = []

    def start(self, description, total_items, total_bytes, unit="tensors") -> None:
        pass

    def advance(self, items: int, nbytes: int) -> None:
        self.advances.append((items, nbytes))

    def finish(self) -> None:
        pass


def cpu_results(units, kernel: Kernel, progress: Told | None = None) -> list:
    pairs = computed(units, kernel, CPU, RunOptions(device="cpu", progress=progress))
    return results((unit, None if result is None else result.clone()) for unit, result in pairs)


TIES = method_kernel(
    "ties",
    lambda name: {
        "weight": [1.0, 0.6, 0.3],
        "density": [1.0, 0.5, 0.7],
        "rescale": False,
        "normalize": True,
        "lambda": 0.9,
    },
    base_index=0,
)


# -- the plan -----------------------------------------------------------------------------------------------------


def test_small_units_are_packed_into_one_slab_and_large_reads_split_in_row_blocks(tmp_path):
    units = plan_of(synthetic_models(tmp_path, torch.float32), weighted_average([1, 1, 1]))
    names = [unit.item.output.name for unit in units]
    batches = plan_batches([unit.reads for unit in units], LIMITS)
    assert [[names[p] for p in batch.positions] for batch in batches] == [
        ["ids"],
        ["a.embed"],
        ["b.norm", "c.bias", "d.scale", "e.empty"],  # 3 x 64, 3 x 64, 3 x 4 and nothing: one slab
        ["f.proj"],
        [f"g.norm{i}" for i in range(5)],  # 5 x 192 bytes (aligned): 960 <= 1024; a sixth would end at 1152
        ["g.norm5"],
        ["h.wide"],
    ]
    by_name = {names[batch.positions[0]]: batch for batch in batches}
    assert by_name["ids"].on_host and not any(b.on_host for n, b in by_name.items() if n != "ids")
    assert len(by_name["b.norm"].segments) == 1 and len(by_name["g.norm0"].segments) == 1
    # 2560 bytes per input in blocks of 16 rows of 64 bytes: 1024, 1024, 512, laid end to end
    embed = by_name["a.embed"]
    assert [[(p.rows, p.offset, p.nbytes) for p in s.placements] for s in embed.segments[:3]] == [
        [((0, 16), 0, 1024)],
        [((16, 32), 1024, 1024)],
        [((32, 40), 2048, 512)],
    ]
    assert [v.offset for v in embed.views[0]] == [0, 2560, 5120] and len(embed.segments) == 9
    assert [len(s.placements) for s in by_name["f.proj"].segments] == [1, 1, 1]  # a slab each
    assert [s.stop - s.start for s in by_name["h.wide"].segments] == [2400] * 6  # one row each, over a slab
    for batch in batches:
        for unit_views in batch.views:
            assert all(view.offset % ALIGN == 0 for view in unit_views)
        for segment in batch.segments:
            assert segment.stop - segment.start <= LIMITS.slab_bytes or len(segment.placements) == 1
            assert all(segment.start <= p.offset and p.offset + p.nbytes <= segment.stop for p in segment.placements)


def uploaded(batches: list[Batch], copies: DeferredCopies) -> list:
    uploads = Uploads(copies, LIMITS)
    arrived = [uploads.load(batch) for batch in batches]
    for each in arrived:
        copies.use(each.ticket, each.buffers)
    return arrived


@pytest.mark.parametrize("chunk_bytes", [1 << 30, 700], ids=["whole", "row-blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_input_arrives_on_the_device_byte_for_byte(dtype, chunk_bytes, tmp_path):
    units = plan_of(synthetic_models(tmp_path, dtype), weighted_average([1, 1, 1]), chunk_bytes)
    batches = plan_batches([unit.reads for unit in units], LIMITS)
    copies = DeferredCopies()
    for each in uploaded(batches, copies):
        for position, tensors in zip(each.batch.positions, each.inputs):
            expected = [ckpt.read(name, rows) for ckpt, name, rows in units[position].reads]
            assert len(tensors) == len(expected)
            for got, want in zip(tensors, expected):
                assert got.dtype == want.dtype and got.shape == want.shape
                assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))
    # one copy per segment: the four small units in one, the six norms in two
    assert copies.copied["up"] == sum(1 for b in batches for s in b.segments if s.stop > s.start)
    assert len(copies.staging) == LIMITS.upload_slabs and set(copies.staging) == {LIMITS.slab_bytes}


def test_without_waiting_for_its_copy_a_reused_slab_corrupts_the_upload(tmp_path):
    """The test double is strict: the ring reuses a slab only after waiting for the copy lent it."""
    units = plan_of(synthetic_models(tmp_path, torch.float32), weighted_average([1, 1, 1]))
    batches = plan_batches([unit.reads for unit in units], LIMITS)
    arrived = uploaded(batches, DeferredCopies(waits=False))
    embed = arrived[1]  # 9 segments through 2 slabs
    expected = [ckpt.read(name, rows) for ckpt, name, rows in units[embed.batch.positions[0]].reads]
    assert not all(torch.equal(got, want) for got, want in zip(embed.inputs[0], expected))


# -- the whole path, against the CPU's --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kernel, chunk_bytes, dtype",
    [
        (weighted_average([0.5, 0.3, 0.2]), 1 << 30, torch.float32),
        (weighted_average([0.5, 0.3, 0.2]), 700, torch.bfloat16),
        (TIES, 1 << 30, torch.bfloat16),
    ],
    ids=["soup-fp32", "soup-bf16-row-blocks", "ties-bf16"],
)
def test_the_overlapped_path_gives_the_cpu_path_results_bit_for_bit(kernel, chunk_bytes, dtype, tmp_path):
    units = plan_of(synthetic_models(tmp_path, dtype), kernel, chunk_bytes)
    told_cpu, told = Told(), Told()
    expected = cpu_results(units, kernel, told_cpu)
    copies = DeferredCopies()
    got = results(computed_with_copies(units, kernel, copies, RunOptions(device="cpu", progress=told), LIMITS))
    assert_same_results(got, expected)
    assert told.advances == told_cpu.advances and sum(n for _, n in told.advances) == sum(u.input_bytes for u in units)
    assert copies.copied["down"] > len([u for u in units if u.item.output.name != "ids"])  # pieces + flags
    # every device buffer was handed to the compute stream (on CUDA: record_stream, so it is not reused early)
    assert {b.data_ptr() for b in copies.device_buffers} == {b.data_ptr() for b in copies.used}
    assert len(copies.staging) <= LIMITS.upload_slabs + LIMITS.download_slabs
    assert sum(copies.staging) <= LIMITS.pinned_bytes < sum(u.input_bytes for u in units) / 3


def test_without_waiting_for_the_downloads_the_results_would_be_wrong(tmp_path):
    kernel = weighted_average([1, 1, 1])
    units = plan_of(synthetic_models(tmp_path, torch.float32), kernel)
    expected = cpu_results(units, kernel)
    got = results(computed_with_copies(units, kernel, DeferredCopies(waits=False), RunOptions(device="cpu"), LIMITS))
    with pytest.raises(AssertionError):
        assert_same_results(got, expected)


def test_a_cuda_device_streams_through_the_copies_and_writes_what_the_cpu_writes(tmp_path, monkeypatch):
    """`run_stream` with a cuda device takes the overlapped path (here with the CPU double in CudaCopies' place):
    the published model is the CPU's, tensor for tensor and byte for byte."""
    dirs = synthetic_models(tmp_path, torch.bfloat16)
    splice.soup(dirs, tmp_path / "cpu", device="cpu", chunk_bytes=700)
    made = []
    monkeypatch.setattr(stream, "CudaCopies", lambda device: made.append(DeferredCopies()) or made[-1])
    monkeypatch.setattr(computed_with_copies, "__defaults__", (LIMITS,))
    report = splice.soup(dirs, tmp_path / "gpu", run=RunOptions(device=torch.device("cuda"), chunk_bytes=700))
    assert report.device == "cuda" and len(made) == 1 and made[0].copied["up"] > 0
    cpu, gpu = load_dir(tmp_path / "cpu"), load_dir(tmp_path / "gpu")
    assert list(cpu) == list(gpu)
    assert all(torch.equal(bits(cpu[n]), bits(gpu[n])) for n in cpu)
    assert (tmp_path / "cpu" / "model.safetensors").read_bytes() == (
        tmp_path / "gpu" / "model.safetensors"
    ).read_bytes()


def test_a_new_non_finite_result_is_refused_as_on_the_cpu(tmp_path):
    units = plan_of(synthetic_models(tmp_path, torch.float32), weighted_average([1, 1, 1]))

    def overflowing(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        return tensors[0] * (1e39 if name == "f.proj" else 1.0)

    kernel = Kernel(overflowing)
    run = RunOptions(device="cpu")
    messages = []
    for pairs in (
        computed(units, kernel, CPU, run),
        computed_with_copies(units, kernel, DeferredCopies(), run, LIMITS),
    ):
        with pytest.raises(NonFiniteOutputError) as caught:
            list(pairs)
        messages.append(str(caught.value))
    assert messages[0] == messages[1] and "output tensor f.proj would hold NaN/Inf" in messages[0]


# -- reading into a staging buffer ---------------------------------------------------------------------------------


def test_read_into_puts_the_stored_bytes_in_the_buffer_given(tmp_path):
    directory = synthetic_models(tmp_path, torch.float32, count=1)[0]
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(load_dir(directory), pickled / "pytorch_model.bin")
    stored = Checkpoint.open(directory)
    scaled = {name: stored.tensors[name] for name in ("a.embed", "d.scale")}  # computed on read, as a LoRA is

    def derive(name: str, rows):
        return stored.read(name, rows) * 3

    derived = DerivedCheckpoint(stored, scaled, derive)
    for checkpoint in (stored, Checkpoint.open(pickled), derived):
        for name, rows in [
            ("a.embed", None),
            ("a.embed", (3, 17)),
            ("d.scale", None),
            ("e.empty", None),
            ("ids", (2, 5)),
        ]:
            expected = checkpoint.read(name, rows)
            buffer = torch.full((expected.numel() * expected.element_size(),), 0xEE, dtype=torch.uint8)
            got = checkpoint.read_into(name, rows, buffer)
            assert got.data_ptr() == buffer.data_ptr() or buffer.numel() == 0
            assert got.dtype == expected.dtype and got.shape == expected.shape and torch.equal(got, expected)
            if checkpoint is derived and name in scaled:
                assert torch.equal(got, stored.read(name, rows) * 3)
        with pytest.raises(SpliceError, match="needs a contiguous uint8 buffer of 2560 bytes"):
            checkpoint.read_into("a.embed", None, torch.empty(2559, dtype=torch.uint8))


# -- on a GPU ----------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_soup_and_ties_equal_the_cpu_bit_for_bit(dtype, make_models, tmp_path):
    import yaml

    dirs = []
    for i, source in enumerate(make_models("llama", 3, sharded=True)):
        dirs.append(tmp_path / f"in-{i}")
        dirs[-1].mkdir()
        (dirs[-1] / "config.json").write_text((source / "config.json").read_text())
        save_file({n: t.to(dtype) for n, t in load_dir(source).items()}, dirs[-1] / "model.safetensors")
    for device in ("cpu", "cuda"):
        splice.soup(dirs, tmp_path / f"soup-{device}", device=device, weights=[0.5, 0.3, 0.2], chunk_bytes=4096)
    recipe = tmp_path / "ties.yml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "base_model": str(dirs[0]),
                "dtype": str(dtype).removeprefix("torch."),
                "models": [
                    {"model": str(dirs[1]), "parameters": {"weight": 0.6, "density": 0.5}},
                    {"model": str(dirs[2]), "parameters": {"weight": 0.3, "density": 0.7}},
                ],
            }
        )
    )
    for device in ("cpu", "cuda"):
        splice.merge(recipe, tmp_path / f"ties-{device}", device=device)
    for case in ("soup", "ties"):
        cpu, gpu = load_dir(tmp_path / f"{case}-cpu"), load_dir(tmp_path / f"{case}-cuda")
        assert list(cpu) == list(gpu)
        for name in cpu:
            assert torch.equal(cpu[name], gpu[name]), (case, name)
    # and through every path of the plan: packed, row blocks, rows over a slab
    units = plan_of(synthetic_models(tmp_path, dtype), TIES)
    copies = stream.CudaCopies(torch.device("cuda"))
    got = results(computed_with_copies(units, TIES, copies, RunOptions(device="cuda"), LIMITS))
    assert_same_results(got, cpu_results(units, TIES))


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
def test_cuda_uploads_come_from_pinned_memory_and_overlap_the_kernel(tmp_path):
    from torch.profiler import ProfilerActivity, profile

    models = []
    for index in range(3):
        directory = tmp_path / f"big-{index}"
        directory.mkdir()
        save_file({f"w{i}": torch.randn(1024, 2048) for i in range(8)}, directory / "model.safetensors")  # 8 MB each
        models.append(directory)

    def slow_average(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        torch.cuda._sleep(20_000_000)  # ~10 ms on the compute stream: the next unit's uploads should run meanwhile
        return sum(tensors[1:], tensors[0]) / 3

    kernel = Kernel(slow_average)
    units = plan_of(models, kernel)
    copies = stream.CudaCopies(torch.device("cuda"))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiled:
        got = list(computed_with_copies(units, kernel, copies, RunOptions(device="cuda")))
        torch.cuda.synchronize()
    assert len(got) == 8
    on_device = [e for e in profiled.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    uploads = [e for e in on_device if "HtoD" in e.name]
    downloads = [e for e in on_device if "DtoH" in e.name]
    kernels = [e for e in on_device if "Memcpy" not in e.name and "Memset" not in e.name]
    assert uploads and downloads and kernels, sorted({e.name for e in on_device})
    assert all("Pinned" in e.name for e in uploads + downloads), sorted({e.name for e in uploads + downloads})

    def overlap(a, b) -> bool:
        return a.time_range.start < b.time_range.end and b.time_range.start < a.time_range.end

    assert any(overlap(u, k) for u in uploads for k in kernels), "no upload ran while a kernel did"
