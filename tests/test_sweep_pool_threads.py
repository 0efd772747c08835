"""A local pool's workers share the cores (issue 18): torch in each of N workers runs cpu_count // N threads (threads
that outnumber the cores wait on each other: benchmarks/sweep_bench.py measured candidates 4x slower), unless
OMP_NUM_THREADS says how many, as it does for Ray's workers. The hook reports the thread count it ran with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

import splice

HOOK = "import torch\n\n\ndef score(state):\n    return float(torch.get_num_threads())\n"
ENV = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
ENV["PYTHONPATH"] = str(Path(splice.__file__).parents[1])


def threads_in_workers(directory: Path, models: list[Path], env: dict[str, str]) -> set[float]:
    """`splice sweep --workers 2` over 4 candidates: the thread counts the hook saw in the pool's workers."""
    (directory / "evals.py").write_text(HOOK)
    weights = {"search": "choice", "values": [0.2, 0.4, 0.6, 0.8]}
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(models[0]), "parameters": {"weight": weights}}, {"model": str(models[1])}],
        "parameters": {"weight": 0.5},
    }
    sweep = {"recipe": recipe, "search": {"method": "grid"}, "evaluate": {"hook": "evals.py:score"}, "keep": "none"}
    (directory / "sweep.yml").write_text(yaml.safe_dump(sweep))
    out = directory / "out"
    argv = [sys.executable, "-m", "splice", "sweep", str(directory / "sweep.yml"), "--workers", "2", "--out", str(out)]
    done = subprocess.run([*argv, "--quiet"], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    trials = json.loads((out / "sweep_results.json").read_text())["trials"]
    assert [t["error"] for t in trials] == [None] * 4
    return {t["score"] for t in trials}


def test_each_pool_worker_gets_its_share_of_the_cores(make_models, tmp_path):
    seen = threads_in_workers(tmp_path, make_models("llama", 2), ENV)
    assert seen == {float(max(1, (os.cpu_count() or 1) // 2))}


def test_omp_num_threads_set_by_the_user_is_kept(make_models, tmp_path):
    threads = os.cpu_count() or 1  # torch caps OMP_NUM_THREADS at the cores: every core, twice over with 2 workers
    seen = threads_in_workers(tmp_path, make_models("llama", 2), {**ENV, "OMP_NUM_THREADS": str(threads)})
    assert seen == {float(threads)}
