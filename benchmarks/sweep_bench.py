"""Benchmark: `splice sweep` (issue 18): a 16-candidate TIES grid on 1 and 2 local workers and on Ray, against a
mergekit-evolve-style loop, with the driver's memory, cold vs warm inputs and the driver's ask/tell rate.

Inputs: three Llama-shaped fp32 checkpoints of ~123 MB (hidden 640, 4 layers, vocab 8192, one safetensors shard):
a base and two "fine-tunes" (base + N(0, 0.001)), built by merge_vs_mergekit.build_models. The sweep: TIES on the
base, its two fine-tunes, a grid of density x weight (4 x 4), scored by a hook that reads three tensors (a few ms).
Every case runs in its own child process (`python sweep_bench.py --child ...`), like a user's command:

  local-1        splice.sweep(grid, executor="local", workers=1)    candidates in the driver's process, one by one
  local-2        splice.sweep(grid, executor="local", workers=2)    a forkserver pool of 2
  ray-2          splice.sweep(grid, executor="ray", workers=2, address=...) on a local Ray cluster this script starts
                 (`ray start --head --node-ip-address=127.0.0.1 --num-cpus=2`) and stops; start-up not in the wall
  evolve-loop    the peer, mergekit-evolve style: for each grid point, write its recipe, splice.merge() it to disk,
                 load the written model (safetensors load_file), score it with the same hook; one by one
  driver-memory  random search of 16 and of 64 trials on 2 local workers: the driver's peak RSS (VmHWM)
  cold-warm      one candidate's read of the three inputs and its in-memory merge (merged_state), with the inputs
                 evicted from the page cache (os.sync + posix_fadvise DONTNEED) and warm; its evaluation
  ask-tell       the sweep driver (StudyDriver over the journal file) with candidates that finish at once:
                 1,000 trials of TPE and of random search, ask and tell timed

The sweeps and the loop run `--repeats` interleaved rounds (order rotated); medians, ratios within a round.
Not run in CI. Usage: .venv/bin/python benchmarks/sweep_bench.py [--repeats 2] [--only local-1 local-2 ...]
See benchmarks/README.md for the figures measured so far and the projection to 7B models.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from merge_vs_mergekit import (  # noqa: E402
    MODEL_SPEC,
    build_models,
    busy_cores,
    cpu_busy_seconds,
    machine_info,
    splice_fingerprint,
)

DEFAULT_WORKDIR = HERE / "_work" / "sweep"
SIZES = {
    # hidden 640, intermediate 1792, 4 layers, vocab 8192, untied lm_head: 30.8 M parameters = 123 MB in fp32
    "full": {
        **MODEL_SPEC,
        "hidden_size": 640,
        "intermediate_size": 1792,
        "num_attention_heads": 10,
        "num_key_value_heads": 10,
        "vocab_size": 8192,
        "shards": 1,
    },
    # for trying the script out: 0.6 M parameters
    "small": {
        **MODEL_SPEC,
        "hidden_size": 128,
        "intermediate_size": 352,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 1024,
        "shards": 1,
    },
}
DENSITIES = [0.2, 0.4, 0.6, 0.8]
WEIGHTS = [0.25, 0.5, 0.75, 1.0]
SWEEP_CASES = ["local-1", "local-2", "ray-2", "evolve-loop"]
CASES = [*SWEEP_CASES, "driver-memory", "cold-warm", "ask-tell"]
WORKERS = {"local-1": 1, "local-2": 2, "ray-2": 2, "evolve-loop": 1}
CHILD_TIMEOUT = 600.0
RAY_START_TIMEOUT = 120.0

HOOK = '''"""The benchmark's evaluation: a deterministic score from three tensors (a few ms)."""

PROBES = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight")
TARGET = 1.05


def score(state):
    spread = sum(float(state[name].float().std()) for name in PROBES)
    return -abs(spread - TARGET)
'''

# What the 7B projection assumes beside the measured figures (benchmarks/README.md explains each).
ASSUMPTIONS = {
    "model_params": 7.0e9,
    "model_bytes": 13.5e9,  # one 7B checkpoint in bf16
    "inputs": 3,
    "trials": 1000,
    "gpus_per_node": 8,
    "storage_node_gbps": 2.5,  # what one node reads from shared storage (S3, parallel ranged GETs), GB/s
    "storage_aggregate_gbps": 20.0,  # what the shared storage serves all nodes together, GB/s
    "h2d_gbps": 12.0,  # host to GPU from pageable memory, per GPU, GB/s
    "gpu_compute_s": 1.0,  # TIES kernels for 21e9 elements on an H100 (memory-bound: ~20 fp32 passes at 2 TB/s)
    "cpu_cores_per_gpu": 12,  # for the merge on the node's CPU cores instead
    "eval_s": 60.0,  # one candidate's evaluation on one GPU (a few hundred held-out prompts, log-likelihood)
    "eval_cv": 0.05,  # spread of candidates' times (standard deviation / mean), for TPE's batch barrier
}


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def recipe_of(models: list[str], density: Any, weight: Any) -> dict[str, Any]:
    base, *tuned = models
    return {
        "merge_method": "ties",
        "base_model": base,
        "models": [{"model": m} for m in tuned],
        "parameters": {"density": density, "weight": weight},
    }


def write_inputs(workdir: Path, models: list[Path], trials: int, memory_trials: list[int], asks: int) -> dict:
    import yaml

    paths = [str(m) for m in models]
    (workdir / "evals.py").write_text(HOOK)

    def sweep_file(name: str, recipe: dict, search: dict) -> str:
        path = workdir / name
        sweep = {"recipe": recipe, "search": search, "evaluate": {"hook": "evals.py:score"}, "keep": "none"}
        path.write_text(yaml.safe_dump(sweep, sort_keys=False))
        return str(path)

    grid = recipe_of(paths, {"search": "choice", "values": DENSITIES}, {"search": "choice", "values": WEIGHTS})
    uniform = recipe_of(
        paths, {"search": "uniform", "low": 0.1, "high": 0.9}, {"search": "uniform", "low": 0.25, "high": 1.0}
    )
    search = {"method": "grid"} if trials == len(DENSITIES) * len(WEIGHTS) else {"method": "grid", "trials": trials}
    files = {
        "grid": sweep_file("grid.yml", grid, search),
        "memory": {n: sweep_file(f"random-{n}.yml", uniform, {"method": "random", "trials": n}) for n in memory_trials},
        "asks": {
            method: sweep_file(f"asks-{method}.yml", uniform, {"method": method, "seed": 0, "trials": asks})
            for method in ("tpe", "random")
        },
        "hook": str(workdir / "evals.py"),
        "models": paths,
        "shards": [str(p) for m in models for p in sorted(m.glob("*.safetensors"))],
    }
    return files


# --------------------------------------------------------------------------------------------------
# Children: each case in its own process (python sweep_bench.py --child KIND SPEC_JSON REPORT_JSON)
# --------------------------------------------------------------------------------------------------


def memory_status() -> dict[str, float]:
    """The process's own peak and current resident memory in MB (per address space, so exec'd fresh)."""
    found = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon"):
                found[key] = int(value.split()[0]) / 1024
    return found


def child_sweep(spec: dict) -> dict:
    started = time.perf_counter()
    import torch

    import splice
    from splice.options import RunOptions

    imported = time.perf_counter()
    finished: list[float] = []
    call_started = time.perf_counter()
    report = splice.sweep(
        spec["file"],
        out=spec["out"],
        executor=spec["executor"],
        workers=spec["workers"],
        address=spec.get("address"),
        run=RunOptions(force=True),
        on_trial=lambda record: finished.append(time.perf_counter() - call_started),
    )
    call = time.perf_counter() - call_started
    results = json.loads((Path(spec["out"]) / "sweep_results.json").read_text())
    return {
        "import_s": imported - started,
        "call_s": call,
        "finished_at": finished,
        "trials": [
            {
                "number": t["number"],
                "values": t["values"],
                "score": t["score"],
                "error": t["error"],
                "merge_s": t["merge_seconds"],
                "eval_s": t["eval_seconds"],
                "worker": t["worker"],
            }
            for t in results["trials"]
        ],
        "workers": report.workers,
        "memory": memory_status(),
        "driver_threads": torch.get_num_threads(),
    }


def child_loop(spec: dict) -> dict:
    """The peer: each candidate merged to disk, then loaded and scored, one after another (mergekit-evolve's loop:
    it writes a merge config per candidate, runs the merge into a directory, and evaluates what was written). The
    candidates are the sweep file's, in the order its sweep takes them."""
    started = time.perf_counter()
    import yaml
    from safetensors.torch import load_file

    import splice
    from splice.hooks import load_callable
    from splice.workflows.sweep.file import load_sweep
    from splice.workflows.sweep.study import grid_points

    score_of = load_callable(f"{spec['hook']}:score")
    points = grid_points(load_sweep(spec["file"]))
    imported = time.perf_counter()
    out, recipe_file = Path(spec["out"]), Path(spec["recipe_file"])
    trials = []
    finished = []
    call_started = time.perf_counter()
    for number, values in enumerate(points):
        began = time.perf_counter()
        recipe = recipe_of(spec["models"], values["parameters.density"], values["parameters.weight"])
        recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
        splice.merge(recipe_file, out, force=True)
        merged = time.perf_counter()
        state: dict = {}
        for shard in sorted(out.glob("*.safetensors")):
            state.update(load_file(shard))
        loaded = time.perf_counter()
        score = float(score_of(state))
        done = time.perf_counter()
        del state
        trials.append(
            {
                "number": number,
                "values": values,
                "score": score,
                "error": None,
                "merge_s": merged - began,
                "load_s": loaded - merged,
                "eval_s": done - loaded,
                "worker": "loop",
            }
        )
        finished.append(done - call_started)
    return {
        "import_s": imported - started,
        "call_s": time.perf_counter() - call_started,
        "finished_at": finished,
        "trials": trials,
        "workers": 1,
        "memory": memory_status(),
    }


def evict(files: list[str]) -> None:
    """Drop the files' pages from the page cache (written back first, so every page is clean and can go)."""
    os.sync()
    for path in files:
        handle = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(handle, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(handle)


def resident_bytes(files: list[str]) -> int | None:
    """How much of the files sits in the page cache (util-linux fincore), or None without it."""
    if shutil.which("fincore") is None:
        return None
    listed = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", *files],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if listed.returncode != 0:
        return None
    return sum(int(line.split()[0]) for line in listed.stdout.splitlines() if line.strip())


def read_into(files: list[str], buffer: bytearray) -> int:
    """Every byte of `files` read into `buffer` (one copy, what any reader of the inputs does at least)."""
    view, total = memoryview(buffer), 0
    for path in files:
        with open(path, "rb", buffering=0) as handle:
            while count := handle.readinto(view):
                total += count
    return total


def child_coldwarm(spec: dict) -> dict:
    """One candidate on one core (a worker's share of 2 cores shared by 2 workers): its inputs read, its merge,
    its evaluation, with the inputs evicted from the page cache and warm."""
    import torch

    from splice.hooks import load_callable
    from splice.merge.recipe import merged_state, parse_recipe

    torch.set_num_threads(1)
    score_of = load_callable(f"{spec['hook']}:score")
    files = spec["shards"]
    recipe = parse_recipe(recipe_of(spec["models"], 0.6, 0.5), "cold-warm")
    merged_state(recipe)  # once first: imports and first-touch costs are not the cold figure's
    buffer = bytearray(max(os.path.getsize(f) for f in files))

    def timed(action):
        began = time.perf_counter()
        result = action()
        return time.perf_counter() - began, result

    rounds = []
    for _ in range(spec["rounds"]):
        evict(files)
        resident_cold = resident_bytes(files)
        read_cold, _ = timed(lambda: read_into(files, buffer))
        read_warm, _ = timed(lambda: read_into(files, buffer))
        evict(files)
        merge_cold, state = timed(lambda: merged_state(recipe))
        del state
        merge_warm, state = timed(lambda: merged_state(recipe))
        began = time.perf_counter()
        score_of(state)
        eval_s = time.perf_counter() - began
        del state
        rounds.append(
            {
                "read_cold_s": read_cold,
                "read_warm_s": read_warm,
                "merge_cold_s": merge_cold,
                "merge_warm_s": merge_warm,
                "eval_s": eval_s,
                "resident_after_evict": resident_cold,
            }
        )
    return {"rounds": rounds, "input_bytes": sum(os.path.getsize(f) for f in files), "memory": memory_status()}


class InstantExecutor:
    """Candidates that finish as soon as they are asked for: what is left is the driver's own time."""

    def __init__(self, slots: int):
        self.slots = slots
        self.queue: list = []

    def submit(self, candidate) -> None:
        self.queue.append(candidate)

    def next_outcome(self, timeout: float):
        from splice.workflows.sweep.candidate import Outcome

        if not self.queue:
            return None
        candidate = self.queue.pop(0)
        values = list(candidate.values.values())
        return Outcome(candidate.number, -((values[0] - 0.55) ** 2) - (values[1] - 0.7) ** 2)

    def close(self) -> None:
        self.queue.clear()


def child_asktell(spec: dict) -> dict:
    from splice.progress import NoProgress
    from splice.workflows.sweep.candidate import MergeCandidate
    from splice.workflows.sweep.file import load_sweep
    from splice.workflows.sweep.study import StudyDriver, fingerprint, open_study

    sweep = load_sweep(spec["file"])
    journal = Path(spec["journal"])
    journal.unlink(missing_ok=True)
    study = open_study(journal, sweep.file.evaluate.direction, fingerprint(sweep), resume=False)
    asks: list[float] = []
    tells: list[float] = []

    def timing(method, into: list[float]):
        def timed(*args, **kwargs):
            began = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                into.append(time.perf_counter() - began)

        return timed

    study.ask = timing(study.ask, asks)  # type: ignore[method-assign]
    study.tell = timing(study.tell, tells)  # type: ignore[method-assign]
    finished: list[float] = []
    driver = StudyDriver(
        sweep, study, InstantExecutor(spec["slots"]), lambda n, v, r: MergeCandidate(n, v, r), sweep.trials
    )
    began = time.perf_counter()
    driver.run(lambda record: finished.append(time.perf_counter() - began), NoProgress())
    total = time.perf_counter() - began
    per_trial = [b - a for a, b in zip([0.0, *finished[:-1]], finished)]
    return {
        "method": sweep.method,
        "trials": len(finished),
        "slots": spec["slots"],
        "total_s": total,
        "ask_s": asks,
        "tell_s": tells,
        "per_trial_s": per_trial,
        "journal_bytes": journal.stat().st_size,
    }


CHILDREN = {"sweep": child_sweep, "loop": child_loop, "coldwarm": child_coldwarm, "asktell": child_asktell}


def run_child(kind: str, spec: dict, workdir: Path, log_name: str, env: dict[str, str]) -> dict:
    """One child process: its report, the wall time from fork to exit, and the load on the machine around it."""
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    report = logs / f"{log_name}.json"
    report.unlink(missing_ok=True)
    other_before = busy_cores(1.0)  # nothing of ours runs now: this is the others' load
    load_before = os.getloadavg()[0]
    machine_before = cpu_busy_seconds()
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(spec), str(report)]
    began = time.perf_counter()
    with open(logs / f"{log_name}.log", "wb") as out:
        returncode = subprocess.run(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=CHILD_TIMEOUT, check=False
        ).returncode
    wall = time.perf_counter() - began
    machine_after = cpu_busy_seconds()
    if returncode != 0 or not report.is_file():
        tail = (logs / f"{log_name}.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"{log_name} failed (exit {returncode}); log {logs / f'{log_name}.log'}:\n{tail}")
    result = json.loads(report.read_text())
    result["process_s"] = wall
    result["others_busy_before"] = other_before
    result["load_average_before"] = load_before
    if machine_before is not None and machine_after is not None:
        result["machine_busy_during"] = (machine_after - machine_before) / wall
    return result


# --------------------------------------------------------------------------------------------------
# A local Ray cluster for the ray case
# --------------------------------------------------------------------------------------------------


class RayCluster:
    """`ray start --head --block` on 127.0.0.1 in its own session, in a temp dir of its own, stopped by its process
    group (never `ray stop`, which would stop every cluster on the machine)."""

    def __init__(self, cpus: int, env: dict[str, str]):
        self.temp = tempfile.mkdtemp(prefix="ray-sb-", dir="/tmp")  # short: Ray's socket paths have a length limit
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        ray = Path(sys.executable).parent / "ray"
        argv = [
            str(ray if ray.exists() else shutil.which("ray") or "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={self.port}",
            f"--num-cpus={cpus}",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={self.temp}",
        ]
        began = time.perf_counter()
        self.process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True, text=True
        )
        self.output: list[str] = []
        ready = threading.Event()

        def read() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                self.output.append(line)
                if "Ray runtime started" in line:
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(RAY_START_TIMEOUT):
            self.stop()
            raise SystemExit("the Ray cluster did not start:\n" + "".join(self.output[-30:]))
        self.start_s = time.perf_counter() - began

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------


def sweep_row(result: dict, workers: int) -> dict:
    """One sweep run's figures: walls, the candidates' own seconds, per-candidate occupancy and the driver's RSS."""
    trials = result["trials"]
    own = [t["merge_s"] + t.get("load_s", 0.0) + t["eval_s"] for t in trials]
    finished = sorted(result["finished_at"])
    count = len(trials)
    occupancy = result["call_s"] * workers / count  # worker-seconds of wall per candidate
    # steady state: from the first `workers` candidates done to the last one (start-up and the tail left out)
    steady = (finished[-1] - finished[workers - 1]) * workers / (count - workers) if count > workers else None
    return {
        "process_s": result["process_s"],
        "call_s": result["call_s"],
        "import_s": result["import_s"],
        "trials": count,
        "failed": sum(1 for t in trials if t["error"]),
        "merge_s_sum": sum(t["merge_s"] for t in trials),
        "load_s_sum": sum(t.get("load_s", 0.0) for t in trials),
        "eval_s_sum": sum(t["eval_s"] for t in trials),
        "own_s_mean": statistics.mean(own),
        "own_s_max": max(own),
        "per_candidate_wall_s": occupancy,
        "overhead_vs_own": occupancy / statistics.mean(own) - 1,
        "steady_per_candidate_s": steady,
        "first_done_s": finished[0],
        "last_done_s": finished[-1],
        "tail_s": result["call_s"] - finished[-1],
        "driver_peak_mb": result["memory"].get("VmHWM"),
        "driver_threads": result.get("driver_threads"),
        "worker_processes": len({t["worker"] for t in trials}),
        "others_busy_before": result["others_busy_before"],
        "machine_busy_during": result.get("machine_busy_during"),
    }


def median_of(rows: list[dict]) -> dict:
    return {
        key: statistics.median(r[key] for r in rows)
        for key in rows[0]
        if all(isinstance(r[key], (int, float)) and not isinstance(r[key], bool) for r in rows)
    }


def scores_agree(runs: dict[str, list[dict]]) -> dict | None:
    """The loop's scores (merged to disk, loaded) against local-1's (merged in memory), matched by values."""
    if not runs.get("evolve-loop") or not runs.get("local-1"):
        return None

    def by_values(result: dict) -> dict:
        return {tuple(sorted(t["values"].items())): t["score"] for t in result["trials"]}

    disk, memory = by_values(runs["evolve-loop"][-1]), by_values(runs["local-1"][-1])
    common = set(disk) & set(memory)
    return {"candidates": len(common), "max_abs_diff": max((abs(disk[k] - memory[k]) for k in common), default=None)}


def ratios_of(rows: dict[str, list[dict]]) -> list[dict]:
    """Each ratio taken within one round, then the median over rounds."""

    def per_round(top: str, bottom: str, key: str, minus_one: bool = False) -> list[float]:
        if not rows.get(top) or not rows.get(bottom):
            return []
        values = [a[key] / b[key] for a, b in zip(rows[top], rows[bottom])]
        return [v - 1 for v in values] if minus_one else values

    ratios = []

    def add(label: str, values: list[float], target: str | None, met) -> None:
        if values:
            value = statistics.median(values)
            ratios.append(
                {"ratio": label, "value": value, "rounds": values, "target": target, "met": met(value) if met else None}
            )

    add(
        "speed-up 1 -> 2 local workers (sweep call)",
        per_round("local-1", "local-2", "call_s"),
        ">= 1.7x",
        lambda v: v >= 1.7,
    )
    add("speed-up 1 -> 2 local workers (whole process)", per_round("local-1", "local-2", "process_s"), None, None)
    add(
        "Ray / local pool, per-candidate wall - 1",
        per_round("ray-2", "local-2", "call_s", minus_one=True),
        "< 5%",
        lambda v: v < 0.05,
    )
    add(
        "Ray / local pool, steady-state per-candidate wall - 1",
        per_round("ray-2", "local-2", "steady_per_candidate_s", minus_one=True),
        "< 5%",
        lambda v: v < 0.05,
    )
    for case in ("local-2", "ray-2"):
        if rows.get(case):
            add(
                f"{case}: per-candidate wall / candidate's own merge+eval - 1",
                [r["overhead_vs_own"] for r in rows[case]],
                None,
                None,
            )
    add("evolve-loop / local-1 sweep (whole process)", per_round("evolve-loop", "local-1", "process_s"), None, None)
    add("evolve-loop / local-2 sweep (whole process)", per_round("evolve-loop", "local-2", "process_s"), None, None)
    add("evolve-loop / local-1 sweep (call)", per_round("evolve-loop", "local-1", "call_s"), None, None)
    return ratios


def summarize_coldwarm(result: dict) -> dict:
    rounds = result["rounds"]
    row = {key: statistics.median(r[key] for r in rounds) for key in rounds[0] if key.endswith("_s")}
    gb = result["input_bytes"] / 1e9
    row.update(
        {
            "input_gb": gb,
            "read_cold_gbps": gb / row["read_cold_s"],
            "read_warm_gbps": gb / row["read_warm_s"],
            "merge_cold_over_warm": row["merge_cold_s"] / row["merge_warm_s"],
            "resident_after_evict_max": max(
                (r["resident_after_evict"] for r in rounds if r["resident_after_evict"] is not None), default=None
            ),
            "rounds": rounds,
        }
    )
    return row


def summarize_asktell(result: dict) -> dict:
    asks, tells, per_trial = result["ask_s"], result["tell_s"], result["per_trial_s"]
    window = min(100, len(per_trial))
    return {
        "trials": result["trials"],
        "slots": result["slots"],
        "total_s": result["total_s"],
        "trials_per_s": result["trials"] / result["total_s"],
        "ask_ms_first": 1e3 * statistics.mean(asks[:window]),
        "ask_ms_last": 1e3 * statistics.mean(asks[-window:]),
        "tell_ms_first": 1e3 * statistics.mean(tells[:window]),
        "tell_ms_last": 1e3 * statistics.mean(tells[-window:]),
        "trial_ms_first": 1e3 * statistics.mean(per_trial[:window]),
        "trial_ms_last": 1e3 * statistics.mean(per_trial[-window:]),
        "journal_mb": result["journal_bytes"] / 1e6,
    }


def projection(coldwarm: dict | None, asktell: dict[str, dict]) -> dict | None:
    """A 1,000-trial search over three 7B inputs on 8 and 64 GPUs, from the measured per-candidate figures (read and
    merge scaled by bytes and elements) and ASSUMPTIONS; benchmarks/README.md walks through it."""
    if coldwarm is None:
        return None
    a = ASSUMPTIONS
    input_gb = a["inputs"] * a["model_bytes"] / 1e9
    elements = a["inputs"] * a["model_params"]
    measured_elements = coldwarm["input_gb"] * 1e9 / 4  # fp32 inputs
    # the merge's own compute on one core: the warm in-memory merge less reading its inputs from the page cache
    core_ns = 1e9 * max(coldwarm["merge_warm_s"] - coldwarm["read_warm_s"], 0.0) / measured_elements
    page_cache_s = input_gb / coldwarm["read_warm_gbps"]
    h2d_s = input_gb / a["h2d_gbps"]
    merge_gpu_s = page_cache_s + h2d_s + a["gpu_compute_s"]
    merge_cpu_s = page_cache_s + core_ns * 1e-9 * elements / a["cpu_cores_per_gpu"]
    candidate_s = merge_gpu_s + a["eval_s"]
    driver_s = {method: row["trial_ms_last"] / 1e3 for method, row in asktell.items()}
    out: dict[str, Any] = {
        "assumptions": a,
        "input_gb": input_gb,
        "merge_core_ns_per_element": core_ns,
        "merge_one_core_s": core_ns * 1e-9 * elements,
        "page_cache_read_s": page_cache_s,
        "h2d_s": h2d_s,
        "merge_gpu_s": merge_gpu_s,
        "merge_cpu_cores_s": merge_cpu_s,
        "candidate_s": candidate_s,
        "driver_s_per_trial": driver_s,
        # GPUs each limit can keep busy: the storage (every candidate reading its inputs from it), the driver
        "storage_feeds_gpus_per_node": a["storage_node_gbps"] / input_gb * candidate_s,
        "storage_feeds_gpus": a["storage_aggregate_gbps"] / input_gb * candidate_s,
        "driver_feeds_gpus": {method: candidate_s / seconds for method, seconds in driver_s.items() if seconds > 0},
        "by_gpus": {},
    }
    for gpus in (8, 64):
        nodes = max(1, gpus // a["gpus_per_node"])
        storage_gbps = min(a["storage_aggregate_gbps"], nodes * a["storage_node_gbps"])
        waves = -(-a["trials"] // gpus)
        compute_bound = waves * candidate_s
        # inputs copied once to each node (its page cache or local disk), then every candidate reads them there
        cached = input_gb / (storage_gbps / nodes) + compute_bound
        # every candidate reads its inputs from the shared storage: the storage's rate bounds the whole search
        uncached = max(compute_bound, a["trials"] * input_gb / storage_gbps)
        # TPE / CMA-ES: batches of `gpus`, each waiting for its slowest candidate, then asked one by one
        straggler = a["eval_cv"] * (2 * math.log(gpus)) ** 0.5
        tpe_batch_s = candidate_s * (1 + straggler) + gpus * driver_s.get("tpe", 0.0)
        out["by_gpus"][str(gpus)] = {
            "nodes": nodes,
            "waves": waves,
            "wall_s_cached_per_node": cached,
            "wall_s_read_per_candidate": uncached,
            "wall_s_tpe_batches_cached": input_gb / (storage_gbps / nodes) + waves * tpe_batch_s,
            "tpe_batch_s": tpe_batch_s,
            "tpe_serial_asks_s": gpus * driver_s.get("tpe", 0.0),
        }
    return out


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def print_report(summary: dict) -> None:
    rows = summary["sweeps"]
    if rows:
        print(f"\nsweeps ({summary['trials']} candidates; medians of {summary['repeats']} rounds; s)")
        header = (
            f"  {'case':<12} {'process':>8} {'call':>7} {'merge sum':>10} {'load sum':>9} {'eval sum':>9}"
            f" {'cand own':>9} {'cand wall':>10} {'steady':>7} {'tail':>6} {'driver MB':>10} {'others':>7}"
        )
        print(header)
        for case, row in rows.items():
            steady = f"{row['steady_per_candidate_s']:.2f}" if row.get("steady_per_candidate_s") is not None else "-"
            print(
                f"  {case:<12} {row['process_s']:8.2f} {row['call_s']:7.2f} {row['merge_s_sum']:10.2f}"
                f" {row['load_s_sum']:9.2f} {row['eval_s_sum']:9.3f} {row['own_s_mean']:9.2f}"
                f" {row['per_candidate_wall_s']:10.2f} {steady:>7} {row['tail_s']:6.2f}"
                f" {row['driver_peak_mb']:10.0f} {row['others_busy_before']:7.2f}"
            )
        print(
            "  cand own: a candidate's own merge (+ load) + eval, mean; cand wall: call x workers / candidates;"
            " steady: the same from the first\n  `workers` candidates done to the last; tail: results files after"
            " the last candidate; others: cores busy (not ours) in the second before"
        )
    for ratio in summary["ratios"]:
        verdict = (
            "" if ratio["target"] is None else f"  target {ratio['target']}: {'met' if ratio['met'] else 'MISSED'}"
        )
        rounds = ", ".join(f"{v:.3f}" for v in ratio["rounds"])
        print(f"  {ratio['ratio']:<58} {ratio['value']:7.3f}  [{rounds}]{verdict}")
    if summary.get("scores_agree"):
        agree = summary["scores_agree"]
        print(
            f"  scores, loop (merged to disk) vs local-1 (in memory): {agree['candidates']} candidates,"
            f" max |diff| {agree['max_abs_diff']}"
        )
    if summary.get("driver_memory"):
        memory = summary["driver_memory"]
        print("\ndriver peak RSS (VmHWM, random search on 2 local workers)")
        for trials, row in memory["runs"].items():
            print(f"  {trials:>4} trials: {row['driver_peak_mb']:.0f} MB (call {row['call_s']:.1f} s)")
        print(f"  ratio {memory['ratio']:.3f}, growth {memory['growth_mb']:+.1f} MB")
    if summary.get("cold_warm"):
        cw = summary["cold_warm"]
        print(f"\none candidate, three inputs ({cw['input_gb']:.2f} GB), medians of {len(cw['rounds'])}:")
        print(
            f"  read  cold {cw['read_cold_s']:.3f} s ({cw['read_cold_gbps']:.2f} GB/s)  warm {cw['read_warm_s']:.3f} s"
            f" ({cw['read_warm_gbps']:.2f} GB/s)"
        )
        print(
            f"  merge cold {cw['merge_cold_s']:.3f} s  warm {cw['merge_warm_s']:.3f} s  cold/warm"
            f" {cw['merge_cold_over_warm']:.3f}x; eval {cw['eval_s'] * 1e3:.1f} ms;"
            f" resident after eviction {cw['resident_after_evict_max']} bytes"
        )
    if summary.get("ask_tell"):
        print("\ndriver ask/tell over the journal file, candidates finishing at once")
        for method, row in summary["ask_tell"].items():
            print(
                f"  {method:<7} {row['trials']} trials in {row['total_s']:.1f} s ({row['trials_per_s']:.0f}/s);"
                f" ask {row['ask_ms_first']:.1f} -> {row['ask_ms_last']:.1f} ms, tell {row['tell_ms_first']:.1f} ->"
                f" {row['tell_ms_last']:.1f} ms, per trial {row['trial_ms_first']:.1f} -> {row['trial_ms_last']:.1f} ms"
                f" (first -> last 100); journal {row['journal_mb']:.1f} MB"
            )
    if summary.get("projection"):
        p = summary["projection"]
        print(f"\nprojection: {ASSUMPTIONS['trials']} trials, 3 x 7B bf16 inputs ({p['input_gb']:.1f} GB a candidate)")
        print(
            f"  merge compute {p['merge_core_ns_per_element']:.1f} ns per input element on one core here:"
            f" {p['merge_one_core_s']:.0f} s on one core, {p['merge_cpu_cores_s']:.0f} s on"
            f" {ASSUMPTIONS['cpu_cores_per_gpu']} cores with the read; on the GPU {p['merge_gpu_s']:.1f} s"
            f" (page cache {p['page_cache_read_s']:.1f} s + H2D {p['h2d_s']:.1f} s + kernels"
            f" {ASSUMPTIONS['gpu_compute_s']:.0f} s); a candidate with its evaluation {p['candidate_s']:.0f} s"
        )
        for gpus, row in p["by_gpus"].items():
            print(
                f"  {gpus:>3} GPUs ({row['waves']} waves): {row['wall_s_cached_per_node'] / 3600:.2f} h with the inputs"
                f" copied to each node, {row['wall_s_read_per_candidate'] / 3600:.2f} h read from storage by every"
                f" candidate, {row['wall_s_tpe_batches_cached'] / 3600:.2f} h in TPE batches (serial asks"
                f" {row['tpe_serial_asks_s']:.1f} s a batch)"
            )
        feeds = ", ".join(f"{method} {count:.0f}" for method, count in p["driver_feeds_gpus"].items())
        print(
            f"  GPUs kept busy by: the storage read per candidate {p['storage_feeds_gpus']:.0f} in all,"
            f" {p['storage_feeds_gpus_per_node']:.1f} per node; the driver's ask/tell (its last 100 trials) {feeds}"
        )


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def child_env(threads: int | None) -> dict[str, str]:
    """The children's environment: this worktree's splice first; torch's own thread default unless `threads`."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    # the local cluster and its drivers without Ray's token auth: the token in ~/.ray is shared by every cluster on
    # the machine, and another job's `ray.init()` may write a new one while this benchmark's cluster runs
    env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"})
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_sweeps(args, cases: list[str], files: dict, workdir: Path, env: dict[str, str]) -> dict[str, Any]:
    """The sweep cases and the loop, `repeats` rounds in rotated order; Ray's cluster up for all of them."""
    order = [c for c in SWEEP_CASES if c in cases]
    cluster = RayCluster(2, env) if "ray-2" in order else None
    if cluster is not None:
        print(f"ray cluster at {cluster.address} started in {cluster.start_s:.1f} s")
    runs: dict[str, list[dict]] = {case: [] for case in order}
    try:
        for round_index in range(args.repeats if order else 0):
            shift = round_index % len(order)
            for case in order[shift:] + order[:shift]:
                out = workdir / "out" / case
                label = f"{case}.round{round_index}"
                if case == "evolve-loop":
                    out.mkdir(parents=True, exist_ok=True)
                    spec = {
                        "file": files["grid"],
                        "models": files["models"],
                        "hook": files["hook"],
                        "out": str(out / "candidate"),
                        "recipe_file": str(out / "recipe.yml"),
                    }
                    result = run_child("loop", spec, workdir, label, env)
                else:
                    ray = case.startswith("ray")
                    spec = {
                        "file": files["grid"],
                        "out": str(out),
                        "executor": "ray" if ray else "local",
                        "workers": WORKERS[case],
                        "address": cluster.address if cluster is not None and ray else None,
                    }
                    result = run_child("sweep", spec, workdir, label, env)
                failed = [t for t in result["trials"] if t["error"]]
                if failed:
                    raise SystemExit(f"{case}: {len(failed)} candidates failed, e.g. {failed[0]['error']}")
                runs[case].append(result)
                row = sweep_row(result, WORKERS[case])
                print(
                    f"  [round {round_index + 1}/{args.repeats}] {case:<12} process {row['process_s']:6.2f} s"
                    f"  call {row['call_s']:6.2f} s  candidates' own {row['own_s_mean']:.2f} s each"
                    f"  driver {row['driver_peak_mb']:.0f} MB  (others busy {row['others_busy_before']:.2f})",
                    flush=True,
                )
    finally:
        if cluster is not None:
            cluster.stop()
    rows = {case: [sweep_row(r, WORKERS[case]) for r in results] for case, results in runs.items()}
    return {
        "trials": args.trials,
        "repeats": args.repeats,
        "sweeps": {case: median_of(case_rows) for case, case_rows in rows.items()},
        "ratios": ratios_of(rows),
        "scores_agree": scores_agree(runs),
        "ray_start_s": cluster.start_s if cluster is not None else None,
        "per_round": rows,
        "runs": runs,
    }


def run_driver_memory(counts: list[int], files: dict, workdir: Path, env: dict[str, str]) -> dict[str, Any]:
    """The driver's peak RSS for a random search of few and of many trials on 2 local workers."""
    runs = {}
    for trials in counts:
        spec = {
            "file": files["memory"][trials],
            "out": str(workdir / "out" / f"memory-{trials}"),
            "executor": "local",
            "workers": 2,
        }
        runs[str(trials)] = sweep_row(run_child("sweep", spec, workdir, f"driver-memory-{trials}", env), 2)
        print(f"  driver-memory {trials:>4} trials: driver peak {runs[str(trials)]['driver_peak_mb']:.0f} MB")
    few, many = (runs[str(n)]["driver_peak_mb"] for n in counts)
    return {"runs": runs, "ratio": many / few, "growth_mb": many - few}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="models, sweep files, outputs, logs")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the sweep cases (default 2)")
    parser.add_argument("--trials", type=int, default=16, help="candidates of the grid (at most 16, default 16)")
    parser.add_argument("--only", nargs="+", metavar="CASE", choices=CASES, help=f"a subset of {' '.join(CASES)}")
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help="full: ~123 MB models; small: a try-out")
    parser.add_argument("--memory-trials", type=int, nargs=2, default=[16, 64], metavar=("FEW", "MANY"))
    parser.add_argument("--asks", type=int, default=1000, help="trials of the ask/tell measurement (default 1000)")
    parser.add_argument("--ask-slots", type=int, default=8, help="candidates asked at once in it (default 8)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS for every child (default: unset, torch's own default, as a user runs it)",
    )
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached models")
    args = parser.parse_args(argv)
    if not 2 <= args.trials <= len(DENSITIES) * len(WEIGHTS):
        parser.error(f"--trials must be 2..{len(DENSITIES) * len(WEIGHTS)}")
    cases = args.only or CASES
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "out").mkdir(exist_ok=True)
    started = time.perf_counter()
    models = build_models(workdir / f"models-{args.size}", args.rebuild, SIZES[args.size])
    files = write_inputs(workdir, models, args.trials, args.memory_trials, args.asks)
    env = child_env(args.threads)
    print(f"load average before: {os.getloadavg()}; others busy: {busy_cores(2.0):.2f} cores")
    source = splice_fingerprint()

    summary = run_sweeps(args, cases, files, workdir, env)
    if "driver-memory" in cases:
        summary["driver_memory"] = run_driver_memory(args.memory_trials, files, workdir, env)
    if "cold-warm" in cases:
        spec = {"models": files["models"], "shards": files["shards"], "hook": files["hook"], "rounds": 3}
        summary["cold_warm"] = summarize_coldwarm(run_child("coldwarm", spec, workdir, "cold-warm", env))
    if "ask-tell" in cases:
        summary["ask_tell"] = {
            method: summarize_asktell(
                run_child(
                    "asktell",
                    {
                        "file": files["asks"][method],
                        "journal": str(workdir / "out" / f"asks-{method}.journal"),
                        "slots": args.ask_slots,
                    },
                    workdir,
                    f"ask-tell-{method}",
                    env,
                )
            )
            for method in ("tpe", "random")
        }
    summary["projection"] = projection(summary.get("cold_warm"), summary.get("ask_tell", {}))
    print_report(summary)
    print(f"\nall: {time.perf_counter() - started:.0f} s; load average after: {os.getloadavg()}")
    if splice_fingerprint() != source:
        print("WARNING: splice's sources changed during the run; the figures mix versions")
    results = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": machine_info(),
        "model_spec": SIZES[args.size],
        "model_mb": sum(os.path.getsize(f) for f in files["shards"]) / 3e6,
        "threads": args.threads,
        "splice_source": source,
        "summary": summary,
    }
    path = workdir / "sweep_bench.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _, _, kind, spec_json, report_path = sys.argv
        Path(report_path).write_text(json.dumps(CHILDREN[kind](json.loads(spec_json))))
        raise SystemExit(0)
    raise SystemExit(main())
