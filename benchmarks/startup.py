"""Benchmark: how long the front door takes, as ratios to `python -c "import torch"`.

Each command runs in its own process, interleaved over `--repeats` rounds after one warm-up; medians are
reported. Targets: `splice --help` and `splice registry ls` at most 0.3x of importing torch (neither may
import torch). `registry show` is listed for information: describing a version's kind settings imports the
patch kinds, which live with the tensor code.

Not run in CI. Usage:  .venv/bin/python benchmarks/startup.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from splice.adapters.meta import BaseFingerprint, PatchKind, PatchMeta
from splice.adapters.patch import Patch
from splice.registry import Registry

TARGET = 0.3


def make_registry(root: Path) -> str:
    registry = Registry.init(str(root / "registry"))
    for version in range(6):
        tensors = {f"layer.{i}.norm.weight": torch.full((64,), float(version + i)) for i in range(8)}
        meta = PatchMeta(kind=PatchKind.layernorm, targets=sorted(tensors), base=BaseFingerprint.of([]))
        registry.push("task" if version % 2 else "other", Patch(tensors, meta))
    return registry.url


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds after the warm-up")
    args = parser.parse_args(argv)
    splice = [sys.executable, "-m", "splice"]
    with tempfile.TemporaryDirectory(prefix="splice-startup-") as work:
        url = make_registry(Path(work))
        cases = {
            "import torch": [sys.executable, "-c", "import torch"],
            "splice --help": [*splice, "--help"],
            "splice registry ls": [*splice, "registry", "ls", "--registry", url],
            "splice registry show": [*splice, "registry", "show", "task@1", "--registry", url],
        }
        for command in cases.values():
            timed(command)
        runs: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, command in cases.items():
                runs[name].append(timed(command))
    medians = {name: statistics.median(times) for name, times in runs.items()}
    torch_s = medians["import torch"]
    print(f"{'command':24} {'median s':>9} {'x import torch':>15} {'target':>8}")
    for name, median in medians.items():
        target = f"<= {TARGET}" if name in ("splice --help", "splice registry ls") else ""
        print(f"{name:24} {median:9.3f} {median / torch_s:15.2f} {target:>8}")
    print(
        json.dumps(
            {"medians_s": medians, "ratios": {n: m / torch_s for n, m in medians.items()}, "repeats": args.repeats}
        )
    )
    missed = [n for n in ("splice --help", "splice registry ls") if medians[n] / torch_s > TARGET]
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
