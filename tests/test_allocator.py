"""The command line's allocator settings, read back from glibc in a real process (mallinfo2): a tensor-sized block
comes from the heap instead of a mapping of its own, and stays in the heap once freed, ready for the next tensor;
settings a user gave are left alone."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from splice.tensors.allocator import keep_freed_buffers, user_tuned

from helpers import run_cli

# A 48 MB block malloc'd and freed, with glibc's own figures: bytes in mappings of their own while it is held, and
# free bytes left in the heap after.
BLOCK_KEPT_OR_NOT = """
import ctypes, json, sys
from splice.tensors.allocator import keep_freed_buffers
class MallInfo2(ctypes.Structure):
    _fields_ = [(field, ctypes.c_size_t) for field in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                       "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
changed = keep_freed_buffers() if sys.argv[1] == "keep" else False
block = libc.malloc(48 << 20)
mapped = libc.mallinfo2().hblkhd
libc.free(block)
print(json.dumps({"changed": changed, "mapped_while_held": mapped, "free_in_heap_after": libc.mallinfo2().fordblks}))
"""


def block_kept_or_not(mode: str, **environment: str) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", BLOCK_KEPT_OR_NOT, mode],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **environment},
        check=True,
    )
    return json.loads(run.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt and mallinfo2 are glibc's")
def test_a_freed_tensor_sized_block_stays_in_the_heap_once_the_command_line_keeps_freed_buffers():
    block = 48 << 20
    default = block_kept_or_not("default")
    assert default["mapped_while_held"] >= block and default["free_in_heap_after"] < block  # mapped, then unmapped
    kept = block_kept_or_not("keep")
    assert kept["changed"] and kept["mapped_while_held"] < block and kept["free_in_heap_after"] >= block
    told = block_kept_or_not("keep", MALLOC_TRIM_THRESHOLD_="131072")  # the user's setting wins
    assert not told["changed"] and told["mapped_while_held"] >= block


def test_settings_a_user_gave_are_left_alone(monkeypatch):
    assert user_tuned({"MALLOC_TRIM_THRESHOLD_": "0"}) and user_tuned({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert not user_tuned({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX"}) and not user_tuned({})
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert keep_freed_buffers() is False


def test_the_command_line_keeps_freed_buffers(monkeypatch, capsys):
    import splice.cli.app as app

    called = []
    monkeypatch.setattr(app, "keep_freed_buffers", lambda: called.append(True) or True)
    code, out, _ = run_cli(["--help"], monkeypatch, capsys)
    assert code == 0 and "Usage" in out and called == [True]
