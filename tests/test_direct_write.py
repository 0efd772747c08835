"""Shards written around the page cache (splice.tensors.direct_write): the same bytes as a buffered write, for every
length around the staging buffer's and the alignment's bounds; a file system that refuses O_DIRECT at the open or at
the first write gets the bytes through the page cache; SPLICE_DIRECT_WRITE=0 turns it off."""

from __future__ import annotations

import errno
import fcntl
import os

import pytest
import torch

from splice.tensors import direct_write
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.direct_write import ALIGNMENT, DirectFile, StagingBuffer
from splice.tensors.safetensors import OutputTensor
from splice.tensors.writer import ShardedWriter, write_state_dict

STAGING = 3 * ALIGNMENT  # small, so that short writes cross it many times


@pytest.mark.parametrize("pieces", [[], [1], [ALIGNMENT], [STAGING], [STAGING + 1], [5, 4091, 8193, 30000, 1, 12288]])
def test_a_direct_file_holds_exactly_the_bytes_written(pieces, tmp_path):
    generator = torch.Generator().manual_seed(len(pieces))
    chunks = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=generator).numpy().tobytes() for n in pieces]
    staging = StagingBuffer(STAGING)
    file = DirectFile.create(tmp_path / "out", staging)
    assert file is not None and fcntl.fcntl(file.fd, fcntl.F_GETFL) & os.O_DIRECT
    for chunk in chunks:
        assert file.write(chunk) == len(chunk)
    assert file.tell() == sum(pieces)
    file.close()
    staging.close()
    assert (tmp_path / "out").read_bytes() == b"".join(chunks)


def _saved(tmp_path, name, monkeypatch, direct: str) -> dict[str, bytes]:
    monkeypatch.setenv("SPLICE_DIRECT_WRITE", direct)
    monkeypatch.setattr(direct_write, "STAGING_BYTES", STAGING)
    generator = torch.Generator().manual_seed(0)
    state = {
        "big": torch.randn(1000, 37, generator=generator).to(torch.bfloat16),  # crosses the staging buffer
        "odd": torch.randn(13, generator=generator),  # lengths that are not a multiple of the alignment
        "ints": torch.arange(7, dtype=torch.int64),
        "empty": torch.empty(0, 4),
    }
    out = tmp_path / name
    out.mkdir()
    write_state_dict(out, state, shard_size=50_000)
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_direct_and_buffered_writes_give_the_same_files(tmp_path, monkeypatch):
    opened = []
    real_create = DirectFile.create.__func__

    def counting(cls, path, staging):
        file = real_create(cls, path, staging)
        opened.append(file is not None)
        return file

    monkeypatch.setattr(DirectFile, "create", classmethod(counting))
    direct = _saved(tmp_path, "direct", monkeypatch, "1")
    assert opened and all(opened)  # every shard went through O_DIRECT
    opened.clear()
    buffered = _saved(tmp_path, "buffered", monkeypatch, "0")
    assert not opened
    assert len(direct) > 2 and direct == buffered


def test_a_file_system_that_refuses_direct_opens_gets_buffered_writes(tmp_path, monkeypatch):
    real_open = os.open

    def refusing(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    expected = _saved(tmp_path, "expected", monkeypatch, "0")
    monkeypatch.setattr(os, "open", refusing)
    assert _saved(tmp_path, "refused", monkeypatch, "1") == expected


def test_a_file_system_that_refuses_direct_writes_gets_buffered_writes(tmp_path, monkeypatch):
    expected = _saved(tmp_path, "expected", monkeypatch, "0")
    real_pwrite, refused = os.pwrite, []

    def refusing(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refusing)
    assert _saved(tmp_path, "refused", monkeypatch, "1") == expected
    assert refused  # the direct write was tried, refused, and the bytes written buffered


def test_stored_tensors_copied_into_a_direct_file_keep_their_bytes(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLICE_DIRECT_WRITE", "1")
    monkeypatch.setattr(direct_write, "STAGING_BYTES", STAGING)
    source = tmp_path / "source"
    source.mkdir()
    state = {"a": torch.randn(300, 11), "b": torch.randn(5).to(torch.bfloat16)}
    write_state_dict(source, state)
    out = tmp_path / "out"
    out.mkdir()
    planned = [OutputTensor(name, t.dtype, tuple(t.shape)) for name, t in state.items()]
    writer = ShardedWriter(out, planned)
    with Checkpoint.open(source) as checkpoint:
        for name in state:
            writer.copy_stored(name, checkpoint)
            assert isinstance(writer._file, DirectFile)  # the copy went through the staging buffer
    writer.close()
    with Checkpoint.open(out) as copied:
        for name, tensor in state.items():
            assert torch.equal(copied.read(name).view(torch.uint8), tensor.view(torch.uint8))


def test_an_aborted_writer_leaves_what_it_wrote_and_frees_its_buffer(tmp_path, monkeypatch):
    monkeypatch.setattr(direct_write, "STAGING_BYTES", STAGING)
    writer = ShardedWriter(tmp_path, [OutputTensor("a", torch.float32, (5000,))])
    writer.write("a", torch.ones(5000))
    writer.abort()
    assert writer._staging is None and writer._file is None


def test_a_full_disk_is_its_own_error_and_the_abort_after_it_raises_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLICE_DIRECT_WRITE", "1")
    monkeypatch.setattr(direct_write, "STAGING_BYTES", STAGING)

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    writer = ShardedWriter(tmp_path, [OutputTensor("a", torch.float32, (50000,))])
    with pytest.raises(OSError, match="No space left") as raised:
        writer.write("a", torch.ones(50000))
    assert raised.value.errno == errno.ENOSPC
    writer.abort()  # the failed write's traceback still holds what it had: nothing to raise about
    assert writer._staging is None and writer._file is None
