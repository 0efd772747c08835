"""Where a streamed merge's time goes, measured in one process per merge (throughput.py --profile).

The stream runs three threads: the reader (Checkpoint.read), the compute thread (the kernel's inputs converted to
the working dtype, the kernel, the cast into the output, the finiteness check: stream.compute_one) and the writer
(ShardedWriter.write). Each one's busy time is timed by wrapping those functions; the time each waits for the
others is the queue waits. Inside compute, torch's profiler gives each operation's own CPU time: conversions and
casts are aten::copy_/aten::_to_copy, the kernel's arithmetic aten::mul/add/..., the check aten::sum/isfinite. The
profiler slows the compute thread down (it records every operation), so these are shares, not timings of a run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import collections, json, os, queue, sys, threading, time
import torch
import splice
from splice.tensors import checkpoint, stream, writer

busy = collections.defaultdict(float)


def timed(owner, name, key):
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            busy[key] += time.perf_counter() - started

    setattr(owner, name, wrapper)


timed(checkpoint.Checkpoint, "read", "reader: reading")
timed(stream, "compute_one", "compute: converting, merging, casting, checking")
timed(writer.ShardedWriter, "write", "writer: writing")
for method, verb in (("get", "waiting for input"), ("put", "waiting for room")):
    original = getattr(queue.Queue, method)

    def waiting(self, *args, _original=original, _verb=verb, **kwargs):
        started = time.perf_counter()
        try:
            return _original(self, *args, **kwargs)
        finally:
            busy[f"{threading.current_thread().name}: {_verb}"] += time.perf_counter() - started

    setattr(queue.Queue, method, waiting)

what, out, *inputs = sys.argv[1:]
run = (lambda: splice.soup(inputs, out, device="cpu", force=True)) if what == "soup" else (
    lambda: splice.merge(inputs[0], out, device="cpu", force=True))
started = time.perf_counter()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
    run()
wall = time.perf_counter() - started
ops = sorted(((e.key, e.self_cpu_time_total / 1e6, e.count) for e in profiler.key_averages()), key=lambda t: -t[1])
print(json.dumps({"wall_s": wall, "threads_s": dict(busy), "ops": [list(o) for o in ops[:12]]}))
"""


def profile_one(what: str, out: Path, inputs: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, what, str(out), *inputs], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"profiling {what} failed: {done.stderr[-2000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(done.stdout.splitlines()[-1])


def profile_runs(models: list[Path], workdir: Path, ties_config: Path) -> dict:
    """{"soup": profile, "ties": profile}, each printed as it is measured."""
    profiles = {
        "soup": profile_one("soup", workdir / "outputs" / "profile-soup", [str(m) for m in models]),
        "ties": profile_one("merge", workdir / "outputs" / "profile-ties", [str(ties_config)]),
    }
    for name, found in profiles.items():
        print(f"\nprofile of {name} (warm, one process, torch's profiler on): {found['wall_s']:.2f} s")
        for key, seconds in sorted(found["threads_s"].items()):
            print(f"  {key:<48} {seconds:7.2f} s")
        print("  compute thread's torch operations (own CPU time, calls):")
        for op, seconds, calls in found["ops"]:
            print(f"    {op:<30} {seconds:7.2f} s {calls:9d}")
    return profiles
