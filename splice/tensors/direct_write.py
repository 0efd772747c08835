"""Output shards written around the page cache (Linux O_DIRECT), through one aligned staging buffer: opt-in,
SPLICE_DIRECT_WRITE=1.

A buffered write copies every output byte into page-cache pages the kernel must first find and clear; on a VM whose
free memory the host reclaims (a balloon with free page reporting) each of those pages is faulted in by the host
first, and writing a 1.6 GB shard set took 0.4-5.6 s of system time, varying run to run, on the 2 cores the merge
computes on (benchmarks/README.md, throughput). Written with O_DIRECT, the same bytes go from one reused buffer to the
disk: ~0.2 s of system time, and the output is on the disk when the command returns. Not the default: the merge then
waits for the disk, which a buffered write leaves to the kernel's writeback after the command, so a disk slower than
the merge bounds it; from a cold page cache the writes share the disk with the reads (the 3 x 1.6 GB soup there:
1.56x, 1.13x and 1.01x the raw floor in three runs, against 1.13x, 1.48x and 1.65x buffered). Where the file
system refuses O_DIRECT (tmpfs, some FUSE and network file systems), at the open or at the first write, the file is
written through the page cache.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from pathlib import Path

ALIGNMENT = 4096
"""O_DIRECT's alignment of buffer addresses, file offsets and lengths: a multiple of every logical block size in use."""
STAGING_BYTES = 8 * 1024 * 1024
REFUSALS = (errno.EINVAL, errno.EOPNOTSUPP)
"""What a file system that does not do O_DIRECT answers, at the open or at a write."""


def direct_writes_enabled() -> bool:
    """Whether shards are written with O_DIRECT: on Linux, where SPLICE_DIRECT_WRITE=1."""
    return hasattr(os, "O_DIRECT") and os.environ.get("SPLICE_DIRECT_WRITE") == "1"


class StagingBuffer:
    """The page-aligned buffer a writer's direct files copy their bytes into (one for all its shards, reused)."""

    def __init__(self, size: int | None = None) -> None:
        self.memory = mmap.mmap(-1, size or STAGING_BYTES)
        self.view = memoryview(self.memory)

    def close(self) -> None:
        try:
            self.view.release()
            self.memory.close()
        except BufferError:  # a view still held (a failed write's traceback): freed with the last reference
            pass


class DirectFile:
    """A file written once from its start, sequentially (`write`, `tell`, `close`), with O_DIRECT: bytes gather in
    the staging buffer and go to the disk a full buffer at a time; the last, partial block is written padded with
    zeros and the file then cut to its length."""

    def __init__(self, fd: int, staging: StagingBuffer) -> None:
        self.fd, self.staging = fd, staging
        self.filled = 0  # staged bytes not yet written
        self.written = 0  # bytes on the disk, a multiple of ALIGNMENT

    @classmethod
    def create(cls, path: Path, staging: StagingBuffer) -> DirectFile | None:
        """The file at `path`, created or truncated, opened for direct writes; None where the file system refuses
        O_DIRECT (nothing created then)."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            if exc.errno in REFUSALS:
                return None
            raise
        return cls(fd, staging)

    def write(self, data: bytes | memoryview) -> int:
        source = memoryview(data).cast("B")
        done = 0
        capacity = len(self.staging.view)
        while done < len(source):
            taken = min(capacity - self.filled, len(source) - done)
            self.staging.view[self.filled : self.filled + taken] = source[done : done + taken]
            self.filled += taken
            done += taken
            if self.filled == capacity:
                self._write_staged(capacity)
        return done

    def tell(self) -> int:
        return self.written + self.filled

    def close(self) -> None:
        """Write what is staged and cut the file to its length."""
        if self.fd < 0:
            return
        try:
            length = self.tell()
            if self.filled:
                padded = -(-self.filled // ALIGNMENT) * ALIGNMENT
                self.staging.view[self.filled : padded] = bytes(padded - self.filled)
                self._write_staged(padded)
                os.ftruncate(self.fd, length)
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Close without writing what is staged (the output is being thrown away)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _write_staged(self, size: int) -> None:
        """The first `size` staged bytes (a multiple of ALIGNMENT) written at the file's aligned end."""
        done = 0
        with self.staging.view[:size] as view:
            while done < size:
                try:
                    done += os.pwrite(self.fd, view[done:], self.written + done)
                except OSError as exc:  # a file system that took O_DIRECT at the open but not for writing
                    flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
                    if exc.errno not in REFUSALS or not flags & os.O_DIRECT:
                        raise
                    fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        self.written += size
        self.filled = 0
