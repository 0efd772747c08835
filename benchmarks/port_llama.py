"""Benchmark: porting a rank-16 LoRA patch onto an evolved ~340 MB Llama vs `patch apply` and the I/O floor.

OLD base: the merge benchmark's model A (Llama-shaped, fp32, 340 MB, 4 shards). NEW base: its model B, which
is A plus seeded N(0, 0.001) noise in every tensor (an evolved copy, 4 shards). The patch: the deploy
benchmark's rank-16 LoRA on every attention and MLP matrix (seeded factors, alpha = rank), made on OLD and
saved as a patch directory. Measured, each case in its own subprocess (wall time and peak RSS of that child),
after one warm-up round (page cache warm), `--repeats` rounds back to back:

  copy-shards        cp -r NEW OUT                                            (the floor)
  io-floor           safe_open + save_file shard by shard (deploy_vs_copy.py's), timed inside Python
  patch-apply        apply_patches([patch], NEW, out, allow_base_drift=True)
  port               port_patch(patch, NEW, out=..., old_base=OLD)  (drift against OLD's values: `--from`)
  port-no-old        port_patch(patch, NEW, out=...)                (drift from fingerprint norms only)
  patch-apply-half   patch-apply on a model half the size (2 layers, vocab 8192; same tensor shapes)
  port-half          port on that half-size model: peak RSS must not follow model size
  cli-patch-apply    `splice patch apply PATCH --base NEW --out OUT --allow-base-drift` (the command line, whole)
  cli-port           `splice port PATCH --to NEW --from OLD --out OUT` (the command line, whole)

The splice calls are timed inside Python, split into phases (the base checks, the new base's context fingerprint,
the stream with the drift measured on the way, the report's files) by wrapping splice's functions in the child.
The ported models are checked against NEW + B @ A. Usage: .venv/bin/python benchmarks/port_llama.py [--repeats 3]
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

from deploy_vs_copy import IO_FLOOR, build_patches  # noqa: E402
from merge_vs_mergekit import MODEL_SPEC, Case, build_models, machine_info, measure, prepare_workdir  # noqa: E402

DEFAULT_WORKDIR = HERE / "_work"
TARGET = 1.2
HALF = {"num_hidden_layers": MODEL_SPEC["num_hidden_layers"] // 2, "vocab_size": MODEL_SPEC["vocab_size"] // 2}
TIMED_INSIDE = ("io-floor", "patch-apply", "port", "port-no-old", "patch-apply-half", "port-half")
CLI = ("cli-patch-apply", "cli-port")
CHECKED = ("port", "port-no-old", "port-half", "cli-port")
PHASES = {  # the child's phase keys, in call order; "a.b" is part of "a"
    "load": "load the patch",
    "check": "base fingerprint check (apply: sha256 of NEW's patched tensors; port: OLD's record)",
    "context": "context fingerprint of NEW (sampled)",
    "stream": "stream: read, patch, write (port: the drift measured on the way)",
    "stream.measure": "drift measured per patched tensor (`_measure_one`, on the stream's thread)",
    "stream.sha": "sha256 of NEW's and OLD's tensors (worker threads, overlapping the figures)",
    "stream.update": "the update U materialized (`_update`)",
    "stream.drift": "drift figures (`_drift_sums`: U, W' - W, their norms and dot in fp64)",
    "stream.report": "report files: JSON, and the PNG from the child process (waited for)",
    "rest": "rest (open checkpoints, checks, ported patch)",
}

# One child for both splice calls. Phases are timed by wrapping splice's own functions (names looked up at
# call time in the modules that call them), so the library is measured as a user gets it.
SPLICE_CALL = r"""
import json, resource, sys, time
import splice.adapters.apply as apply_module
import splice.adapters.drift as drift_module
import splice.adapters.patch as patch_module
import splice.adapters.port as port_module
mode, patch, new, out, old, report = sys.argv[1:7]
phases = {}

def timed(module, attribute, phase):
    inner = getattr(module, attribute)
    def wrapper(*args, **kwargs):
        tick = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - tick
    setattr(module, attribute, wrapper)

timed(port_module, "load_patch", "load")
timed(port_module, "compare_base", "check")
timed(patch_module, "compare_base", "check")
timed(port_module, "_context", "context")
timed(port_module, "run_stream", "stream")
timed(apply_module, "run_stream", "stream")
timed(port_module, "_measure_one", "stream.measure")
timed(port_module, "tensor_sha256", "stream.sha")
timed(port_module, "_update", "stream.update")
timed(port_module, "_drift_sums", "stream.drift")
timed(drift_module.DriftReport, "files", "stream.report")
def cpu():  # this process's threads and the children it waited for (the report's figure process)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime

started, cpu_started = time.perf_counter(), cpu()
if mode == "apply":
    apply_module.apply_patches([patch], new, out, allow_base_drift=True, device="cpu", force=True)
else:
    port_module.port_patch(patch, new, out=out, old_base=None if old == "-" else old, device="cpu", force=True)
seconds, cpu_seconds = time.perf_counter() - started, cpu() - cpu_started
phases["rest"] = seconds - sum(value for key, value in phases.items() if "." not in key)
json.dump({"seconds": seconds, "cpu_seconds": cpu_seconds, "phases": phases}, open(report, "w"))
"""


def build_half(source: Path, target: Path) -> Path:
    """`source` cut to half its size with the same tensor shapes per layer: layers >= HALF's count dropped,
    embedding and head cut to HALF's vocab rows; written by splice's streamed writer in about 4 shards."""
    import torch

    from splice.options import RunOptions
    from splice.tensors.checkpoint import Checkpoint
    from splice.tensors.stream import Kernel, OutputExtras, StreamItem, run_stream
    from splice.tensors.writer import OutputTensor

    stamp = target / "half.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == {**MODEL_SPEC, **HALF}:
        return target
    base = Checkpoint.open(source)
    layers, vocab = HALF["num_hidden_layers"], HALF["vocab_size"]
    items = []
    for name, info in base.tensors.items():
        if ".layers." in name and int(name.split(".layers.")[1].split(".")[0]) >= layers:
            continue
        shape = tuple(info.shape)
        if shape[0] == MODEL_SPEC["vocab_size"]:
            shape = (vocab, *shape[1:])
        items.append(StreamItem(OutputTensor(name, info.dtype, shape), ((base, name),)))
    total = sum(4 * int(torch.Size(item.output.shape).numel()) for item in items)
    config = json.loads(base.read_file("config.json"))
    config.update(HALF)

    def cut(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        return tensors[0][:vocab].clone() if tensors[0].shape[0] == MODEL_SPEC["vocab_size"] else tensors[0]

    shutil.rmtree(target, ignore_errors=True)
    run_stream(
        items,
        Kernel(cut),
        target,
        side_files_from=base,
        run=RunOptions(device="cpu", shard_size=total // 4 + 1),
        extras=OutputExtras(files={"config.json": json.dumps(config, indent=2).encode()}),
    )
    stamp.write_text(json.dumps({**MODEL_SPEC, **HALF}))
    return target


def save_lora(base: Path, registry: Path, patch_dir: Path) -> Path:
    """The deploy benchmark's rank-16 LoRA patch for `base` (pushed with its LayerNorm patch), saved to a dir."""
    from splice.registry.store import Registry

    build_patches(base, registry)
    shutil.rmtree(patch_dir, ignore_errors=True)
    Registry.open(str(registry)).load("bench-lora@prod").save(patch_dir)
    return patch_dir


def check_ported(new_dir: Path, out_dir: Path, patch_dir: Path) -> float:
    """Largest |ported - (NEW + B @ A)| over the patched matrices; every other tensor must equal NEW's."""
    import torch

    from splice.adapters.patch import Patch
    from splice.tensors.checkpoint import Checkpoint

    patch, new, out = Patch.load(patch_dir), Checkpoint.open(new_dir), Checkpoint.open(out_dir)
    assert set(out.tensors) == set(new.tensors), "the ported model's tensors differ from NEW's"
    worst, patched = 0.0, set()
    for name in patch.tensors:
        if name.endswith(".lora_A"):
            module = name.removesuffix(".lora_A")
            expected = new.read(f"{module}.weight") + patch.tensors[f"{module}.lora_B"] @ patch.tensors[name]
            worst = max(worst, float((out.read(f"{module}.weight") - expected).abs().max()))
            patched.add(f"{module}.weight")
    for name in set(new.tensors) - patched:
        assert torch.equal(out.read(name), new.read(name)), f"{name} changed"
    return worst


def prepare(workdir: Path) -> dict[str, Path]:
    """Models (cached), patches and the child scripts under `workdir`."""
    prepare_workdir(workdir)
    (workdir / "io_floor_copy.py").write_text(IO_FLOOR)
    (workdir / "port_call.py").write_text(SPLICE_CALL)
    old, new = build_models(workdir / "models")[:2]
    half_old = build_half(old, workdir / "port-half" / "old")
    half_new = build_half(new, workdir / "port-half" / "new")
    paths = {
        "old": old,
        "new": new,
        "half_old": half_old,
        "half_new": half_new,
        "patch": save_lora(old, workdir / "port-registry", workdir / "port-patch"),
        "half_patch": save_lora(half_old, workdir / "port-registry-half", workdir / "port-patch-half"),
        "report": workdir / "logs" / "port_timed_inside.json",
    }
    for name in ("old", "new", "half_old", "half_new"):
        size = sum(f.stat().st_size for f in paths[name].glob("*.safetensors"))
        print(f"  {name:<9} {size / 1e6:6.0f} MB in {len(list(paths[name].glob('*.safetensors')))} shards")
    return paths


def build_cases(workdir: Path, paths: dict[str, Path]) -> list[Case]:
    out = {name: workdir / f"port-out-{name}" for name in ("copy", "floor", *TIMED_INSIDE[1:], *CLI)}
    call = [sys.executable, str(workdir / "port_call.py")]
    cli = [sys.executable, "-m", "splice"]
    report = str(paths["report"])

    def splice(mode: str, name: str, half: bool, old: bool) -> Case:
        patch, new = (paths["half_patch"], paths["half_new"]) if half else (paths["patch"], paths["new"])
        old_arg = str(paths["half_old" if half else "old"]) if old else "-"
        what = (
            "apply_patches(allow_base_drift)"
            if mode == "apply"
            else "port_patch(old_base=OLD)"
            if old
            else "port_patch, no old base"
        )
        return Case(
            name,
            [*call, mode, str(patch), str(new), str(out[name]), old_arg, report],
            out[name],
            what + (" on the half-size model" if half else ""),
        )

    return [
        Case("copy-shards", ["cp", "-r", str(paths["new"]), str(out["copy"])], out["copy"], "cp -r NEW OUT"),
        Case(
            "io-floor",
            [sys.executable, str(workdir / "io_floor_copy.py"), str(paths["new"]), str(out["floor"]), report],
            out["floor"],
            "safe_open + save_file, shard by shard",
        ),
        splice("apply", "patch-apply", False, False),
        splice("port", "port", False, True),
        splice("port", "port-no-old", False, False),
        splice("apply", "patch-apply-half", True, False),
        splice("port", "port-half", True, True),
        Case(
            "cli-patch-apply",
            [*cli, "patch", "apply", str(paths["patch"]), "--base", str(paths["new"]), "--allow-base-drift"]
            + ["--out", str(out["cli-patch-apply"]), "--device", "cpu", "-q"],
            out["cli-patch-apply"],
            "splice patch apply (the command line)",
        ),
        Case(
            "cli-port",
            [*cli, "port", str(paths["patch"]), "--to", str(paths["new"]), "--from", str(paths["old"])]
            + ["--out", str(out["cli-port"]), "--device", "cpu", "-q"],
            out["cli-port"],
            "splice port --from (the command line)",
        ),
    ]


def run_rounds(
    cases: list[Case], paths: dict[str, Path], workdir: Path, repeats: int, quiet_wait: float
) -> tuple[list[dict], dict[str, float]]:
    """A warm-up round, then `repeats` rounds of every case back to back; each output is checked (last round
    only, for the ported models) and deleted before the next case runs."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    runs, errors = [], {}
    for round_index in range(-1, repeats):
        for case in cases:
            run = measure(case, round_index, workdir, env, quiet_wait, 1.2)  # the trainer beside us uses 1 core
            inside = json.loads(paths["report"].read_text()) if case.name in TIMED_INSIDE else {}
            label = "warm-up" if round_index < 0 else f"round {round_index + 1}"
            print(
                f"  [{label}] {case.name:<16} {run.wall_s:6.2f} s  peak RSS {run.peak_rss_mb:5.0f} MB"
                + (f"  inside {inside['seconds']:.2f} s" if inside else "")
                + (f"  (others busy {run.other_load:.1f} cores)" if run.other_load is not None else ""),
                flush=True,
            )
            if round_index == repeats - 1 and case.name in CHECKED:
                half = case.name.endswith("-half")
                errors[case.name] = check_ported(
                    paths["half_new" if half else "new"], case.out, paths["half_patch" if half else "patch"]
                )
            if case.out is not None:
                shutil.rmtree(case.out, ignore_errors=True)
            if round_index >= 0:
                runs.append(
                    {
                        "case": case.name,
                        "round": round_index,
                        "wall_s": run.wall_s,
                        "peak_rss_mb": run.peak_rss_mb,
                        "peak_anon_mb": run.peak_anon_mb,
                        "cpu_s": run.cpu_s,
                        "other_load": run.other_load,
                        "inside_s": inside.get("seconds"),
                        "inside_cpu_s": inside.get("cpu_seconds"),
                        # the call without waiting for the report's files (the PNG drawn by the figure process)
                        "inside_but_report_s": inside["seconds"] - inside.get("phases", {}).get("stream.report", 0.0)
                        if inside
                        else None,
                        "phases": inside.get("phases", {}),
                    }
                )
    return runs, errors


RATIOS = [
    # (label, numerator case, its metric, denominator case, its metric, target)
    ("port / patch-apply (inside the call)", "port", "inside_s", "patch-apply", "inside_s", TARGET),
    ("port / patch-apply (whole process)", "port", "wall_s", "patch-apply", "wall_s", TARGET),
    ("port / patch-apply (the command lines, whole)", "cli-port", "wall_s", "cli-patch-apply", "wall_s", TARGET),
    ("port-no-old / patch-apply (inside the call)", "port-no-old", "inside_s", "patch-apply", "inside_s", TARGET),
    ("port / patch-apply: CPU s inside the call", "port", "inside_cpu_s", "patch-apply", "inside_cpu_s", None),
    (
        "port but the report's files / patch-apply (inside)",
        "port",
        "inside_but_report_s",
        "patch-apply",
        "inside_s",
        None,
    ),
    ("port (inside) / copy-shards", "port", "inside_s", "copy-shards", "wall_s", None),
    ("port (whole process) / copy-shards", "port", "wall_s", "copy-shards", "wall_s", None),
    ("port (inside) / io-floor (inside)", "port", "inside_s", "io-floor", "inside_s", None),
    ("patch-apply (inside) / copy-shards", "patch-apply", "inside_s", "copy-shards", "wall_s", None),
    ("port-half / patch-apply-half (inside the call)", "port-half", "inside_s", "patch-apply-half", "inside_s", TARGET),
    ("peak RSS: port-half / port (model 0.5x)", "port-half", "peak_rss_mb", "port", "peak_rss_mb", None),
    ("peak RSS: patch-apply-half / patch-apply", "patch-apply-half", "peak_rss_mb", "patch-apply", "peak_rss_mb", None),
]


def summarize(runs: list[dict], repeats: int) -> tuple[dict, dict]:
    """Medians per case (phases included) and the median over rounds of each ratio taken within one round."""
    cases: dict[str, dict] = {}
    for name in dict.fromkeys(run["case"] for run in runs):
        mine = [run for run in runs if run["case"] == name]
        row = {
            key: statistics.median(run[key] for run in mine)
            for key in ("wall_s", "peak_rss_mb", "cpu_s")
            if all(run[key] is not None for run in mine)
        }
        if mine[0]["inside_s"] is not None:
            row["inside_s"] = statistics.median(run["inside_s"] for run in mine)
        if mine[0]["inside_cpu_s"] is not None:
            row["inside_cpu_s"] = statistics.median(run["inside_cpu_s"] for run in mine)
        anon = [run["peak_anon_mb"] for run in mine if run["peak_anon_mb"] is not None]
        row["peak_anon_mb"] = statistics.median(anon) if anon else None
        row["phases"] = {
            key: statistics.median(run["phases"].get(key, 0.0) for run in mine)
            for key in PHASES
            if key in mine[0]["phases"]
        }
        cases[name] = row
    at = {(run["case"], run["round"]): run for run in runs}
    ratios = {}
    for label, top, top_key, bottom, bottom_key, target in RATIOS:
        per_round = [at[top, r][top_key] / at[bottom, r][bottom_key] for r in range(repeats)]
        ratios[label] = {"median": statistics.median(per_round), "rounds": per_round, "target": target}
    return cases, ratios


def print_report(cases: dict, ratios: dict, errors: dict[str, float], repeats: int) -> None:
    print(f"\nmedians of {repeats} rounds (machine shared: see 'others busy' above)")
    print(
        f"  {'case':<17} {'inside s':>9} {'inside CPU s':>13} {'process s':>10} {'peak RSS MB':>12} {'RssAnon MB':>11}"
    )
    for name, row in cases.items():
        inside = f"{row['inside_s']:.2f}" if "inside_s" in row else "-"
        inside_cpu = f"{row['inside_cpu_s']:.2f}" if "inside_cpu_s" in row else "-"
        anon = f"{row['peak_anon_mb']:.0f}" if row["peak_anon_mb"] is not None else "-"
        print(
            f"  {name:<17} {inside:>9} {inside_cpu:>13} {row['wall_s']:>10.2f} {row['peak_rss_mb']:>12.0f} {anon:>11}"
        )
    print("\nratios (each taken within one round; median over rounds)")
    for label, ratio in ratios.items():
        verdict = (
            ""
            if ratio["target"] is None
            else f"  (target <= {ratio['target']}x: {'met' if ratio['median'] <= ratio['target'] else 'MISSED'})"
        )
        rounds = ", ".join(f"{value:.2f}" for value in ratio["rounds"])
        print(f"  {label:<48} {ratio['median']:5.2f}x  [{rounds}]{verdict}")
    print("\nphases inside the call (medians, s)")
    for name in ("patch-apply", "port", "port-no-old"):
        print(f"  {name}: {cases[name]['inside_s']:.2f} s inside the call")
        for key, label in PHASES.items():
            if key in cases[name]["phases"]:
                indent = "    of which " if "." in key else ""
                print(f"    {indent + label:<68} {cases[name]['phases'][key]:5.2f}")
    for name, worst in errors.items():
        print(f"  {name} output vs NEW + B @ A: max |diff| {worst:.2e}; untouched tensors equal NEW's")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=5.0,
        help="wait up to S s before each run until other processes use < 1.2 cores",
    )
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    paths = prepare(workdir)
    runs, errors = run_rounds(build_cases(workdir, paths), paths, workdir, args.repeats, args.quiet_wait)
    cases, ratios = summarize(runs, args.repeats)
    print_report(cases, ratios, errors, args.repeats)
    (workdir / "port_llama.json").write_text(
        json.dumps(
            {
                "cases": cases,
                "ratios": ratios,
                "max_abs_diff": errors,
                "runs": runs,
                "machine": machine_info(),
                "note": "2-core VM shared with other jobs (see other_load per run)",
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
            indent=2,
        )
    )
    print(f"\nwritten: {workdir / 'port_llama.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
