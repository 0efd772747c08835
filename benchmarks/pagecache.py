"""The page cache, for cold-cache benchmark runs: drop a file's cached pages without privileges
(`posix_fadvise(POSIX_FADV_DONTNEED)`), and measure how much of it is resident (`mincore` over a read-only mapping),
so a run can check that the drop worked before it is timed.

Linux only. The kernel drops only clean pages: a file written moments ago is flushed (`fdatasync`) first. Files on
tmpfs live in the page cache and cannot be dropped: `resident_share` says so (1.0 after `evict`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from collections.abc import Iterable
from pathlib import Path

_PROT_READ = 0x1
_MAP_SHARED = 0x01
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]


def evict(paths: Iterable[str | os.PathLike]) -> None:
    """Drops every file's pages from the page cache (flushed first: dirty pages are not dropped)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_pages(path: str | os.PathLike) -> tuple[int, int]:
    """(pages of the file in the page cache, pages it spans), by `mincore` over a read-only shared mapping of it
    (mapping reads nothing: only touching a page would)."""
    size = Path(path).stat().st_size
    page = mmap.PAGESIZE
    pages = -(-size // page)
    if size == 0:
        return 0, 0
    fd = os.open(path, os.O_RDONLY)
    try:
        address = _libc.mmap(None, size, _PROT_READ, _MAP_SHARED, fd, 0)
        if address in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            vector = (ctypes.c_ubyte * pages)()
            if _libc.mincore(address, size, vector) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            return sum(byte & 1 for byte in vector), pages
        finally:
            _libc.munmap(address, size)
    finally:
        os.close(fd)


def resident_share(paths: Iterable[str | os.PathLike]) -> float:
    """The share of the files' pages in the page cache (0.0: all cold)."""
    resident = spanned = 0
    for path in paths:
        here, pages = resident_pages(path)
        resident, spanned = resident + here, spanned + pages
    return resident / spanned if spanned else 0.0


def evicted(paths: Iterable[str | os.PathLike], at_most: float = 0.01) -> float:
    """`evict`, then the share still resident, refused above `at_most` (a cold run on a warm cache measures nothing)."""
    files = list(paths)
    evict(files)
    share = resident_share(files)
    if share > at_most:
        raise RuntimeError(
            f"{share:.1%} of the inputs' pages are still cached after posix_fadvise(DONTNEED) (a tmpfs or a file "
            "held open and mapped by another process?): a cold-cache run would not be cold"
        )
    return share
