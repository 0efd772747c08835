"""Benchmark: `splice deploy` of a LoRA + LayerNorm patch onto a ~340 MB checkpoint vs copying its shards.

The base is the merge benchmark's Llama-shaped fp32 model A (4 shards). The patches, pushed to a
fresh local registry: a LayerNorm patch (every RMSNorm weight) and a rank-16 LoRA patch on every
attention and MLP matrix of every layer. Measured, each run in its own subprocess:

  copy-shards     cp -r A OUT                                    (the floor: the bytes must be written anyway)
  splice-deploy   splice deploy bench-ln@prod bench-lora@prod --base A --out OUT --quiet
  deploy-call     python: time only the splice.workflows.deploy.deploy(...) call (no interpreter/import start-up)
  deploy-ln-call  the same for the LayerNorm patch alone (untouched tensors are copied inside the kernel)
  import-only     python -c 'import splice.workflows.deploy, splice.cli.app' (start-up alone)
  io-floor        python: every tensor read with safetensors' safe_open and written with save_file, shard by
                  shard (bytes through user space, as any tool that looks at the values must move them);
                  timed inside Python, like deploy-call

Target (issue 3): splice deploy <= 1.3x the wall time of copying the shards. One warm-up round (fills
the page cache), then `--repeats` rounds; medians reported; the deployed weights are checked against
base + B @ A and the LayerNorm values. Usage: .venv/bin/python benchmarks/deploy_vs_copy.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from merge_vs_mergekit import Case, build_models, measure, prepare_workdir  # noqa: E402

DEFAULT_WORKDIR = HERE / "_work"
RANK = 16
SEED = 0
TARGET = 1.3

IO_FLOOR = r"""
import json, os, sys, time
from safetensors import safe_open
from safetensors.torch import save_file
base, out, report = sys.argv[1], sys.argv[2], sys.argv[3]
started = time.perf_counter()
os.makedirs(out, exist_ok=True)
for shard in sorted(f for f in os.listdir(base) if f.endswith(".safetensors")):
    with safe_open(os.path.join(base, shard), "pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    save_file(tensors, os.path.join(out, shard), metadata={"format": "pt"})
json.dump({"seconds": time.perf_counter() - started}, open(report, "w"))
"""

DEPLOY_CALL = r"""
import json, sys, time
from splice.workflows.deploy import deploy
refs, base, out, registry, report = sys.argv[1].split(","), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
started = time.perf_counter()
deploy(refs, base, out, registry=registry, device="cpu", force=True)
json.dump({"seconds": time.perf_counter() - started}, open(report, "w"))
"""


def build_patches(base_dir: Path, registry_dir: Path) -> list[str]:
    """Push a LayerNorm patch and a rank-16 LoRA patch made for `base_dir` to a fresh registry."""
    import torch

    from splice.adapters.fingerprint import fingerprint_base
    from splice.adapters.patch import Patch, PatchMeta
    from splice.arch.norms import norm_tensor_names
    from splice.registry.store import Registry
    from splice.tensors.checkpoint import Checkpoint

    base = Checkpoint.open(base_dir)
    generator = torch.Generator().manual_seed(SEED)
    norms = norm_tensor_names(base)
    layernorm = {
        name: base.read(name) + 0.01 * torch.randn(base.tensors[name].shape, generator=generator) for name in norms
    }
    lora, rank, alpha = {}, {}, {}
    for name, info in base.tensors.items():
        if ".layers." not in name or len(info.shape) != 2:
            continue
        module = name.removesuffix(".weight")
        rows, cols = info.shape
        lora[f"{module}.lora_A"] = torch.randn(RANK, cols, generator=generator) / cols**0.5
        lora[f"{module}.lora_B"] = 0.01 * torch.randn(rows, RANK, generator=generator)
        rank[module], alpha[module] = RANK, float(RANK)
    touched = [f"{module}.weight" for module in rank]
    shutil.rmtree(registry_dir, ignore_errors=True)
    registry = Registry.init(str(registry_dir))
    modules = sorted({name.rpartition(".")[0] for name in norms})
    registry.push(
        "bench-ln",
        Patch(layernorm, PatchMeta(kind="layernorm", targets=modules, base=fingerprint_base(base, norms))),
        alias="prod",
    )
    registry.push(
        "bench-lora",
        Patch(
            lora,
            PatchMeta(
                kind="lora",
                targets=sorted(rank),
                base=fingerprint_base(base, touched),
                settings={"rslora": False, "rank": rank, "alpha": alpha},
            ),
        ),
        alias="prod",
    )
    print(
        f"patches: LayerNorm {len(norms)} tensors, LoRA rank {RANK} on {len(rank)} matrices "
        f"({sum(t.numel() for t in lora.values()) * 4 / 1e6:.1f} MB)"
    )
    return ["bench-ln@prod", "bench-lora@prod"]


def check_output(base_dir: Path, out_dir: Path, registry_dir: Path) -> float:
    """Largest |deployed - (base + B @ A)| over the LoRA matrices, after checking the LayerNorms exactly."""
    import torch

    from splice.registry.store import Registry
    from splice.tensors.checkpoint import Checkpoint

    registry = Registry.open(str(registry_dir))
    base, out = Checkpoint.open(base_dir), Checkpoint.open(out_dir)
    layernorm, lora = registry.load("bench-ln@prod"), registry.load("bench-lora@prod")
    for name in layernorm.tensors:
        assert torch.equal(out.read(name), layernorm.tensors[name]), name
    worst = 0.0
    for name in lora.tensors:
        if name.endswith(".lora_A"):
            module = name.removesuffix(".lora_A")
            expected = base.read(f"{module}.weight") + lora.tensors[f"{module}.lora_B"] @ lora.tensors[name]
            worst = max(worst, float((out.read(f"{module}.weight") - expected).abs().max()))
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quiet-wait", type=float, default=10.0)
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    prepare_workdir(workdir)
    (workdir / "deploy_call.py").write_text(DEPLOY_CALL)
    (workdir / "io_floor_copy.py").write_text(IO_FLOOR)
    base_dir = build_models(workdir / "models")[0]
    registry_dir = workdir / "deploy-registry"
    refs = build_patches(base_dir, registry_dir)
    outs = {name: workdir / f"deploy-out-{name}" for name in ("copy", "cli", "call", "ln", "floor")}
    call_report = workdir / "logs" / "timed_inside.json"
    splice_cli = str(Path(sys.executable).with_name("splice"))
    cases = [
        Case(
            "copy-shards",
            ["cp", "-r", str(base_dir), str(outs["copy"])],
            outs["copy"],
            "cp -r of the base model directory",
        ),
        Case(
            "splice-deploy",
            [
                splice_cli,
                "deploy",
                *refs,
                "--base",
                str(base_dir),
                "--out",
                str(outs["cli"]),
                "--registry",
                str(registry_dir),
                "--device",
                "cpu",
                "--quiet",
                "--force",
            ],
            outs["cli"],
            "the CLI, end to end",
        ),
        Case(
            "deploy-call",
            [
                sys.executable,
                str(workdir / "deploy_call.py"),
                ",".join(refs),
                str(base_dir),
                str(outs["call"]),
                str(registry_dir),
                str(call_report),
            ],
            outs["call"],
            "deploy() timed inside Python",
        ),
        Case(
            "deploy-ln-call",
            [
                sys.executable,
                str(workdir / "deploy_call.py"),
                refs[0],
                str(base_dir),
                str(outs["ln"]),
                str(registry_dir),
                str(call_report),
            ],
            outs["ln"],
            "deploy() of the LayerNorm patch alone, timed inside Python",
        ),
        Case(
            "import-only",
            [sys.executable, "-c", "import splice.workflows.deploy, splice.cli.app"],
            None,
            "interpreter + imports",
        ),
        Case(
            "io-floor",
            [sys.executable, str(workdir / "io_floor_copy.py"), str(base_dir), str(outs["floor"]), str(call_report)],
            outs["floor"],
            "safe_open reads + save_file writes, timed inside Python",
        ),
    ]
    timed_inside = {"deploy-call", "deploy-ln-call", "io-floor"}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    walls: dict[str, list[float]] = {case.name: [] for case in cases}
    inside: dict[str, list[float]] = {name: [] for name in timed_inside}
    for round_index in range(-1, args.repeats):
        for case in cases:
            run = measure(case, round_index, workdir, env, args.quiet_wait, 0.25)
            seconds = json.loads(call_report.read_text())["seconds"] if case.name in timed_inside else None
            label = "warm-up" if round_index < 0 else f"round {round_index + 1}"
            print(
                f"  [{label}] {case.name:<14} {run.wall_s:6.2f} s  peak RSS {run.peak_rss_mb:6.0f} MB"
                + (f"  (timed inside: {seconds:.2f} s)" if seconds is not None else ""),
                flush=True,
            )
            if round_index >= 0:
                walls[case.name].append(run.wall_s)
                if seconds is not None:
                    inside[case.name].append(seconds)
    worst = check_output(base_dir, outs["call"], registry_dir)
    median = {name: statistics.median(values) for name, values in walls.items()}
    median_inside = {name: statistics.median(values) for name, values in inside.items()}
    copy = median["copy-shards"]
    rows = [
        ("splice deploy (CLI, end to end) / copy", median["splice-deploy"] / copy),
        ("splice deploy (CLI) minus start-up / copy", (median["splice-deploy"] - median["import-only"]) / copy),
        ("deploy() call / copy", median_inside["deploy-call"] / copy),
        ("deploy() call / io-floor (safe_open + save_file)", median_inside["deploy-call"] / median_inside["io-floor"]),
        ("deploy() of the LayerNorm patch alone / copy", median_inside["deploy-ln-call"] / copy),
    ]
    print(
        f"\nmedians of {args.repeats}: copy {copy:.2f} s, splice deploy {median['splice-deploy']:.2f} s, "
        f"start-up {median['import-only']:.2f} s, deploy() {median_inside['deploy-call']:.2f} s, "
        f"io-floor {median_inside['io-floor']:.2f} s"
    )
    for label, ratio in rows:
        print(f"  {label:<50} {ratio:5.2f}x  (target <= {TARGET}x: {'met' if ratio <= TARGET else 'MISSED'})")
    print(f"  deployed LoRA matrices vs base + B @ A: max |diff| {worst:.2e}; LayerNorms exact")
    (workdir / "deploy-results.json").write_text(
        json.dumps(
            {
                "walls": walls,
                "timed_inside": inside,
                "ratios": dict(rows),
                "max_abs_diff": worst,
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
