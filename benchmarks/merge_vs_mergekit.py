"""Benchmark: splice vs mergekit on three Llama-shaped fp32 checkpoints (~340 MB each, 4 shards).

Measured, each run in its own subprocess (wall time and peak RSS per run):

  splice-soup      splice soup A B C --out X --quiet --force
  mergekit-linear  mergekit-yaml linear.yml X --lazy-unpickle --quiet   (weights 1/3 each, float32)
  mergekit-ties    mergekit-yaml ties.yml X --lazy-unpickle --quiet     (base A; B, C density 0.5 weight 0.5)
  splice-ties      splice merge ties.yml --out X --quiet --force        (the same mergekit config)
  io-floor         read every tensor of A, B and C with safe_open().get_tensor, write A+B+C with save_file

plus two import baselines (`import torch`, `import torch, transformers`). One warm-up run of each
case comes first (it also fills the page cache with the inputs), then `--repeats` interleaved rounds;
medians are reported. Afterwards splice's outputs are compared with mergekit's.

Not run in CI. Usage:  .venv/bin/python benchmarks/merge_vs_mergekit.py [--repeats 3] [--device cuda]
See benchmarks/README.md for the methodology and the figures measured so far.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_WORKDIR = HERE / "_work"

# Model shape: hidden 1024, 4 layers, vocab 16384, intermediate 2816, untied lm_head:
# 84.9 M parameters = 340 MB in fp32 per model.
MODEL_SPEC = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 4,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 16384,
    "tie_word_embeddings": False,
    "shards": 4,
    "init_std": 0.02,
    "finetune_delta_std": 0.001,
    "seeds": [0, 1, 2],
    "format_version": 2,
}
MODEL_NAMES = ["model_a", "model_b", "model_c"]

TARGETS = [
    # (key, numerator case, denominator case, metric, target)
    ("soup wall / mergekit linear wall", "splice-soup", "mergekit-linear", "wall_s", 0.8),
    ("soup peak RSS / mergekit linear peak RSS", "splice-soup", "mergekit-linear", "peak_rss_mb", 0.6),
    ("soup wall / I/O floor wall", "splice-soup", "io-floor", "wall_s", 1.3),
    ("splice ties wall / mergekit ties wall", "splice-ties", "mergekit-ties", "wall_s", 0.5),
]

# The start-up baseline of each case: its command with nothing to do. "wall - start-up" estimates the
# time spent merging; it is information, not a target (start-up is part of what a user waits for).
STARTUP_OF = {
    # `splice --help` no longer imports torch (the API is resolved lazily): a merge's start-up is the CLI plus
    # the engine's imports
    "splice-soup": "splice start-up",
    "splice-ties": "splice start-up",
    "mergekit-linear": "mergekit-yaml --help",
    "mergekit-ties": "mergekit-yaml --help",
    "io-floor": "import torch",
}

VERIFY_TOLERANCE = 1e-6
TIES_DENSITY = 0.5
TIES_WEIGHT = 0.5

# The I/O floor: the least a merge of three models into one can do. Every input tensor is read with
# safetensors (safe_open + get_tensor, as a plain script would), summed in place into the first
# model's tensor, and each output shard is written with save_file. No framework, no planning.
IO_FLOOR_SCRIPT = r"""
import json, os, shutil, sys
from safetensors import safe_open
from safetensors.torch import save_file

*models, out = sys.argv[1:]
INDEX = "model.safetensors.index.json"
maps = [json.load(open(os.path.join(m, INDEX)))["weight_map"] for m in models]
handles = {}

def handle(model, shard):
    key = (model, shard)
    if key not in handles:
        handles[key] = safe_open(os.path.join(model, shard), framework="pt", device="cpu")
    return handles[key]

by_shard = {}
for name, shard in maps[0].items():
    by_shard.setdefault(shard, []).append(name)
os.makedirs(out)
for shard in sorted(by_shard):
    tensors = {}
    for name in by_shard[shard]:
        acc = handle(models[0], shard).get_tensor(name)
        for model, weight_map in zip(models[1:], maps[1:]):
            acc += handle(model, weight_map[name]).get_tensor(name)
        tensors[name] = acc
    save_file(tensors, os.path.join(out, shard), metadata={"format": "pt"})
    del tensors
total = sum(os.path.getsize(os.path.join(out, s)) for s in by_shard)
json.dump({"metadata": {"total_size": total}, "weight_map": maps[0]}, open(os.path.join(out, INDEX), "w"))
shutil.copy(os.path.join(models[0], "config.json"), out)
"""


# --------------------------------------------------------------------------------------------------
# Building the input models
# --------------------------------------------------------------------------------------------------


def build_models(models_dir: Path, rebuild: bool = False, spec: dict = MODEL_SPEC) -> list[Path]:
    """Three valid HF Llama model dirs of shape `spec`: A random, B and C = A + small random 'fine-tune' deltas."""
    paths = [models_dir / name for name in MODEL_NAMES]
    stamp = models_dir / "spec.json"
    if (
        not rebuild
        and stamp.is_file()
        and json.loads(stamp.read_text()) == spec
        and all((p / "model.safetensors.index.json").is_file() for p in paths)
    ):
        print(f"models: reusing {models_dir}")
        return paths

    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    started = time.perf_counter()
    shutil.rmtree(models_dir, ignore_errors=True)
    models_dir.mkdir(parents=True)
    config = LlamaConfig(
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_key_value_heads"],
        vocab_size=spec["vocab_size"],
        tie_word_embeddings=spec["tie_word_embeddings"],
        max_position_embeddings=2048,
    )
    dtype = getattr(torch, spec.get("dtype", "float32"))  # the stored dtype (generated in fp32, then cast)
    config.dtype = spec.get("dtype", "float32")
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):  # names and shapes only, in HF's storage order; no memory allocated
        layout = [(name, tuple(t.shape)) for name, t in LlamaForCausalLM(config).state_dict().items()]

    # Split the tensors (in order) into `shards` shards of roughly equal bytes.
    sizes = [dtype.itemsize * int(torch.Size(shape).numel()) for _, shape in layout]
    total = sum(sizes)
    shard_of, used, current = [], 0, 0
    for size in sizes:
        if used >= (current + 1) * total / spec["shards"] and current < spec["shards"] - 1:
            current += 1
        shard_of.append(current)
        used += size
    count = max(shard_of) + 1
    files = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]

    base_gen = torch.Generator().manual_seed(spec["seeds"][0])
    delta_gens = [torch.Generator().manual_seed(s) for s in spec["seeds"][1:]]
    for path in paths:
        path.mkdir()
        config.save_pretrained(path)
    for shard in range(count):
        base = {}
        for (name, shape), where in zip(layout, shard_of):
            if where != shard:
                continue
            if len(shape) == 1:  # RMSNorm weights
                base[name] = torch.ones(shape) + spec["init_std"] * torch.randn(shape, generator=base_gen)
            else:
                base[name] = spec["init_std"] * torch.randn(shape, generator=base_gen)
        save_file({n: t.to(dtype) for n, t in base.items()}, paths[0] / files[shard], metadata={"format": "pt"})
        for path, gen in zip(paths[1:], delta_gens):
            std = spec["finetune_delta_std"]
            tuned = {n: (t + std * torch.randn(t.shape, generator=gen)).to(dtype) for n, t in base.items()}
            save_file(tuned, path / files[shard], metadata={"format": "pt"})
            del tuned
        del base
    weight_map = {name: files[where] for (name, _), where in zip(layout, shard_of)}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    for path in paths:
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    stamp.write_text(json.dumps(spec))
    print(
        f"models: built 3 x {total / 1e6:.0f} MB ({len(layout)} tensors, {count} shards) "
        f"in {time.perf_counter() - started:.1f}s under {models_dir}"
    )
    return paths


def write_configs(workdir: Path, models: list[Path]) -> tuple[Path, Path]:
    a, b, c = (str(p) for p in models)
    linear = workdir / "linear.yml"
    linear.write_text(
        "merge_method: linear\n"
        "models:\n"
        + "".join(f"  - model: {m}\n    parameters:\n      weight: {1 / 3!r}\n" for m in (a, b, c))
        + "dtype: float32\n"
    )
    ties = workdir / "ties.yml"
    ties.write_text(
        "merge_method: ties\n"
        f"base_model: {a}\n"
        "models:\n"
        + "".join(
            f"  - model: {m}\n    parameters:\n      density: {TIES_DENSITY}\n      weight: {TIES_WEIGHT}\n"
            for m in (b, c)
        )
        + "dtype: float32\n"
    )
    return linear, ties


# --------------------------------------------------------------------------------------------------
# Measuring one subprocess
# --------------------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    argv: list[str]
    out: Path | None  # output directory, deleted before each run
    what: str


@dataclass
class Run:
    case: str
    round: int  # -1: warm-up
    wall_s: float  # fork to reaping, timed by the wrapper (its own start-up excluded)
    peak_rss_mb: float  # ru_maxrss of the child (kernel high-water mark of resident memory)
    peak_anon_mb: float | None  # sampled peak of RssAnon (heap, not file-backed pages)
    cpu_s: float  # user + system CPU time of the child
    returncode: int
    busy_before: float | None = None  # CPU cores busy on the machine just before the run (quiet gate)
    other_load: float | None = None  # CPU cores used by other processes during the run, on average
    splice_source: str | None = None  # fingerprint of splice's source files when the run started


def splice_fingerprint() -> str:
    """A hash of splice's source files: the tree is edited while benchmarks run, so every run records it."""
    import hashlib

    digest = hashlib.sha1()
    for path in sorted((REPO / "splice").rglob("*.py")):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_busy_seconds() -> float | None:
    """Machine-wide busy CPU seconds since boot (all cores), from /proc/stat; None off Linux."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


def busy_cores(interval: float = 1.0) -> float | None:
    before = cpu_busy_seconds()
    if before is None:
        return None
    time.sleep(interval)
    return (cpu_busy_seconds() - before) / interval


def wait_for_quiet(max_wait: float, threshold: float) -> float | None:
    """Wait (at most max_wait s) until other processes use under `threshold` cores; the last reading."""
    deadline = time.monotonic() + max_wait
    while True:
        busy = busy_cores()
        if busy is None or busy < threshold or time.monotonic() >= deadline:
            return busy


# The driver cannot read a child's peak RSS from its own wait4(): Linux carries the memory high-water
# mark of the process image replaced by exec() into ru_maxrss, and Python's subprocess starts children
# with vfork, so every child would report at least this (torch-importing) driver's own peak. So each
# run goes through this stdlib-only wrapper (a ~10 MB `python -I -S` process): it forks, execs the
# command, samples the child's /proc status every 10 ms, and reports the child's wait4() rusage.
MEASURE_SCRIPT = r"""
import json, os, resource, sys, threading, time

report, argv = sys.argv[1], sys.argv[2:]
peaks = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}
done = threading.Event()
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)

def sample():
    while not done.is_set():
        try:
            with open(f"/proc/{pid}/status") as handle:
                for line in handle:
                    key, _, value = line.partition(":")
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(value.split()[0]))
        except (OSError, ValueError, IndexError):
            pass
        done.wait(0.01)

sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - started
done.set()
sampler.join()
own = resource.getrusage(resource.RUSAGE_SELF)
with open(report, "w") as handle:
    json.dump({"wall_s": wall, "maxrss_kb": usage.ru_maxrss, "utime": usage.ru_utime, "stime": usage.ru_stime,
               "exit": os.waitstatus_to_exitcode(status), "sampled_kb": peaks,
               "wrapper_cpu_s": own.ru_utime + own.ru_stime}, handle)
"""


def prepare_workdir(workdir: Path) -> None:
    """`workdir` with what `measure` runs its cases through: the logs directory and the wrapper script."""
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    (workdir / "measure_child.py").write_text(MEASURE_SCRIPT)


def measure(
    case: Case,
    round_index: int,
    workdir: Path,
    env: dict[str, str],
    quiet_wait: float = 0.0,
    quiet_threshold: float = 0.25,
) -> Run:
    """Run the case once in a fresh child: wall time, peak RSS and CPU time of that child alone."""
    if case.out is not None:
        shutil.rmtree(case.out, ignore_errors=True)
    os.sync()  # no dirty pages from the previous run's output are left to be written back during this one
    busy_before = wait_for_quiet(quiet_wait, quiet_threshold) if quiet_wait > 0 else None
    tag = "warmup" if round_index < 0 else f"round{round_index}"
    log = workdir / "logs" / f"{case.name.replace(' ', '_').replace(',', '')}.{tag}.log"
    report = workdir / "logs" / "last_measurement.json"
    report.unlink(missing_ok=True)
    wrapper = [sys.executable, "-I", "-S", str(workdir / "measure_child.py"), str(report)]
    source = splice_fingerprint()
    machine_before = cpu_busy_seconds()
    with open(log, "wb") as out:
        returncode = subprocess.run(
            wrapper + case.argv, check=False, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO
        ).returncode
    machine_after = cpu_busy_seconds()
    if returncode != 0 or not report.is_file():
        raise SystemExit(f"measuring {case.name} failed (wrapper exit {returncode}); log {log}")
    measured = json.loads(report.read_text())
    cpu = measured["utime"] + measured["stime"]
    other = None
    if machine_before is not None and machine_after is not None:
        # Everything busy on the machine meanwhile, less the child and the wrapper (its start-up included).
        other = max(0.0, machine_after - machine_before - cpu - measured["wrapper_cpu_s"] - 0.05)
        other /= max(measured["wall_s"], 1e-3)
    run = Run(
        case.name,
        round_index,
        measured["wall_s"],
        measured["maxrss_kb"] / 1024,
        measured["sampled_kb"]["RssAnon"] / 1024 or None,
        cpu,
        measured["exit"],
        busy_before,
        other,
        source,
    )
    if run.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{case.name} failed with exit code {run.returncode}; log {log}:\n{tail}")
    return run


# --------------------------------------------------------------------------------------------------
# Comparing outputs
# --------------------------------------------------------------------------------------------------


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    from safetensors import safe_open

    where = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # safe_open handles are not iterable
                where[name] = path
    return where


def compare(left: Path, right: Path, tolerance: float = VERIFY_TOLERANCE) -> dict:
    """Max |left - right| over every tensor (matched by name; shard layouts may differ)."""
    import torch
    from safetensors import safe_open

    lmap, rmap = _tensor_files(left), _tensor_files(right)
    if set(lmap) != set(rmap):
        only_left, only_right = sorted(set(lmap) - set(rmap)), sorted(set(rmap) - set(lmap))
        return {
            "ok": False,
            "error": f"tensor names differ: only in {left.name}: {only_left[:3]}, "
            f"only in {right.name}: {only_right[:3]}",
        }
    max_diff, worst, over, elements, exact, over_tensors = 0.0, None, 0, 0, True, []
    handles: dict[Path, object] = {}

    def get(path: Path, name: str) -> torch.Tensor:
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")
        return handles[path].get_tensor(name)

    for name in lmap:
        a, b = get(lmap[name], name), get(rmap[name], name)
        if a.shape != b.shape or a.dtype != b.dtype:
            return {"ok": False, "error": f"{name}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"}
        diff = (a.double() - b.double()).abs()
        elements += diff.numel()
        count = int((diff > tolerance).sum())
        over += count
        if count:
            over_tensors.append(name)
        exact = exact and bool(torch.equal(a, b))
        value = float(diff.max()) if diff.numel() else 0.0
        if value > max_diff:
            max_diff, worst = value, name
    return {
        "ok": max_diff <= tolerance,
        "max_abs_diff": max_diff,
        "worst_tensor": worst,
        "bit_exact": exact,
        "elements_over_tolerance": over,
        "elements": elements,
        "tolerance": tolerance,
        "tensors": len(lmap),
        "tensors_over_tolerance": over_tensors,
    }


def explain_by_threshold_ties(
    left: Path,
    right: Path,
    base: Path,
    others: list[Path],
    density: float,
    names: list[str],
    tolerance: float = VERIFY_TOLERANCE,
) -> dict:
    """TIES keeps the k = int(density * n) largest |delta| entries of each delta. When several entries tie at
    the k-th magnitude, which of them survive is arbitrary (mergekit: argsort order; splice: its own rule).
    Count the differing elements that sit at such a tie (|delta_i| equal to the k-th largest magnitude of
    model i's delta, with more than k entries at or above it): those differences are tie-break choices."""
    import torch
    from safetensors import safe_open

    maps = {d: _tensor_files(d) for d in (left, right, base, *others)}
    explained = unexplained = 0
    for name in names:

        def get(directory: Path, tensor: str = name) -> torch.Tensor:
            with safe_open(str(maps[directory][tensor]), framework="pt") as handle:
                return handle.get_tensor(tensor)

        differs = ((get(left).double() - get(right).double()).abs() > tolerance).reshape(-1)
        at_tie = torch.zeros_like(differs)
        base_tensor = get(base)
        for other in others:
            magnitude = (get(other) - base_tensor).abs().reshape(-1)
            count = magnitude.numel()
            k = max(1, int(density * count))
            threshold = magnitude.kthvalue(count - k + 1).values
            if int((magnitude >= threshold).sum()) > k:
                at_tie |= magnitude == threshold
        explained += int((differs & at_tie).sum())
        unexplained += int((differs & ~at_tie).sum())
    return {"explained_by_ties": explained, "unexplained": unexplained}


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found next to {sys.executable} or on PATH")
    return found


def build_cases(args, workdir: Path, models: list[Path], linear: Path, ties: Path) -> list[Case]:
    outs = workdir / "outputs"
    outs.mkdir(exist_ok=True)
    py = sys.executable
    a, b, c = (str(m) for m in models)
    cuda = args.device == "cuda"
    mergekit = [_tool("mergekit-yaml")]
    mk_flags = ["--lazy-unpickle", "--quiet"] + (["--cuda"] if cuda else [])
    if args.splice_via == "cli":
        splice = [_tool("splice")]
        soup_argv = splice + [
            "soup",
            a,
            b,
            c,
            "--out",
            str(outs / "splice-soup"),
            "--quiet",
            "--force",
            "--device",
            args.device,
        ]
        ties_argv = splice + [
            "merge",
            str(ties),
            "--out",
            str(outs / "splice-ties"),
            "--quiet",
            "--force",
            "--device",
            args.device,
        ]
    else:  # the Python API, for comparison with the CLI's start-up cost
        api = "import sys, splice; splice."
        soup_code = api + "soup(sys.argv[1:4], sys.argv[4], device=sys.argv[5], force=True)"
        ties_code = api + "merge(sys.argv[1], sys.argv[2], device=sys.argv[3], force=True)"
        soup_argv = [py, "-c", soup_code, a, b, c, str(outs / "splice-soup"), args.device]
        ties_argv = [py, "-c", ties_code, str(ties), str(outs / "splice-ties"), args.device]
    floor_script = workdir / "io_floor.py"
    floor_script.write_text(IO_FLOOR_SCRIPT)
    return [
        Case("splice-soup", soup_argv, outs / "splice-soup", "uniform soup of A, B, C"),
        Case(
            "mergekit-linear",
            mergekit + [str(linear), str(outs / "mergekit-linear")] + mk_flags,
            outs / "mergekit-linear",
            "linear, weights 1/3",
        ),
        Case(
            "mergekit-ties",
            mergekit + [str(ties), str(outs / "mergekit-ties")] + mk_flags,
            outs / "mergekit-ties",
            "ties, base A, density 0.5, weight 0.5",
        ),
        Case("splice-ties", ties_argv, outs / "splice-ties", "the same ties config"),
        Case(
            "io-floor",
            [py, str(floor_script), a, b, c, str(outs / "io-floor")],
            outs / "io-floor",
            "read A, B, C + write A+B+C (safetensors)",
        ),
    ]


def baseline_cases() -> list[Case]:
    py = sys.executable
    return [
        Case("import torch", [py, "-c", "import torch"], None, "python -c 'import torch'"),
        Case(
            "import torch, transformers",
            [py, "-c", "import torch, transformers"],
            None,
            "python -c 'import torch, transformers'",
        ),
        Case("splice --help", [_tool("splice"), "--help"], None, "splice CLI start-up"),
        Case(
            "splice start-up",
            [py, "-c", "import splice.cli.app, splice.merge.recipe, splice.merge.soup"],
            None,
            "the splice CLI and the merge engines imported, nothing run",
        ),
        Case("mergekit-yaml --help", [_tool("mergekit-yaml"), "--help"], None, "mergekit CLI start-up"),
    ]


def summarize(runs: list[Run], names: list[str]) -> dict[str, dict]:
    summary = {}
    for name in names:
        timed = [r for r in runs if r.case == name and r.round >= 0]
        if not timed:
            continue
        walls = [r.wall_s for r in timed]
        anon = [r.peak_anon_mb for r in timed if r.peak_anon_mb is not None]
        summary[name] = {
            "runs": len(timed),
            "wall_s": statistics.median(walls),
            "wall_min_s": min(walls),
            "wall_max_s": max(walls),
            "peak_rss_mb": statistics.median(r.peak_rss_mb for r in timed),
            "peak_rss_max_mb": max(r.peak_rss_mb for r in timed),
            "peak_anon_mb": statistics.median(anon) if anon else None,
            "cpu_s": statistics.median(r.cpu_s for r in timed),
            "other_load": max((r.other_load for r in timed if r.other_load is not None), default=None),
        }
    return summary


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as handle:
            info["cpu_model"] = next(
                (ln.split(":", 1)[1].strip() for ln in handle if ln.startswith("model name")), None
            )
        with open("/proc/meminfo") as handle:
            info["mem_total_gb"] = round(int(handle.readline().split()[1]) / 1024**2, 1)
    except OSError:
        pass
    try:
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    for package in ("torch", "transformers", "safetensors", "mergekit", "splice"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = None
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = None
    return info


def print_report(
    summary: dict, baselines: dict, ratios: list[dict], verification: dict, args, models_mb: float
) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 140))
    table = Table(
        title=f"splice vs mergekit: 3 x {models_mb:.0f} MB fp32 Llama, device={args.device}, "
        f"median of {args.repeats} (warm page cache)"
    )
    for column in (
        "case",
        "wall s (median)",
        "wall min-max",
        "wall - start-up",
        "peak RSS MB",
        "peak anon MB",
        "CPU s",
        "other load",
    ):
        table.add_column(column, justify="left" if column == "case" else "right")
    for name, row in list(summary.items()) + list(baselines.items()):
        table.add_row(
            name,
            f"{row['wall_s']:.2f}",
            f"{row['wall_min_s']:.2f}-{row['wall_max_s']:.2f}",
            "-" if row.get("net_wall_s") is None else f"{row['net_wall_s']:.2f}",
            f"{row['peak_rss_mb']:.0f}",
            "-" if row["peak_anon_mb"] is None else f"{row['peak_anon_mb']:.0f}",
            f"{row['cpu_s']:.1f}",
            "-" if row["other_load"] is None else f"{row['other_load']:.2f}",
        )
    console.print(table)
    console.print(
        "other load: the most CPU cores other processes used, on average, during any timed run of "
        "the case (from /proc/stat); above ~0.2 the machine was shared and the times are inflated.\n"
        "wall - start-up: median wall less the median wall of the tool's start-up baseline "
        "(splice start-up, mergekit-yaml --help, import torch for the I/O floor): a rough estimate of the "
        "merge itself (start-up varies by about 0.5 s between runs)."
    )

    targets = Table(title="targets")
    for column in ("ratio", "value", "target", "met", "net of start-up (info)"):
        targets.add_column(column, justify="left" if column == "ratio" else "right")
    for ratio in ratios:
        met = ratio["met"]
        targets.add_row(
            ratio["name"],
            f"{ratio['value']:.2f}" if ratio["value"] is not None else "-",
            f"<= {ratio['target']}",
            "[green]yes[/]" if met else "[red]no[/]",
            "-" if ratio.get("net_value") is None else f"{ratio['net_value']:.2f}",
        )
    if ratios:
        console.print(targets)

    for label, result in verification.items():
        if "error" in result:
            console.print(f"[red]verify {label}: {result['error']}[/]")
            continue
        if result["ok"]:
            state = "[green]OK[/]"
        elif result.get("ok_up_to_tie_breaks"):
            state = (
                f"[yellow]OK up to tie-breaks[/]: all {result['explained_by_ties']} differing elements "
                "tie at the density threshold (|delta| equal to the k-th largest), where which entries "
                "survive is arbitrary"
            )
        else:
            state = "[red]MISMATCH[/]"
            if "unexplained" in result:
                state += f" ({result['unexplained']} differing elements not at a threshold tie)"
        console.print(
            f"verify {label}: max abs diff {result['max_abs_diff']:.3g} (worst {result['worst_tensor']}), "
            f"{result['elements_over_tolerance']} of {result['elements']} elements over "
            f"{result['tolerance']:g}, bit-exact {result['bit_exact']} -> {state}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="models, outputs, results")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up")
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="splice --device; cuda also passes --cuda to mergekit (the I/O floor stays on CPU)",
    )
    parser.add_argument(
        "--splice-via",
        choices=["cli", "api"],
        default="cli",
        help="run splice through its CLI (default) or `python -c 'splice.soup(...)'`",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="CASE",
        help="run only these cases (splice-soup mergekit-linear mergekit-ties splice-ties io-floor)",
    )
    parser.add_argument("--rebuild", action="store_true", help="rebuild the input models even if cached")
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up run of each case")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="before each run wait up to this many seconds for other processes to go quiet (0: off)",
    )
    parser.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.25,
        help="'quiet' means other processes use fewer CPU cores than this",
    )
    parser.add_argument("--no-verify", action="store_true", help="don't compare the outputs")
    args = parser.parse_args(argv)

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    models = build_models(workdir / "models", args.rebuild)
    models_mb = sum(p.stat().st_size for p in models[0].glob("*.safetensors")) / 1e6
    linear, ties = write_configs(workdir, models)
    cases = build_cases(args, workdir, models, linear, ties)
    if args.only:
        unknown = set(args.only) - {c.name for c in cases}
        if unknown:
            parser.error(f"unknown case(s) {sorted(unknown)}")
        cases = [c for c in cases if c.name in args.only]
    prepare_workdir(workdir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}

    runs: list[Run] = []
    started = time.perf_counter()

    def record(case: Case, round_index: int) -> None:
        run = measure(case, round_index, workdir, env, args.quiet_wait, args.quiet_threshold)
        runs.append(run)
        label = "warm-up" if round_index < 0 else f"round {round_index + 1}/{args.repeats}"
        print(
            f"  [{label}] {case.name:<28} {run.wall_s:7.2f} s  peak RSS {run.peak_rss_mb:7.0f} MB  "
            f"(anon {run.peak_anon_mb or 0:.0f} MB, CPU {run.cpu_s:.1f} s, "
            f"other load {run.other_load or 0:.2f})",
            flush=True,
        )

    baselines = baseline_cases()
    if not args.no_warmup:
        print("warm-up (fills the page cache with the inputs; not counted)")
        for case in baselines + cases:
            record(case, -1)
    for round_index in range(args.repeats):
        shift = round_index % len(cases)  # rotate the order so no case always follows the same one
        for case in baselines + cases[shift:] + cases[:shift]:
            record(case, round_index)
    print(f"all runs: {time.perf_counter() - started:.0f} s")
    sources = sorted({r.splice_source for r in runs if r.round >= 0})
    if len(sources) > 1:
        print(
            f"WARNING: splice's sources changed during the timed runs (fingerprints {', '.join(sources)}); "
            "the splice figures mix versions; rerun when the tree is stable."
        )

    summary = summarize(runs, [c.name for c in cases])
    baseline_summary = summarize(runs, [c.name for c in baselines])
    for name, row in summary.items():
        startup = baseline_summary.get(STARTUP_OF.get(name, ""))
        row["net_wall_s"] = row["wall_s"] - startup["wall_s"] if startup else None
    ratios = []
    for name, numerator, denominator, metric, target in TARGETS:
        if numerator in summary and denominator in summary:
            value = summary[numerator][metric] / summary[denominator][metric]
            net_value = None
            if metric == "wall_s" and summary[numerator]["net_wall_s"] and summary[denominator]["net_wall_s"]:
                net_value = summary[numerator]["net_wall_s"] / summary[denominator]["net_wall_s"]
            ratios.append(
                {
                    "name": name,
                    "value": value,
                    "target": target,
                    "met": value <= target,
                    "net_value": net_value,
                    "numerator": numerator,
                    "denominator": denominator,
                    "metric": metric,
                }
            )

    verification = {}
    names = {c.name for c in cases}
    if not args.no_verify:
        outs = workdir / "outputs"
        for label, left, right in [
            ("splice soup vs mergekit linear", "splice-soup", "mergekit-linear"),
            ("splice ties vs mergekit ties", "splice-ties", "mergekit-ties"),
        ]:
            if left in names and right in names:
                verification[label] = compare(outs / left, outs / right)
        ties_check = verification.get("splice ties vs mergekit ties")
        if ties_check and not ties_check["ok"] and "error" not in ties_check:
            ties_check.update(
                explain_by_threshold_ties(
                    outs / "splice-ties",
                    outs / "mergekit-ties",
                    models[0],
                    models[1:],
                    TIES_DENSITY,
                    ties_check["tensors_over_tolerance"],
                )
            )
            ties_check["ok_up_to_tie_breaks"] = ties_check["unexplained"] == 0

    print_report(summary, baseline_summary, ratios, verification, args, models_mb)
    results = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": machine_info(),
        "model_spec": MODEL_SPEC,
        "model_mb": models_mb,
        "device": args.device,
        "repeats": args.repeats,
        "splice_via": args.splice_via,
        "splice_source_fingerprints": sorted({r.splice_source for r in runs if r.round >= 0}),
        "cases": {c.name: {"argv": c.argv, "what": c.what} for c in baselines + cases},
        "summary": summary,
        "baselines": baseline_summary,
        "ratios": ratios,
        "verification": verification,
        "runs": [asdict(r) for r in runs],
    }
    path = workdir / f"results-{args.device}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"results: {path}")
    if len(sources) > 1:
        print("WARNING: splice's sources changed during the timed runs; its figures above mix versions.")
    return 0 if all(v.get("ok") or v.get("ok_up_to_tie_breaks") for v in verification.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
