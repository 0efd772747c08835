"""Benchmark: merging at the speed of the storage, at the scale users have: three Llama-shaped bf16 checkpoints of
1.6 GB each in 5 shards (and the merge benchmark's fp32 case, 3 x 340 MB), from a warm page cache and from a cold one.

Inputs (built once under --workdir, reused while their spec is unchanged): `merge_vs_mergekit.build_models` with
hidden 2048, MLP 5632, 13 layers, 16 heads, vocab 32000, untied head: 800 M parameters, 1.60 GB in bf16 per model;
B and C are A plus small seeded noise. `--spec fp32`: merge_vs_mergekit's MODEL_SPEC (85 M parameters, fp32).

Cases, each in its own process through `merge_vs_mergekit`'s wrapper (wall time from fork to reaping, peak RSS,
CPU seconds):

  raw-floor          import torch; read every input tensor once (safe_open + get_tensor, as stored), write the
                     first model's tensors as the output's bytes (save_file): no arithmetic, no planning
  splice-soup        splice soup A B C --out X
  mergekit-linear    mergekit-yaml (linear, weights 1/3, dtype as stored) --lazy-unpickle
  splice-METHOD      splice merge METHOD.yml for METHOD in ties, dare_ties, della (base A; B and C at density 0.5,
                     weight 0.5) and slerp (A to B, t 0.5): the same config files mergekit runs
  mergekit-METHOD    mergekit-yaml METHOD.yml --lazy-unpickle
  splice-lora-apply  splice patch apply LORA --base A (a rank-16 LoRA on every attention and MLP matrix)
  splice-port        splice port LORA --to B --from A --out X (the LoRA made on A, ported onto B)

Modes: `warm` (one untimed run of the first case first fills the page cache) and `cold` (before every run each input file's pages are
dropped with posix_fadvise(DONTNEED) and `mincore` checks that none are left: benchmarks/pagecache.py). Reported per
case and mode: wall, GB/s of input read, the wall's ratio to the raw floor of the same mode and to mergekit's (the
same method), peak RSS and CPU seconds. `--profile` adds where the time of the soup and of ties goes, measured in
one process: the stream's reader, compute and writer threads, and inside compute the torch operations by kind.

Not run in CI. Usage:  .venv/bin/python benchmarks/throughput.py [--spec bf16|fp32] [--modes warm cold]
[--only splice-soup ...] [--profile] [--device cuda] (splice --device cuda, mergekit-yaml --cuda; results-cuda.json).
See benchmarks/README.md for the figures measured so far.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from merge_vs_mergekit import (  # noqa: E402
    MODEL_SPEC,
    Case,
    Run,
    _tool,
    build_models,
    machine_info,
    measure,
    prepare_workdir,
    splice_fingerprint,
    summarize,
)
from pagecache import evicted  # noqa: E402
from port_llama import save_lora  # noqa: E402

DEFAULT_WORKDIR = HERE / "_work" / "throughput"
BF16_SPEC = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 13,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
    "shards": 5,
    "init_std": 0.02,
    "finetune_delta_std": 0.001,
    "seeds": [0, 1, 2],
    "dtype": "bfloat16",
    "format_version": 2,
}
SPECS = {"bf16": BF16_SPEC, "fp32": MODEL_SPEC}
METHODS = {  # the configs splice merge and mergekit-yaml both run: what each model of A, B, C gives
    "ties": {"B": {"density": 0.5, "weight": 0.5}, "C": {"density": 0.5, "weight": 0.5}},
    "dare_ties": {"B": {"density": 0.5, "weight": 0.5}, "C": {"density": 0.5, "weight": 0.5}},
    "della": {
        "B": {"density": 0.5, "weight": 0.5, "epsilon": 0.1},
        "C": {"density": 0.5, "weight": 0.5, "epsilon": 0.1},
    },
    "slerp": {"B": {}},
}

RAW_FLOOR_SCRIPT = r"""
import json, os, shutil, sys
from safetensors import safe_open
from safetensors.torch import save_file

*models, out = sys.argv[1:]
INDEX = "model.safetensors.index.json"
maps = [json.load(open(os.path.join(m, INDEX)))["weight_map"] for m in models]
by_shard = {}
for name, shard in maps[0].items():
    by_shard.setdefault(shard, []).append(name)
os.makedirs(out)
for shard in sorted(by_shard):
    first = by_shard[shard][0]
    handles = [safe_open(os.path.join(m, w[first]), framework="pt", device="cpu") for m, w in zip(models, maps)]
    tensors = {}
    for name in by_shard[shard]:
        tensors[name] = handles[0].get_tensor(name)
        for other in handles[1:]:
            other.get_tensor(name)  # read once, as a merge must; nothing computed
    save_file(tensors, os.path.join(out, shard), metadata={"format": "pt"})
    del tensors, handles
total = sum(os.path.getsize(os.path.join(out, s)) for s in by_shard)
json.dump({"metadata": {"total_size": total}, "weight_map": maps[0]}, open(os.path.join(out, INDEX), "w"))
shutil.copy(os.path.join(models[0], "config.json"), out)
"""


def input_files(models: list[Path]) -> list[Path]:
    return [path for model in models for path in sorted(model.glob("*.safetensors"))]


def write_config(workdir: Path, models: list[Path], method: str, dtype: str) -> Path:
    """A mergekit config file for `method` over A, B, C (linear: weights 1/3; the others as METHODS says)."""
    config = workdir / f"{method}-{dtype}.yml"
    a, *others = models
    if method == "linear":
        listed = "".join(f"  - model: {m}\n    parameters:\n      weight: {1 / 3!r}\n" for m in models)
        config.write_text(f"merge_method: linear\nmodels:\n{listed}dtype: {dtype}\n")
        return config
    if method == "slerp":
        config.write_text(
            f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {others[0]}\n"
            f"parameters:\n  t: 0.5\ndtype: {dtype}\n"
        )
        return config
    listed = f"  - model: {a}\n"
    for model, parameters in zip(others, METHODS[method].values()):
        listed += f"  - model: {model}\n    parameters:\n"
        listed += "".join(f"      {key}: {value}\n" for key, value in parameters.items())
    config.write_text(f"merge_method: {method}\nbase_model: {a}\nmodels:\n{listed}dtype: {dtype}\n")
    return config


def build_cases(workdir: Path, models: list[Path], device: str, dtype: str) -> list[Case]:
    outs = workdir / "outputs"
    outs.mkdir(exist_ok=True)
    floor = workdir / "raw_floor.py"
    floor.write_text(RAW_FLOOR_SCRIPT)
    splice = [_tool("splice")]
    on_device = ["--quiet", "--force", "--device", device]
    mergekit_flags = ["--lazy-unpickle", "--quiet", *(["--cuda"] if device == "cuda" else [])]
    a, b, _ = models
    cases = [
        Case(
            "raw-floor",
            [sys.executable, str(floor), *map(str, models), str(outs / "raw-floor")],
            outs / "raw-floor",
            "read A, B, C once + write A's bytes",
        ),
        Case(
            "splice-soup",
            [*splice, "soup", *map(str, models), "--out", str(outs / "splice-soup"), *on_device],
            outs / "splice-soup",
            "uniform soup of A, B, C",
        ),
        Case(
            "mergekit-linear",
            [_tool("mergekit-yaml"), str(write_config(workdir, models, "linear", dtype)), str(outs / "mergekit-linear")]
            + mergekit_flags,
            outs / "mergekit-linear",
            f"linear, weights 1/3, {dtype}",
        ),
    ]
    for method in METHODS:
        config = str(write_config(workdir, models, method, dtype))
        cases.append(
            Case(
                f"splice-{method}",
                [*splice, "merge", config, "--out", str(outs / f"splice-{method}"), *on_device],
                outs / f"splice-{method}",
                f"{method} ({config})",
            )
        )
        cases.append(
            Case(
                f"mergekit-{method}",
                [_tool("mergekit-yaml"), config, str(outs / f"mergekit-{method}"), *mergekit_flags],
                outs / f"mergekit-{method}",
                f"{method} ({config})",
            )
        )
    lora = workdir / "lora-patch"
    if not lora.is_dir() or lora.stat().st_mtime < (a / "config.json").stat().st_mtime:  # made for these models
        save_lora(a, workdir / "lora-registry", lora)
    cases += [
        Case(
            "splice-lora-apply",
            [*splice, "patch", "apply", str(lora), "--base", str(a), "--out", str(outs / "lora-apply"), *on_device],
            outs / "lora-apply",
            "rank-16 LoRA on every attention and MLP matrix of A",
        ),
        Case(
            "splice-port",
            [*splice, "port", str(lora), "--to", str(b), "--from", str(a), "--out", str(outs / "port"), *on_device],
            outs / "port",
            "the LoRA made on A, ported onto B",
        ),
    ]
    return cases


def reference_for(name: str) -> str | None:
    """The mergekit case a splice case is compared with."""
    if name == "splice-soup":
        return "mergekit-linear"
    method = name.removeprefix("splice-")
    return f"mergekit-{method}" if method in METHODS else None


def run_mode(mode: str, cases: list[Case], files: list[Path], workdir: Path, env: dict, repeats: int) -> list[Run]:
    runs = []
    if mode == "warm":  # untimed: the first case (the raw floor reads every input byte) fills the page cache
        runs.append(measure(cases[0], -1, workdir, env))
    for index in range(repeats):
        for case in cases:
            if mode == "cold":
                evicted(files)
            run = measure(case, index, workdir, env)
            runs.append(run)
            print(
                f"  [{mode}] {case.name:<16} {run.wall_s:7.2f} s  peak RSS {run.peak_rss_mb:6.0f} MB  "
                f"cpu {run.cpu_s:6.1f} s  other load {run.other_load or 0:.2f}",
                flush=True,
            )
    return runs


def gpu_name() -> str:
    """The GPU `--device cuda` runs on; the benchmark stops here when there is none (splice would refuse later)."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to torch on this machine")
    return torch.cuda.get_device_name()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--spec", choices=sorted(SPECS), default="bf16", help="bf16: 3 x 1.6 GB; fp32: 3 x 340 MB")
    parser.add_argument("--modes", nargs="+", default=["warm", "cold"], choices=["warm", "cold"])
    parser.add_argument("--only", nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="where splice computes (`splice --device`) and whether mergekit-yaml gets --cuda; the raw floor reads "
        "and writes on the host either way",
    )
    parser.add_argument("--profile", action="store_true", help="where the soup's and ties' time goes (one process)")
    args = parser.parse_args(argv)
    gpu = gpu_name() if args.device == "cuda" else None
    workdir = args.workdir.resolve() / args.spec
    prepare_workdir(workdir)
    spec = SPECS[args.spec]
    models = build_models(workdir / "models", spec=spec)
    files = input_files(models)
    read_gb = sum(path.stat().st_size for path in files) / 1e9
    dtype = "bfloat16" if spec.get("dtype") == "bfloat16" else "float32"
    cases = [c for c in build_cases(workdir, models, args.device, dtype) if not args.only or c.name in args.only]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    results: dict[str, dict] = {}
    for mode in args.modes:
        runs = run_mode(mode, cases, files, workdir, env, args.repeats)
        rows = results[mode] = summarize(runs, [case.name for case in cases])
        for name, row in rows.items():
            row["read_gb_per_s"] = read_gb / row["wall_s"]
            for reference in ("raw-floor", reference_for(name)):
                if reference in rows and reference != name:
                    row[f"wall / {reference}"] = row["wall_s"] / rows[reference]["wall_s"]
    result = {
        "machine": machine_info(),
        "splice_source": splice_fingerprint(),
        "input_gb": read_gb,
        "spec": spec,
        "device": args.device,
        "gpu": gpu,
        "modes": results,
    }
    if args.profile:
        from throughput_profile import profile_runs

        result["profile"] = profile_runs(models, workdir, write_config(workdir, models, "ties", dtype))
    path = workdir / f"results-{args.device}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\ninputs: 3 x {read_gb / 3:.2f} GB {dtype}, {len(files)} shard files, device {args.device} {gpu or ''}")
    for mode, rows in results.items():
        for name, row in rows.items():
            ratios = "  ".join(f"{k} {v:.2f}" for k, v in row.items() if k.startswith("wall / "))
            print(
                f"{mode:<5} {name:<18} {row['wall_s']:7.2f} s  {row['read_gb_per_s']:5.2f} GB/s  "
                f"RSS {row['peak_rss_mb']:6.0f} MB  cpu {row['cpu_s']:6.1f} s  {ratios}"
            )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
