"""The spine's units: reading checkpoints (safetensors, sharded or not, and pickles), storage order,
the shard planner and writer, `--shard-size` outputs that transformers reloads, parse_size, `splice inspect`.
"""

from __future__ import annotations

import itertools
import json
import re
import struct
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import splice
from splice.errors import CheckpointError, SpliceError
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.writer import OutputTensor, parse_size, plan_shards, write_state_dict

from conftest import model_class, perturbed, save, tiny_model
from helpers import run_cli

# -- helpers -------------------------------------------------------------------------------------


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (exact comparison for every dtype, float8 and 0-dim included)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bit_equal(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    assert actual.dtype == expected.dtype, name
    assert tuple(actual.shape) == tuple(expected.shape), name
    assert torch.equal(bits(actual), bits(expected)), name


def load_dir(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory, through safetensors' own loader."""
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        loaded = load_file(shard)
        assert not set(loaded) & set(state), f"{shard.name} repeats tensors"
        state.update(loaded)
    return state


def header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return length, json.loads(raw[8 : 8 + length])


def storage_order(directory: Path) -> list[str]:
    """Tensor names shard by shard (sorted file names), by data offset within a shard."""
    names = []
    for shard in sorted(directory.glob("*.safetensors")):
        _, entries = header(shard)
        names += sorted((k for k in entries if k != "__metadata__"), key=lambda k: entries[k]["data_offsets"])
    return names


# -- models --------------------------------------------------------------------------------------

LAYOUTS = {
    "bert": ("bert", False),
    "bert-sharded": ("bert", True),
    "gpt2": ("gpt2", False),
    "llama-sharded": ("llama", True),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("spine-models")
    built = {}
    for layout, (arch, sharded) in LAYOUTS.items():
        built[layout] = save(tiny_model(arch, 0), root / layout, sharded)
        assert (built[layout] / "model.safetensors.index.json").exists() == sharded
    return built


# -- Checkpoint.open on safetensors --------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_checkpoint_reads_what_safetensors_reads(layout, saved):
    directory = saved[layout]
    expected = load_dir(directory)
    with Checkpoint.open(directory) as checkpoint:
        assert set(checkpoint.tensors) == set(expected)
        assert checkpoint.shards == sorted(p.name for p in directory.glob("*.safetensors"))
        for name, tensor in expected.items():
            info = checkpoint.tensors[name]
            assert info.dtype == tensor.dtype, name
            assert info.shape == tuple(tensor.shape), name
            assert info.nbytes == info.end - info.start == tensor.numel() * tensor.element_size(), name
            assert_bit_equal(checkpoint.read(name), tensor, name)
        state = checkpoint.state_dict()
        assert list(state) == list(checkpoint.tensors)
        assert checkpoint.num_parameters == sum(t.numel() for t in expected.values())
        assert checkpoint.total_bytes == sum(t.numel() * t.element_size() for t in expected.values())
        assert json.loads(checkpoint.read_file("config.json")) == checkpoint.config()
        assert "config.json" in checkpoint.files()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_checkpoint_lists_tensors_in_storage_order(layout, saved):
    with Checkpoint.open(saved[layout]) as checkpoint:
        assert list(checkpoint.tensors) == storage_order(saved[layout])
        positions = [(checkpoint.shards.index(i.shard), i.start) for i in checkpoint.tensors.values()]
        assert positions == sorted(positions)


def write_scrambled(path: Path, tensors: dict[str, torch.Tensor], storage: list[str]) -> None:
    """A safetensors file whose JSON key order (the dict's) differs from its data order (`storage`)."""
    offsets, data, position = {}, b"", 0
    for name in storage:
        raw = bytes(bits(tensors[name]).numpy())
        offsets[name] = [position, position + len(raw)]
        data += raw
        position += len(raw)
    entries = {"__metadata__": {"format": "pt"}}
    for name, tensor in tensors.items():
        entries[name] = {
            "dtype": {torch.float32: "F32", torch.int64: "I64"}[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": offsets[name],
        }
    raw_header = json.dumps(entries).encode()
    raw_header += b" " * (-len(raw_header) % 8)
    path.write_bytes(struct.pack("<Q", len(raw_header)) + raw_header + data)


def test_storage_order_is_data_order_not_header_or_name_order(tmp_path):
    """Tensors come in the order their bytes lie in the file; a soup writes them in that order too."""
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "b": torch.randn(3, 2, generator=generator),
        "a": torch.randn(5, generator=generator),
        "c": torch.arange(4),
        "d": torch.randn(1, generator=generator),
    }
    storage = ["c", "a", "d", "b"]
    models = []
    for i in range(2):
        directory = tmp_path / f"m{i}"
        directory.mkdir()
        scaled = {k: (v * (i + 1) if v.is_floating_point() else v) for k, v in tensors.items()}
        write_scrambled(directory / "model.safetensors", scaled, storage)
        models.append(directory)
    with Checkpoint.open(models[0]) as checkpoint:
        assert list(checkpoint.tensors) == storage
        for name, tensor in tensors.items():
            assert_bit_equal(checkpoint.read(name), tensor, name)
    splice.soup(models, tmp_path / "out", device="cpu")
    assert storage_order(tmp_path / "out") == storage
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(merged["c"], tensors["c"])
    assert torch.allclose(merged["b"], tensors["b"] * 1.5)


def test_sharded_storage_order_follows_shard_files(tmp_path):
    """Tensors listed out of order in the index still come shard by shard, by offset."""
    generator = torch.Generator().manual_seed(1)
    first = {"z.weight": torch.randn(4, generator=generator), "y.weight": torch.randn(2, generator=generator)}
    second = {"a.weight": torch.randn(3, generator=generator), "b.weight": torch.randn(6, generator=generator)}
    write_scrambled(tmp_path / "model-00001-of-00002.safetensors", first, ["z.weight", "y.weight"])
    write_scrambled(tmp_path / "model-00002-of-00002.safetensors", second, ["b.weight", "a.weight"])
    one, two = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    weight_map = {"a.weight": two, "y.weight": one, "b.weight": two, "z.weight": one}
    index = {"metadata": {}, "weight_map": weight_map}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with Checkpoint.open(tmp_path) as checkpoint:
        assert list(checkpoint.tensors) == ["z.weight", "y.weight", "b.weight", "a.weight"]
        for name, tensor in {**first, **second}.items():
            assert_bit_equal(checkpoint.read(name), tensor, name)


def test_index_disagreeing_with_shard_is_an_error(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "model-00001-of-00001.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00001.safetensors", "b": "model-00001-of-00001.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="in no shard"):
        Checkpoint.open(tmp_path)
    index = {"weight_map": {"a": "../elsewhere.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the model directory"):
        Checkpoint.open(tmp_path)


# -- pytorch_model.bin checkpoints ---------------------------------------------------------------


def save_pickled(model: torch.nn.Module, directory: Path, shards: int = 1) -> Path:
    """A model as transformers 4 wrote it with safe_serialization=False (transformers 5 only writes
    safetensors): config.json plus pytorch_model.bin, or numbered .bin shards and their index."""
    directory.mkdir(parents=True)
    model.config.save_pretrained(directory)
    state = model.state_dict()
    if shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
        return directory
    names = list(state)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[i::shards]}
        torch.save(part, directory / file)
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return directory


@pytest.mark.parametrize("shards", [1, 3])
def test_pickled_checkpoint_reads_like_the_model(shards, tmp_path):
    model = tiny_model("bert", 0)
    directory = save_pickled(model, tmp_path / "bin", shards)
    expected = model.state_dict()
    with Checkpoint.open(directory) as checkpoint:
        assert set(checkpoint.tensors) == set(expected)
        assert len(checkpoint.shards) == shards
        for name, tensor in expected.items():
            assert checkpoint.tensors[name].dtype == tensor.dtype
            assert checkpoint.tensors[name].shape == tuple(tensor.shape)
            assert_bit_equal(checkpoint.read(name), tensor, name)
        assert checkpoint.config()["model_type"] == "bert"


def test_soup_of_pickles_equals_soup_of_safetensors(tmp_path):
    base = tiny_model("bert", 0)
    tuned = perturbed(base, 1)
    pickled = [save_pickled(base, tmp_path / "bin-0"), save_pickled(tuned, tmp_path / "bin-1", shards=2)]
    safe = [save(base, tmp_path / "st-0", False), save(tuned, tmp_path / "st-1", True)]
    splice.soup(pickled, tmp_path / "from-bin", device="cpu")
    splice.soup(safe, tmp_path / "from-st", device="cpu")
    from_bin, from_st = load_dir(tmp_path / "from-bin"), load_dir(tmp_path / "from-st")
    assert set(from_bin) == set(from_st)
    for name, tensor in from_st.items():
        assert_bit_equal(from_bin[name], tensor, name)
    assert (tmp_path / "from-bin" / "config.json").exists()


def test_pickle_that_is_not_a_state_dict_is_refused(tmp_path):
    torch.save({"step": 3, "weights": [1, 2]}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        Checkpoint.open(tmp_path)


def test_pickle_with_code_is_refused(tmp_path):
    """weights_only loading: a pickle that would run code on load is an error, not an execution."""

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": torch.zeros(2), "x": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="cannot load"):
        Checkpoint.open(tmp_path)


# -- the shard planner ---------------------------------------------------------------------------

DTYPES = [torch.uint8, torch.float16, torch.float32, torch.int64]


@st.composite
def outputs_and_bound(draw):
    count = draw(st.integers(0, 40))
    outputs = []
    for i in range(count):
        dtype = draw(st.sampled_from(DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 12), min_size=0, max_size=3)))
        outputs.append(OutputTensor(f"t{i}", dtype, shape))
    bound = draw(st.integers(1, 3000))
    return outputs, bound


@settings(max_examples=300, deadline=None)
@given(outputs_and_bound())
def test_plan_shards_respects_the_bound(case):
    outputs, bound = case
    shards = plan_shards(outputs, bound)
    assert [out for shard in shards for out in shard] == outputs  # order kept, nothing lost or repeated
    if outputs:
        assert all(shards), "an empty shard"
    for shard in shards:
        size = sum(out.nbytes for out in shard)
        assert size <= bound or len(shard) == 1, (bound, [o.nbytes for o in shard])
    for current, following in itertools.pairwise(shards):  # greedy: no shard could have taken the next tensor
        assert sum(out.nbytes for out in current) + following[0].nbytes > bound


# -- the writer ----------------------------------------------------------------------------------


def assorted_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    floats = torch.randn(6, 5, generator=generator)
    return {
        "bf16": floats.to(torch.bfloat16),
        "fp16": floats.to(torch.float16),
        "fp32": floats,
        "fp64": floats.double(),
        "int64": torch.randint(-(2**40), 2**40, (7,), generator=generator),
        "int32": torch.randint(-(2**30), 2**30, (2, 3), generator=generator, dtype=torch.int32),
        "int8": torch.randint(-128, 128, (9,), generator=generator, dtype=torch.int8),
        "uint8": torch.randint(0, 256, (3, 3), generator=generator, dtype=torch.uint8),
        "bool": torch.rand(11, generator=generator) > 0.5,
        "scalar": torch.tensor(3.25),
        "int_scalar": torch.tensor(-5, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
        "fp8_e4m3": floats.to(torch.float8_e4m3fn),
        "fp8_e5m2": floats.to(torch.float8_e5m2),
        "transposed": floats.t(),  # not contiguous: written as its logical values
        "special": torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45]),
    }


@pytest.mark.parametrize("shard_size", [10**9, 200, 1], ids=["one-file", "several", "one-per-tensor"])
def test_write_state_dict_round_trips_exactly(shard_size, tmp_path):
    state = assorted_tensors()
    write_state_dict(tmp_path, state, shard_size, metadata={"note": "hello"})
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    loaded = load_dir(tmp_path)
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert_bit_equal(loaded[name], tensor, name)
    assert storage_order(tmp_path) == list(state)  # written in the order given
    for file in files:
        length, entries = header(tmp_path / file)
        assert (8 + length) % 8 == 0, "data section not 8-byte aligned"
        assert entries["__metadata__"] == {"format": "pt", "note": "hello"}
        with safe_open(tmp_path / file, "pt") as opened:
            assert opened.metadata() == {"format": "pt", "note": "hello"}
    if shard_size == 10**9:
        assert files == ["model.safetensors"]
        assert not (tmp_path / "model.safetensors.index.json").exists()
    else:
        assert len(files) > 1
        assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(state)
        for name, file in index["weight_map"].items():
            assert name in load_file(tmp_path / file), f"index says {name} is in {file}"
        total = sum(t.numel() * t.element_size() for t in state.values())
        assert index["metadata"]["total_size"] == total
        for file in files:
            _, entries = header(tmp_path / file)
            spans = [e["data_offsets"] for k, e in entries.items() if k != "__metadata__"]
            assert sum(end - start for start, end in spans) <= shard_size or len(spans) == 1
    # ... and splice reads its own output back identically
    with Checkpoint.open(tmp_path) as checkpoint:
        for name, tensor in state.items():
            assert_bit_equal(checkpoint.read(name), tensor, name)


def test_unsigned_wide_integers_round_trip(tmp_path):
    state = {
        "u16": torch.tensor([0, 1, 65535], dtype=torch.uint16),
        "u32": torch.tensor([0, 2**32 - 1], dtype=torch.uint32),
        "u64": torch.tensor([0, 2**63], dtype=torch.uint64),
    }
    write_state_dict(tmp_path, state)
    loaded = load_file(tmp_path / "model.safetensors")
    for name, tensor in state.items():
        assert_bit_equal(loaded[name], tensor, name)


def test_writer_refuses_a_tensor_other_than_planned(tmp_path):
    from splice.tensors.writer import ShardedWriter

    planned = [OutputTensor("a", torch.float32, (2,)), OutputTensor("b", torch.float32, (2,))]
    writer = ShardedWriter(tmp_path, planned)
    with pytest.raises(SpliceError, match="expected tensor a"):
        writer.write("b", torch.zeros(2))
    with pytest.raises(SpliceError, match="planned"):
        writer.write("a", torch.zeros(3))
    writer.write("a", torch.zeros(2))
    with pytest.raises(SpliceError, match="incomplete"):
        writer.close()


# -- --shard-size outputs reload in transformers -------------------------------------------------


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_shard_size_output_reloads_in_transformers(arch, tmp_path, monkeypatch, capsys):
    base = tiny_model(arch, 0)
    tuned = perturbed(base, 1)
    models = [save(base, tmp_path / "a", False), save(tuned, tmp_path / "b", False)]
    out = tmp_path / "soup"
    code, _, err = run_cli(
        ["soup", *models, "--out", out, "--shard-size", "4KB", "--device", "cpu", "--quiet"], monkeypatch, capsys
    )
    assert code == 0, err

    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2
    for file in files:
        _, entries = header(out / file)
        spans = [e["data_offsets"] for k, e in entries.items() if k != "__metadata__"]
        assert sum(end - start for start, end in spans) <= 4000 or len(spans) == 1
    loaded, info = model_class(arch).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert not info.get("error_msgs"), info
    expected_state = base.state_dict()
    tuned_state = tuned.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.allclose(tensor, (expected_state[name] + tuned_state[name]) / 2, atol=1e-7), name


# -- parse_size ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, size",
    [
        ("2GB", 2 * 1000**3),
        ("500MB", 500 * 1000**2),
        ("1GiB", 1024**3),
        ("1234", 1234),
        ("1.5GiB", 3 * 1024**3 // 2),
        ("4kb", 4000),
        (" 10 MiB ", 10 * 1024**2),
        (4096, 4096),
    ],
)
def test_parse_size_accepts(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["abc", "-1", "0", "", "2XB", "GB", "0.0001B", -5, 0])
def test_parse_size_rejects(text):
    with pytest.raises(SpliceError) as caught:
        parse_size(text)
    assert "\n" not in str(caught.value)


# -- splice inspect ------------------------------------------------------------------------------


EXPECTED_NORMS = {
    "bert": [
        "bert.embeddings.LayerNorm",
        "bert.encoder.layer.0.attention.output.LayerNorm",
        "bert.encoder.layer.0.output.LayerNorm",
        "bert.encoder.layer.1.attention.output.LayerNorm",
        "bert.encoder.layer.1.output.LayerNorm",
    ],
    "gpt2": [
        "transformer.h.0.ln_1",
        "transformer.h.0.ln_2",
        "transformer.h.1.ln_1",
        "transformer.h.1.ln_2",
        "transformer.ln_f",
    ],
    "llama": [
        "model.layers.0.input_layernorm",
        "model.layers.0.post_attention_layernorm",
        "model.layers.1.input_layernorm",
        "model.layers.1.post_attention_layernorm",
        "model.norm",
    ],
}


@pytest.mark.parametrize("layout, arch", [("bert", "bert"), ("gpt2", "gpt2"), ("llama-sharded", "llama")])
def test_inspect(layout, arch, saved, monkeypatch, capsys):
    from splice.cli import render
    from splice.workflows.inspect import summarize

    monkeypatch.setattr(render.console, "width", 240)  # no folding of long module names in the table
    code, out, err = run_cli(["inspect", saved[layout]], monkeypatch, capsys)
    assert code == 0, err
    state = load_dir(saved[layout])
    parameters = sum(t.numel() for t in state.values())
    assert re.search(rf"\b{len(state)}\b", out), f"tensor count {len(state)} missing"
    assert f"{parameters:,}" in out
    assert f"LayerNorm modules ({len(EXPECTED_NORMS[arch])})" in out
    for module in EXPECTED_NORMS[arch]:
        assert re.search(rf"(^|\s){re.escape(module)}\s", out, re.MULTILINE), f"{module} not listed"
    listed = [m.name for m in summarize(saved[layout]).norm_modules]
    assert listed == EXPECTED_NORMS[arch]
    architecture = transformers.AutoConfig.from_pretrained(saved[layout]).architectures[0]
    assert architecture in out
    if layout.endswith("sharded"):
        for shard in sorted(p.name for p in saved[layout].glob("*.safetensors")):
            assert shard in out


def test_inspect_missing_model_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(["inspect", tmp_path / "nothing"], monkeypatch, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(tmp_path / "nothing") in lines[0]
