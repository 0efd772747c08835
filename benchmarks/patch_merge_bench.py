"""Benchmark: a LoRA-to-LoRA merge of three rank-16 patches on a ~340 MB Llama vs merging the three patched models.

The base is the merge benchmark's Llama-shaped fp32 model A (340 MB, 4 shards). Three LoRA patches made on it,
each rank 16 on all 28 attention and MLP matrices (seeded factors, alpha = rank, 5 MB each), saved as patch
directories with their base fingerprint. The full route materialises each patched model (`splice patch apply`,
340 MB each) and merges the three with `splice merge`; the patch route merges the patches with `splice patch
merge`. Every case is its own process (CLI, end to end, `--device cpu`), measured by the merge benchmark's
wrapper (wall time, peak RSS), `--repeats` rounds back to back (the inputs were just written: the page cache is
warm; `--warmup` adds an untimed round first):

  patch-linear     splice patch merge L1 L2 L3 --method linear             (factors concatenated: exact, rank 48)
  patch-ta-r16     splice patch merge ... --method task_arithmetic --rank 16   (re-factored from the factors: QR)
  patch-ties-r16   splice patch merge ... --method ties --density 0.5 --rank 16  (each change formed, TIES, SVD)
  full-linear      splice merge linear.yml: the three patched models, weights 1/3 each
  full-ties        splice merge ties.yml: base A, the three patched models, density 0.5, weight 1 each
  materialise      splice patch apply L1 --base A: what the full route pays three times before it merges

Checks: the linear patch applied to A equals full-linear's output; for every matrix of the TIES patch,
||full-ties change - B A||_F / ||full-ties change||_F equals sqrt(1 - the captured energy the patch reports).
Usage: .venv/bin/python benchmarks/patch_merge_bench.py [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from merge_vs_mergekit import REPO, Case, build_models, machine_info, measure, prepare_workdir  # noqa: E402

DEFAULT_WORKDIR = HERE / "_work"
RANK = 16
SEEDS = (11, 12, 13)
DENSITY = 0.5


def build_patches(base_dir: Path, out_dir: Path) -> list[Path]:
    """Three rank-16 LoRA patches on every attention and MLP matrix of `base_dir`, as patch directories."""
    import torch

    from splice.adapters.fingerprint import fingerprint_base
    from splice.adapters.patch import Patch, PatchMeta
    from splice.tensors.checkpoint import Checkpoint

    base = Checkpoint.open(base_dir)
    matrices = [n for n, info in base.tensors.items() if ".layers." in n and len(info.shape) == 2]
    fingerprint = fingerprint_base(base, matrices)
    paths = []
    for seed in SEEDS:
        generator = torch.Generator().manual_seed(seed)
        tensors, rank, alpha = {}, {}, {}
        for name in matrices:
            module = name.removesuffix(".weight")
            rows, cols = base.tensors[name].shape
            tensors[f"{module}.lora_A"] = torch.randn(RANK, cols, generator=generator) / cols**0.5
            tensors[f"{module}.lora_B"] = 0.01 * torch.randn(rows, RANK, generator=generator)
            rank[module], alpha[module] = RANK, float(RANK)
        meta = PatchMeta(
            kind="lora",
            targets=sorted(rank),
            base=fingerprint,
            lineage=[str(base_dir), f"benchmark LoRA, seed {seed}"],
            settings={"rslora": False, "rank": rank, "alpha": alpha},
        )
        paths.append(Patch(tensors, meta).save(out_dir / f"lora-{seed}", force=True))
    print(f"patches: 3 x rank {RANK} on {len(matrices)} matrices ({_size(paths[0]) / 1e6:.1f} MB each)")
    return paths


def _size(directory: Path) -> int:
    return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())


def write_recipes(workdir: Path, base: Path, models: list[Path]) -> tuple[Path, Path]:
    linear, ties = workdir / "patch-merge-linear.yml", workdir / "patch-merge-ties.yml"
    linear.write_text(
        "merge_method: linear\nmodels:\n"
        + "".join(f"  - model: {m}\n    parameters: {{weight: 1.0}}\n" for m in models)
        + "dtype: float32\n"
    )
    ties.write_text(
        f"merge_method: ties\nbase_model: {base}\nmodels:\n"
        + "".join(f"  - model: {m}\n    parameters: {{weight: 1.0, density: {DENSITY}}}\n" for m in models)
        + "dtype: float32\n"
    )
    return linear, ties


def check_outputs(base_dir: Path, outs: dict[str, Path]) -> dict:
    """linear: the merged patch applied vs the full merge; ties: each matrix's error vs its reported energy."""
    import torch

    from splice.adapters.apply import patched_state
    from splice.adapters.patch import Patch
    from splice.tensors.checkpoint import Checkpoint

    applied = patched_state([outs["patch-linear"]], base_dir, run=None)
    full = Checkpoint.open(outs["full-linear"])
    linear_diff = max(float((applied[n] - full.read(n)).abs().max()) for n in applied)
    patch = Patch.load(outs["patch-ties-r16"])
    base, ties = Checkpoint.open(base_dir), Checkpoint.open(outs["full-ties"])
    worst, energies = 0.0, []
    for module, captured in patch.meta.settings["captured_energy"].items():
        name = f"{module}.weight"
        change = ties.read(name).double() - base.read(name).double()
        product = patch.tensors[f"{module}.lora_B"].double() @ patch.tensors[f"{module}.lora_A"].double()
        measured = float(torch.linalg.matrix_norm(change - product) / torch.linalg.matrix_norm(change))
        worst = max(worst, abs(measured - math.sqrt(1 - captured)))
        energies.append(captured)
    return {
        "linear_max_abs_diff": linear_diff,
        "ties_relative_error_vs_reported_max_diff": worst,
        "ties_captured_energy_min": min(energies),
        "ties_captured_energy_median": statistics.median(energies),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quiet-wait", type=float, default=10.0)
    parser.add_argument(
        "--warmup", action="store_true", help="run every case once untimed first (the page cache is warm without it)"
    )
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    prepare_workdir(workdir)
    base_dir = build_models(workdir / "models")[0]
    area = workdir / "patch-merge"
    patches = build_patches(base_dir, area)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    splice = [sys.executable, "-m", "splice"]
    tail = ["--device", "cpu", "--quiet", "--force"]
    models = []
    started = time.perf_counter()
    for patch in patches:  # the full route's inputs (timed again below as the `materialise` case)
        models.append(area / f"patched-{patch.name}")
        measure(
            Case(
                "setup",
                [*splice, "patch", "apply", str(patch), "--base", str(base_dir), "--out", str(models[-1]), *tail],
                None,
                "",
            ),
            -1,
            workdir,
            env,
        )
    print(f"patched models: 3 x {_size(models[0]) / 1e6:.0f} MB in {time.perf_counter() - started:.1f} s")
    linear, ties = write_recipes(area, base_dir, models)
    outs = {
        name: area / f"out-{name}"
        for name in ("patch-linear", "patch-ta-r16", "patch-ties-r16", "full-linear", "full-ties", "materialise")
    }
    merge = [*splice, "patch", "merge", *map(str, patches)]
    cases = [
        Case(
            "patch-linear",
            [*merge, "--method", "linear", "--out", str(outs["patch-linear"]), *tail],
            outs["patch-linear"],
            "",
        ),
        Case(
            "patch-ta-r16",
            [*merge, "--method", "task_arithmetic", "--rank", str(RANK), "--out", str(outs["patch-ta-r16"]), *tail],
            outs["patch-ta-r16"],
            "",
        ),
        Case(
            "patch-ties-r16",
            [
                *merge,
                "--method",
                "ties",
                "--density",
                str(DENSITY),
                "--rank",
                str(RANK),
                "--out",
                str(outs["patch-ties-r16"]),
                *tail,
            ],
            outs["patch-ties-r16"],
            "",
        ),
        Case(
            "full-linear",
            [*splice, "merge", str(linear), "--out", str(outs["full-linear"]), *tail],
            outs["full-linear"],
            "",
        ),
        Case("full-ties", [*splice, "merge", str(ties), "--out", str(outs["full-ties"]), *tail], outs["full-ties"], ""),
        Case(
            "materialise",
            [
                *splice,
                "patch",
                "apply",
                str(patches[0]),
                "--base",
                str(base_dir),
                "--out",
                str(outs["materialise"]),
                *tail,
            ],
            outs["materialise"],
            "",
        ),
    ]
    runs: dict[str, list] = {case.name: [] for case in cases}
    for round_index in range(-1 if args.warmup else 0, args.repeats):
        for case in cases:
            run = measure(case, round_index, workdir, env, args.quiet_wait, 0.25)
            label = "warm-up" if round_index < 0 else f"round {round_index + 1}"
            load = f"{run.other_load:.2f}" if run.other_load is not None else "?"
            print(
                f"  [{label}] {case.name:<15} {run.wall_s:6.2f} s  peak RSS {run.peak_rss_mb:6.0f} MB  "
                f"other load {load}",
                flush=True,
            )
            if round_index >= 0:
                runs[case.name].append(run)
    wall = {name: statistics.median(r.wall_s for r in rs) for name, rs in runs.items()}
    rss = {name: statistics.median(r.peak_rss_mb for r in rs) for name, rs in runs.items()}
    size = {name: _size(out) for name, out in outs.items()}
    checks = check_outputs(base_dir, outs)
    full_route = {name: wall[name] + 3 * wall["materialise"] for name in ("full-linear", "full-ties")}
    ratios = {
        "linear: patch merge / full merge, wall": wall["patch-linear"] / wall["full-linear"],
        "linear: patch merge / full merge, peak RSS": rss["patch-linear"] / rss["full-linear"],
        "linear: patch merge / full merge, output size": size["patch-linear"] / size["full-linear"],
        "linear: patch merge / (3 materialisations + full merge), wall": wall["patch-linear"]
        / full_route["full-linear"],
        "ties r16: patch merge / full merge, wall": wall["patch-ties-r16"] / wall["full-ties"],
        "ties r16: patch merge / full merge, peak RSS": rss["patch-ties-r16"] / rss["full-ties"],
        "ties r16: patch merge / full merge, output size": size["patch-ties-r16"] / size["full-ties"],
        "ties r16: patch merge / (3 materialisations + full merge), wall": wall["patch-ties-r16"]
        / full_route["full-ties"],
        "task_arithmetic r16 (QR) / full linear merge, wall": wall["patch-ta-r16"] / wall["full-linear"],
    }
    print(f"\nmedians of {args.repeats} round(s):")
    print(f"  {'case':<15} {'wall s':>7} {'peak RSS MB':>12} {'output MB':>10}")
    for name in runs:
        print(f"  {name:<15} {wall[name]:7.2f} {rss[name]:12.0f} {size[name] / 1e6:10.2f}")
    for label, ratio in ratios.items():
        print(f"  {label:<66} {ratio:8.4f}x")
    print(
        f"  checks: linear patch applied vs full linear merge max |diff| {checks['linear_max_abs_diff']:.2e}; TIES "
        "rank-16 relative error vs sqrt(1 - reported energy) max diff "
        f"{checks['ties_relative_error_vs_reported_max_diff']:.1e}; "
        f"energy kept min {checks['ties_captured_energy_min']:.3f}, median {checks['ties_captured_energy_median']:.3f}"
    )
    (workdir / "patch-merge-results.json").write_text(
        json.dumps(
            {
                "runs": {name: [vars(r) for r in rs] for name, rs in runs.items()},
                "output_bytes": size,
                "ratios": ratios,
                "checks": checks,
                "machine": {**machine_info(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
