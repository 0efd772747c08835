"""Benchmark: routed inference through a LayerNormBank vs plain forward passes, and the continual pipeline's
per-task overhead (push + evaluation) next to its training time.

Part 1 (routing), in this process, eval mode, no grad, one torch thread (default; `--threads`): a ViT built from a
config (hidden 384, 6 layers, 6 heads, MLP 1536, image 32, patch 4: 65 tokens; 10.7 M parameters), a batch of 64
random images. Cases, interleaved in every round (the order rotated each round) after one warm-up call each:

  plain           the unwrapped model's forward
  2x plain        two forwards of the unwrapped model (the floor: the method needs two passes)
  routed T        LayerNormBank(model)(pixel_values=...) with T = 1, 10, 100 tasks (random slots, random unit keys)
  features T      bank.features(...)            (the first pass, pretrained norms)
  select T        bank.select(features)         (the key similarity)
  second T        bank(task_ids=mixed, ...)     (the second pass, ids 0..T-1 cycling through the batch)

then the routing work alone (median of 30 calls): every norm's per-sample gather and the key similarity for
1, 10, 100 and 1000 tasks, and one norm as banked vs pretrained; and a CPU profile of one routed and one 2x plain
call.

Ratios (routed / 2x plain) are taken within each round, then the median over rounds. The machine's other load
(busy cores not ours) is read from /proc/stat around every call, as merge_vs_mergekit.py does.

Part 2 (pipeline): `run_pipeline` on a small ViT (hidden 128, 4 layers, image 16, patch 4, 1 channel; 0.54 M
parameters, random weights: the timings, not the accuracies, are the point) with 4 synthetic class-incremental
tasks (each lights its own quarter of the image, striped by class) into a local directory registry,
`--pipeline-repeats` fresh runs. Per task, timed by wrapping the functions `run.py` calls:
key, LayerNorm training, rectification, evaluation, patch building (fingerprint), push.

Not run in CI. Usage: PYTHONPATH=. .venv/bin/python benchmarks/continual_routing.py [--repeats 7]
Writes benchmarks/_work/continual_routing.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from merge_vs_mergekit import cpu_busy_seconds, machine_info  # noqa: E402

DEFAULT_WORKDIR = HERE / "_work"
TARGET = 1.1
TASK_COUNTS = (1, 10, 100)
MICRO_TASKS = 1000  # also in the routing-ops microbenchmark only
VIT = {
    "image_size": 32,
    "patch_size": 4,
    "num_channels": 3,
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 6,
    "intermediate_size": 1536,
    "num_labels": 100,
}
BATCH = 64
SMALL_VIT = {
    "image_size": 16,
    "patch_size": 4,
    "num_channels": 1,
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 256,
}
PIPELINE_TASKS = 4
TRAIN_PER_TASK, TEST_PER_TASK = 128, 64
PIPELINE = {"epochs": 3, "lr": 0.01, "head_lr": 0.01, "batch_size": 32, "seed": 0, "align": None}  # as measured
PHASES = {  # phase -> (module attribute wrapped in splice.workflows.continual.run, what it is)
    "key": ("task_key", "task key (closed form: a features pass over the training set)"),
    "train": ("train_slot", "LayerNorm slot + head training"),
    "rectify": ("rectify_head", "classifier rectification (routed)"),
    "evaluate": ("evaluate", "evaluation of every seen task (routed + oracle)"),
    "patch": ("task_patch", "task patch built (base fingerprint)"),
    "push": (None, "Registry.push into the local registry"),
}


# --------------------------------------------------------------------------------------------------
# Synthetic tasks (the pipeline's data hooks: this file is loaded as `continual_routing.py:task_<i>`)
# --------------------------------------------------------------------------------------------------


def _images(task: int, count: int, seed: int) -> dict:
    import torch

    generator = torch.Generator().manual_seed(seed)
    side = SMALL_VIT["image_size"] // 2
    labels = 2 * task + torch.arange(count) % 2
    images = 0.3 * torch.randn(count, 1, 2 * side, 2 * side, generator=generator)
    top, left = side * (task // 2 % 2), side * (task % 2)
    region = images[:, :, top : top + side, left : left + side]
    region += 2.0
    region[labels % 2 == 0, :, 1::2, :] += 1.0  # even classes: rows
    region[labels % 2 == 1, :, :, 1::2] += 1.0  # odd classes: columns
    return {"pixel_values": images, "labels": labels}


def _task(index: int) -> dict:
    return {"train": _images(index, TRAIN_PER_TASK, 10 + index), "test": _images(index, TEST_PER_TASK, 50 + index)}


def task_0():
    return _task(0)


def task_1():
    return _task(1)


def task_2():
    return _task(2)


def task_3():
    return _task(3)


# --------------------------------------------------------------------------------------------------
# Part 1: routing
# --------------------------------------------------------------------------------------------------


def build_vit(seed: int = 0):
    import torch
    import transformers

    torch.manual_seed(seed)
    return transformers.ViTForImageClassification(transformers.ViTConfig(**VIT)).eval()


def build_bank(tasks: int, seed: int = 0):
    """A bank over a fresh copy of the seed's ViT: `tasks` slots of random gamma/beta and random unit keys."""
    import torch

    from splice.continual.bank import LayerNormBank

    bank = LayerNormBank(build_vit(seed)).eval()
    generator = torch.Generator().manual_seed(1000 + tasks)
    for _ in range(tasks):
        slot = bank.add_task(key=torch.randn(bank.feature_dim, generator=generator))
        with torch.no_grad():
            for parameter in bank.task_parameters(slot):
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return bank


def timed_call(function) -> tuple[float, float | None]:
    """(seconds, other load in busy cores) of one call; other = machine busy CPU less this process's."""
    machine, own = cpu_busy_seconds(), time.process_time()
    started = time.perf_counter()
    function()
    seconds = time.perf_counter() - started
    own, after = time.process_time() - own, cpu_busy_seconds()
    other = None if machine is None else max(0.0, after - machine - own) / max(seconds, 1e-6)
    return seconds, other


def routing_cases(pixels) -> tuple[dict, dict, dict]:
    """Case name -> zero-argument call; bank size -> the number of distinct tasks its routing selects; bank size
    -> the bank."""
    import torch

    plain = build_vit()
    cases = {
        "plain": lambda: plain(pixel_values=pixels),
        "2x plain": lambda: (plain(pixel_values=pixels), plain(pixel_values=pixels)),
    }
    mixed, banks = {}, {}
    for tasks in TASK_COUNTS:
        bank = banks[tasks] = build_bank(tasks)
        features = bank.features(pixel_values=pixels)
        ids = torch.arange(BATCH) % tasks
        mixed[tasks] = int(bank.select(features).unique().numel())
        cases[f"routed {tasks}"] = lambda b=bank: b(pixel_values=pixels)
        cases[f"features {tasks}"] = lambda b=bank: b.features(pixel_values=pixels)
        cases[f"select {tasks}"] = lambda b=bank, f=features: b.select(f)
        cases[f"second {tasks}"] = lambda b=bank, i=ids: b(task_ids=i, pixel_values=pixels)
    return cases, mixed, banks


def median_ms(call, repeats: int = 30) -> float:
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def routing_ops(banks: dict) -> dict:
    """The routing work of one batch alone (median of 30 calls, ms): the per-sample gather of every norm's slots
    (what the second pass adds per norm), the key similarity, and one norm as banked (normalise, then * w[ids] +
    b[ids]) vs the pretrained module, on a [B, tokens, d] activation."""
    import torch

    dim, tokens = VIT["hidden_size"], (VIT["image_size"] // VIT["patch_size"]) ** 2 + 1
    features = torch.randn(BATCH, dim, generator=torch.Generator().manual_seed(3))
    rows = {}
    for tasks, bank in banks.items():
        ids = torch.arange(BATCH) % tasks
        rows[tasks] = {
            "gather_all_norms_ms": median_ms(
                lambda b=bank, i=ids: [n.slots.gathered(i, (BATCH, 1, dim)) for n in b._norms]
            ),
            "select_ms": median_ms(lambda b=bank: b.select(features)),
            "norms": len(bank._norms),
        }
    norm = banks[TASK_COUNTS[0]]._norms[0]
    x = torch.randn(BATCH, tokens, dim)
    weight, bias = norm.slots.gathered(torch.zeros(BATCH, dtype=torch.long), (BATCH, 1, dim))
    return {
        "per_tasks": rows,
        "one_norm_pretrained_ms": median_ms(lambda: norm.original(x)),
        "one_norm_banked_ms": median_ms(lambda: norm.affine(norm.normalise(x), weight, bias)),
    }


def check_routed(pixels) -> float:
    """Largest |routed logits - logits with those ids' slots run one input at a time| for the 10-task bank."""
    import torch

    bank = build_bank(10)
    ids = bank.route(pixel_values=pixels)
    batched = bank(task_ids=ids, pixel_values=pixels).logits
    single = torch.cat([bank(task_ids=ids[i : i + 1], pixel_values=pixels[i : i + 1]).logits for i in range(8)])
    return float((batched[:8] - single).abs().max())


def run_routing(repeats: int) -> dict:
    import torch

    pixels = torch.randn(BATCH, 3, VIT["image_size"], VIT["image_size"], generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        cases, mixed, banks = routing_cases(pixels)
        for call in cases.values():  # warm-up
            call()
        rounds = []
        for round_index in range(repeats):
            order = list(cases)[round_index % len(cases) :] + list(cases)[: round_index % len(cases)]
            measured = {name: timed_call(cases[name]) for name in order}
            rounds.append({name: {"s": s, "other_cores": o} for name, (s, o) in measured.items()})
            print(
                f"  round {round_index + 1}/{repeats}: plain {measured['plain'][0] * 1e3:.0f} ms, routed 100 "
                f"{measured['routed 100'][0] * 1e3:.0f} ms",
                flush=True,
            )
        worst = check_routed(pixels)
        ops = routing_ops({**banks, MICRO_TASKS: build_bank(MICRO_TASKS)})
    return {
        "rounds": rounds,
        "routing_ops": ops,
        "distinct_selected": mixed,
        "batched_vs_single_max_abs": worst,
        "profile": {"routed 100": profile_call(cases["routed 100"]), "2x plain": profile_call(cases["2x plain"])},
    }


def profile_call(call, top: int = 10) -> list[dict]:
    """Self CPU time of the top operators of one call."""
    import torch

    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        call()
    events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3} for e in events]


def summarize_routing(result: dict) -> dict:
    rounds = result["rounds"]
    names = list(rounds[0])
    summary = {}
    for name in names:
        seconds = [r[name]["s"] for r in rounds]
        others = [r[name]["other_cores"] for r in rounds if r[name]["other_cores"] is not None]
        summary[name] = {
            "ms": 1e3 * statistics.median(seconds),
            "min_ms": 1e3 * min(seconds),
            "images_per_s": BATCH / statistics.median(seconds),
            "other_cores": statistics.median(others) if others else None,
        }
    ratios = {}
    for tasks in TASK_COUNTS:
        per_round = [r[f"routed {tasks}"]["s"] / r["2x plain"]["s"] for r in rounds]
        split = [
            (r[f"features {tasks}"]["s"] + r[f"select {tasks}"]["s"] + r[f"second {tasks}"]["s"]) / r["2x plain"]["s"]
            for r in rounds
        ]
        ratios[f"routed {tasks} / 2x plain"] = {
            "median": statistics.median(per_round),
            "min": min(per_round),
            "max": max(per_round),
        }
        ratios[f"split sum {tasks} / 2x plain"] = {
            "median": statistics.median(split),
            "min": min(split),
            "max": max(split),
        }
    return {"cases": summary, "ratios": ratios}


def print_routing(summary: dict, result: dict) -> None:
    print(
        f"\nRouted inference, ViT hidden {VIT['hidden_size']}, {VIT['num_hidden_layers']} layers, image "
        f"{VIT['image_size']}, patch {VIT['patch_size']}, batch {BATCH} (median of {len(result['rounds'])})"
    )
    print(f"{'case':<14} {'ms/batch':>9} {'min ms':>8} {'images/s':>9} {'other cores':>12}")
    for name, row in summary["cases"].items():
        other = "-" if row["other_cores"] is None else f"{row['other_cores']:.2f}"
        print(f"{name:<14} {row['ms']:9.1f} {row['min_ms']:8.1f} {row['images_per_s']:9.1f} {other:>12}")
    print(f"\n{'ratio (per round, median [min-max])':<36} {'value':>22}")
    for name, ratio in summary["ratios"].items():
        print(f"{name:<36} {ratio['median']:6.3f} [{ratio['min']:.3f}-{ratio['max']:.3f}]")
    print(
        f"distinct tasks selected in the batch: {result['distinct_selected']}; batched vs one-by-one max |diff| "
        f"{result['batched_vs_single_max_abs']:.2e}"
    )
    ops = result["routing_ops"]
    print("\nrouting work alone per batch (median of 30 calls, ms):")
    print(f"{'tasks':>6} {'gather, all norms':>18} {'select':>8}")
    for tasks, row in ops["per_tasks"].items():
        print(f"{tasks:>6} {row['gather_all_norms_ms']:18.3f} {row['select_ms']:8.3f}")
    print(
        f"one norm on [{BATCH}, tokens, d]: pretrained {ops['one_norm_pretrained_ms']:.3f} ms, banked "
        f"{ops['one_norm_banked_ms']:.3f} ms"
    )
    for case, rows in result["profile"].items():
        print(f"\nprofile of one {case} call (operator, calls, self CPU ms):")
        for row in rows:
            print(f"  {row['op']:<50} {row['calls']:6d} {row['self_ms']:9.1f}")


# --------------------------------------------------------------------------------------------------
# Part 2: the pipeline's per-task phases
# --------------------------------------------------------------------------------------------------


def build_small_base(directory: Path) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.ViTConfig(**SMALL_VIT, num_labels=2 * PIPELINE_TASKS)
    shutil.rmtree(directory, ignore_errors=True)
    transformers.ViTForImageClassification(config).save_pretrained(directory)
    return directory


def install_timers(phases: dict[str, list[float]]) -> None:
    """Wrap the functions run.py calls (looked up there at call time) and Registry.push; each call appends its
    seconds to its phase's list (one entry per task)."""
    import splice.workflows.continual.run as run_module
    from splice.registry.store import Registry

    def wrap(owner, attribute: str, phase: str) -> None:
        inner = getattr(owner, attribute)

        def wrapper(*args, **kwargs):
            tick = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                phases.setdefault(phase, []).append(time.perf_counter() - tick)

        setattr(owner, attribute, wrapper)

    for phase, (attribute, _) in PHASES.items():
        if attribute is not None:
            wrap(run_module, attribute, phase)
    wrap(Registry, "push", "push")
    wrap(run_module, "_run_task", "task")


def run_pipeline_once(workdir: Path, base: Path, phases: dict[str, list[float]]) -> dict:
    from splice.workflows.continual.pipeline import Pipeline
    from splice.workflows.continual.run import run_pipeline

    registry = workdir / "continual-registry"
    shutil.rmtree(registry, ignore_errors=True)
    tasks = [{"name": f"t{i}", "data": f"{Path(__file__).resolve()}:task_{i}"} for i in range(PIPELINE_TASKS)]
    pipeline = Pipeline(base=str(base), name="bench-cl", registry=str(registry), tasks=tasks, **PIPELINE)
    phases.clear()
    started = time.perf_counter()
    report = run_pipeline(pipeline)
    wall = time.perf_counter() - started
    return {
        "wall_s": wall,
        "phases": {k: list(v) for k, v in phases.items()},
        "final_average_accuracy": report.final_average_accuracy,
        "task_id_accuracy": report.task_id_accuracy[-1],
    }


def run_pipelines(workdir: Path, repeats: int) -> list[dict]:
    base = build_small_base(workdir / "continual-base")
    phases: dict[str, list[float]] = {}
    install_timers(phases)
    runs = []
    for index in range(repeats):
        machine, own = cpu_busy_seconds(), time.process_time()
        run = run_pipeline_once(workdir, base, phases)
        if machine is not None:
            run["other_cores"] = max(0.0, cpu_busy_seconds() - machine - (time.process_time() - own)) / run["wall_s"]
        runs.append(run)
        print(f"  pipeline run {index + 1}/{repeats}: {run['wall_s']:.2f} s", flush=True)
    return runs


def summarize_pipeline(runs: list[dict]) -> dict:
    """Per task and phase the median over runs (ms); overhead (evaluate + patch + push) / training (train +
    rectify), per run then the median."""
    per_task = []
    for task in range(PIPELINE_TASKS):
        row = {
            phase: 1e3 * statistics.median(run["phases"][phase][task] for run in runs) for phase in [*PHASES, "task"]
        }
        row["rest"] = row["task"] - sum(row[phase] for phase in PHASES)
        per_task.append(row)

    def ratio(run: dict, over: tuple[str, ...]) -> float:
        spent = sum(sum(run["phases"][phase]) for phase in over)
        return spent / sum(sum(run["phases"][phase]) for phase in ("train", "rectify"))

    return {
        "per_task_ms": per_task,
        "overhead / training": statistics.median(ratio(r, ("evaluate", "patch", "push")) for r in runs),
        "push + patch / training": statistics.median(ratio(r, ("patch", "push")) for r in runs),
        "evaluate / training": statistics.median(ratio(r, ("evaluate",)) for r in runs),
        "wall_s": statistics.median(r["wall_s"] for r in runs),
        "other_cores": statistics.median(r.get("other_cores") or 0.0 for r in runs),
        "final_average_accuracy": runs[-1]["final_average_accuracy"],
        "task_id_accuracy": runs[-1]["task_id_accuracy"],
    }


def print_pipeline(summary: dict, repeats: int) -> None:
    print(
        f"\nPipeline per task (ms, median of {repeats} runs; {PIPELINE_TASKS} tasks, {TRAIN_PER_TASK} train / "
        f"{TEST_PER_TASK} test images each, epochs {PIPELINE['epochs']}, batch {PIPELINE['batch_size']})"
    )
    columns = [*PHASES, "rest", "task"]
    print(f"{'task':<5}" + "".join(f"{c:>10}" for c in columns))
    for index, row in enumerate(summary["per_task_ms"]):
        print(f"{index:<5}" + "".join(f"{row[c]:10.1f}" for c in columns))
    for name in ("overhead / training", "push + patch / training", "evaluate / training"):
        print(f"{name:<26} {summary[name]:.3f}")
    print(
        f"pipeline wall {summary['wall_s']:.2f} s, other load {summary['other_cores']:.2f} cores; final average "
        f"accuracy {summary['final_average_accuracy']:.3f}, task-id accuracy {summary['task_id_accuracy']:.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds of the routing cases")
    parser.add_argument("--pipeline-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--only", choices=("routing", "pipeline"), default=None)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = {
        "machine": machine_info(),
        "threads": args.threads,
        "vit": VIT,
        "batch": BATCH,
        "small_vit": SMALL_VIT,
        "pipeline": PIPELINE,
        "target": TARGET,
    }
    if args.only != "pipeline":
        routing = run_routing(args.repeats)
        results["routing"] = {**routing, "summary": summarize_routing(routing)}
        print_routing(results["routing"]["summary"], routing)
    if args.only != "routing":
        runs = run_pipelines(args.workdir, args.pipeline_repeats)
        results["pipeline_runs"] = runs
        results["pipeline_summary"] = summarize_pipeline(runs)
        print_pipeline(results["pipeline_summary"], len(runs))
    out = args.workdir / "continual_routing.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
