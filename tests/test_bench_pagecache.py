"""The cold-cache helper of the throughput benchmarks (benchmarks/pagecache.py) really evicts: a file read into the
page cache is resident, after `evict` it is not, by its own `mincore` count and by util-linux's `fincore` where the
machine has it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from pagecache import evict, evicted, resident_pages, resident_share  # noqa: E402

SIZE = 8 << 20


def _fincore_pages(path: Path) -> int | None:
    """Resident pages as util-linux's fincore counts them (None where it is not installed)."""
    if shutil.which("fincore") is None:
        return None
    result = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "PAGES", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return int(result.stdout.split()[0])


@pytest.fixture
def written(tmp_path: Path) -> Path:
    path = tmp_path / "shard.bin"  # tmp_path is on a disk here (ext4); tmpfs pages could not be dropped
    path.write_bytes(os.urandom(SIZE))
    return path


def test_a_read_file_is_resident_and_evict_drops_it(written):
    written.read_bytes()
    resident, pages = resident_pages(written)
    assert pages == -(-SIZE // os.sysconf("SC_PAGE_SIZE"))
    assert resident == pages
    assert _fincore_pages(written) in (None, resident)
    evict([written])
    assert resident_pages(written)[0] == 0 == (_fincore_pages(written) or 0)
    assert evicted([written]) == 0.0
    fd = os.open(written, os.O_RDONLY)
    try:  # one page read back, with the kernel's read-ahead off: about that page is resident, not the file
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        os.pread(fd, 4096, SIZE // 2)
    finally:
        os.close(fd)
    resident, pages = resident_pages(written)
    assert 1 <= resident <= pages // 8
    assert resident_share([written]) == resident / pages
