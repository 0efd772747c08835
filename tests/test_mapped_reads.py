"""Local tensors of MAPPED_READ_BYTES or more are read through a private mapping of their bytes in the shard: the same
values as the file holds, memory that goes back to the system with the tensor, writes that stay the tensor's own;
bytes not aligned to their dtype are read by pread instead."""

from __future__ import annotations

import gc
import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from splice.errors import CheckpointError
from splice.tensors.checkpoint import MAPPED_READ_BYTES, Checkpoint


def mappings_of(path: Path) -> int:
    """How many of this process's memory mappings are of `path`."""
    return sum(line.rstrip().endswith(str(path.resolve())) for line in Path("/proc/self/maps").read_text().splitlines())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def saved(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "small.bias": torch.randn(64, generator=generator),
        "large.weight": torch.randn(1024, 1024, generator=generator),  # 4 MiB of fp32
        "embed.weight": torch.randn(768, 1024, generator=generator).bfloat16(),  # 1.5 MiB of bf16
    }
    assert tensors["embed.weight"].nbytes >= MAPPED_READ_BYTES > tensors["small.bias"].nbytes
    directory = tmp_path / "model"
    directory.mkdir()
    save_file(tensors, directory / "model.safetensors")
    return directory, tensors


def test_a_large_tensor_is_read_through_a_mapping_that_goes_with_it(tmp_path):
    directory, tensors = saved(tmp_path)
    shard = directory / "model.safetensors"
    with Checkpoint.open(directory) as checkpoint:
        before = mappings_of(shard)
        large = checkpoint.read("large.weight")
        rows = checkpoint.read("embed.weight", rows=(100, 700))
        small = checkpoint.read("small.bias")
        assert mappings_of(shard) == before + 2  # the two large reads are mappings; the small one a pread
        assert torch.equal(large, tensors["large.weight"]) and torch.equal(small, tensors["small.bias"])
        assert rows.dtype == torch.bfloat16 and torch.equal(rows, tensors["embed.weight"][100:700])
        view = large[10:20]
        del large, rows
        gc.collect()
        assert mappings_of(shard) == before + 1  # the view keeps its mapping
    assert torch.equal(view, tensors["large.weight"][10:20])  # and it outlives the checkpoint's close
    del view
    gc.collect()
    assert mappings_of(shard) == 0


def test_writing_into_a_mapped_tensor_changes_neither_the_file_nor_the_next_read(tmp_path):
    directory, tensors = saved(tmp_path)
    shard = directory / "model.safetensors"
    digest = sha256(shard)
    with Checkpoint.open(directory) as checkpoint:
        first = checkpoint.read("large.weight")
        first.mul_(-3.0).add_(1.0)  # as a kernel may change its inputs in place
        assert torch.equal(checkpoint.read("large.weight"), tensors["large.weight"])
    assert sha256(shard) == digest


def test_bytes_not_aligned_to_their_dtype_are_read_by_pread(tmp_path):
    """A shard whose bf16 tensor starts at an odd offset (after a 3-byte tensor): read by pread, the same values."""
    values = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(1)).bfloat16()
    head = torch.tensor([1, 2, 3], dtype=torch.uint8)
    header = {
        "head": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "values": {"dtype": "BF16", "shape": [1024, 1024], "data_offsets": [3, 3 + values.nbytes]},
    }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    directory = tmp_path / "odd"
    directory.mkdir()
    shard = directory / "model.safetensors"
    shard.write_bytes(
        struct.pack("<Q", len(text)) + text + head.numpy().tobytes() + values.view(torch.uint8).numpy().tobytes()
    )
    with Checkpoint.open(directory) as checkpoint:
        read = checkpoint.read("values")
        assert mappings_of(shard) == 0
        assert torch.equal(read, values) and torch.equal(checkpoint.read("head"), head)


def test_a_shard_cut_short_after_it_was_opened_is_one_clear_error_not_a_crash(tmp_path):
    directory, _ = saved(tmp_path)
    shard = directory / "model.safetensors"
    with Checkpoint.open(directory) as checkpoint:
        size = shard.stat().st_size
        with open(shard, "r+b") as handle:  # another program truncates the file under the open checkpoint
            handle.truncate(size - 3 * MAPPED_READ_BYTES)
        with pytest.raises(CheckpointError, match="file ends inside tensor"):
            checkpoint.read("large.weight")
