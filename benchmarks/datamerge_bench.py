"""Benchmark: splice's RegMean and Fisher merges of three GPT-2-shaped models next to FusionBench's (the
`fusion-bench` package, its own merge functions), and splice's RegMean peak RSS at two model sizes.

Models: GPT-2 layout (`GPT2LMHeadModel`, tied head, Conv1D layers), width 768, 12 heads, vocab 8192, fp32; three
"fine-tunes" of one random base (base + N(0, 0.002) on every tensor, seeds 1-3). Small: 4 layers, 35.4 M
parameters, 142 MB each. Large (the RSS-by-size check): 36 layers, 262 M parameters, 1.05 GB each.

Statistics, collected once per model by splice (`splice stats collect MODEL --data THIS_FILE:tokens --kind
gram|fisher`): 64 sequences of 64 tokens per model, no padding, each model its own "task" slice of the vocabulary;
the Fisher over the first 32, per example, labels sampled from the model. fusion-bench gets the very same numbers
in its own format, converted from splice's artifacts: RegMean X^T X / tokens in fp32 per Conv1D module, the Fisher
diagonals as they are. So both tools merge the same models with the same statistics; the merge is what is compared.

Cases, each its own process, measured by the merge benchmark's wrapper (wall time from fork to reaping, peak RSS
from wait4, CPU time); `--repeats` rounds in a rotating order:

  splice-regmean           splice merge regmean.yml --out X --device cpu   (alpha 0.6: fusion-bench's GPT-2 setting)
  fusionbench-regmean      fusion_bench.method.regmean.regmean.merging_with_regmean_weights(state dicts, Grams, 0.6,
                           weight_transpose=False), the state dicts and Grams read with safetensors' load_file
                           (memory-mapped), the output written with save_file
  splice-fisher            splice merge fisher.yml (epsilon 1e-6, per-model weights = fusion-bench's normalisation)
  fusionbench-fisher       fusion_bench.method.fisher_merging.fisher_merging.merging_with_fisher_weights(...,
                           normalize_fisher_weight=True, minimal_fisher_weight=1e-6): its GPT-2 defaults
  splice-regmean-1gb       splice merge of the three 1 GB models (`--no-large` skips it)
  fusionbench-regmean-1gb  the same in fusion-bench (`--peer-large`; ~10 GB of RAM)

plus start-up baselines (`import torch`; fusion-bench's merge functions imported; splice's CLI and data-merge engine
imported), and, once and untimed, fusion-bench's RegMean on fp64 copies of its inputs: the reference that separates
the two tools' fp32 rounding (splice solves in fp64; fusion-bench inverts in its inputs' dtype). Afterwards the
outputs are compared tensor by tensor.

Not run in CI. fusion-bench is a benchmark-only extra (`make bench-datamerge` installs `.[bench]`), or give
`--peer-python` an interpreter that has it. Usage:
  PYTHONPATH=$PWD .venv/bin/python benchmarks/datamerge_bench.py [--repeats 3] [--no-large] [--only CASE ...]
See benchmarks/README.md for the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from merge_vs_mergekit import (  # noqa: E402
    REPO,
    Case,
    Run,
    compare,
    machine_info,
    measure,
    prepare_workdir,
)

DEFAULT_WORKDIR = HERE / "_work" / "datamerge"
SPEC = {
    "n_embd": 768,
    "n_head": 12,
    "n_positions": 1024,
    "vocab_size": 8192,
    "init_std": 0.02,
    "finetune_delta_std": 0.002,
    "base_seed": 0,
    "seeds": [1, 2, 3],
    "format_version": 1,
}
LAYERS = {"small": 4, "large": 36}
MODEL_NAMES = [f"model_{seed}" for seed in SPEC["seeds"]]
SEQUENCES, SEQUENCE_LENGTH, FISHER_SAMPLES = 64, 64, 32
TASK_VOCABULARY = 4096  # each model's data draws its tokens from its own slice of this many ids
ALPHA = 0.6  # fusion-bench's GPT-2 RegMean config (reduce_non_diagonal_ratio); splice's default is 0.9
EPSILON = 1e-6  # fusion-bench's minimal_fisher_weight
PARITY_TOLERANCE = 1e-5
# the output pairs whose definitions and arithmetic agree (fusion-bench's RegMean in fp32 inverts its system
# explicitly in fp32: it is compared too, for information)
EXPECTED_EQUAL = ("regmean: splice vs fusion-bench run in fp64", "fisher: splice vs fusion-bench")
TARGETS = [
    # (name, numerator case, denominator case, metric, target)
    ("regmean wall: splice / fusion-bench", "splice-regmean", "fusionbench-regmean", "wall_s", 1.0),
    ("regmean peak RSS: splice / fusion-bench", "splice-regmean", "fusionbench-regmean", "peak_rss_mb", 0.3),
    ("fisher wall: splice / fusion-bench", "splice-fisher", "fusionbench-fisher", "wall_s", 1.0),
    ("fisher peak RSS: splice / fusion-bench", "splice-fisher", "fusionbench-fisher", "peak_rss_mb", 0.3),
    ("regmean peak RSS: 1 GB models / 142 MB models", "splice-regmean-1gb", "splice-regmean", "peak_rss_mb", 1.3),
    (
        "regmean wall, 1 GB models: splice / fusion-bench",
        "splice-regmean-1gb",
        "fusionbench-regmean-1gb",
        "wall_s",
        1.0,
    ),
    (
        "regmean peak RSS, 1 GB models: splice / fusion-bench",
        "splice-regmean-1gb",
        "fusionbench-regmean-1gb",
        "peak_rss_mb",
        0.3,
    ),
]
STARTUP_OF = {
    "splice-regmean": "splice start-up",
    "splice-fisher": "splice start-up",
    "splice-regmean-1gb": "splice start-up",
    "fusionbench-regmean-1gb": "fusion-bench import",
    "fusionbench-regmean": "fusion-bench import",
    "fusionbench-fisher": "fusion-bench import",
}


# --------------------------------------------------------------------------------------------------
# Inputs: models, data, statistics
# --------------------------------------------------------------------------------------------------


def tokens(location: str) -> dict:
    """The `--data` hook: the task of the model at `location` (model_1, model_2, model_3), as 64 sequences of 64
    token ids drawn from its own slice of the vocabulary (no padding: fusion-bench's Grams count every position)."""
    import torch

    task = int(Path(location).name.rsplit("_", 1)[1])
    generator = torch.Generator().manual_seed(100 + task)
    ids = torch.randint(0, TASK_VOCABULARY, (SEQUENCES, SEQUENCE_LENGTH), generator=generator)
    ids = (ids + 1024 * task) % SPEC["vocab_size"]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def build_models(models_dir: Path, layers: int, rebuild: bool = False) -> list[Path]:
    """Three GPT-2 checkpoints of `layers` layers: one random base plus a seeded N(0, delta) per model."""
    spec = {**SPEC, "n_layer": layers}
    paths = [models_dir / name for name in MODEL_NAMES]
    stamp = models_dir / "spec.json"
    if not rebuild and stamp.is_file() and json.loads(stamp.read_text()) == spec:
        if all((p / "config.json").is_file() for p in paths):
            return paths
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    shutil.rmtree(models_dir, ignore_errors=True)
    config = GPT2Config(
        n_embd=spec["n_embd"],
        n_head=spec["n_head"],
        n_layer=layers,
        n_positions=spec["n_positions"],
        vocab_size=spec["vocab_size"],
        initializer_range=spec["init_std"],
        bos_token_id=spec["vocab_size"] - 1,
        eos_token_id=spec["vocab_size"] - 1,
    )
    torch.manual_seed(spec["base_seed"])
    model = GPT2LMHeadModel(config)
    base = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for path, seed in zip(paths, spec["seeds"]):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                tensor.copy_(base[name] + spec["finetune_delta_std"] * torch.randn(tensor.shape, generator=generator))
        model.save_pretrained(path)
    stamp.write_text(json.dumps(spec))
    print(f"models: 3 x {_size(paths[0]) / 1e6:.0f} MB ({layers} layers) in {time.perf_counter() - started:.0f} s")
    return paths


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def _splice() -> list[str]:
    return [sys.executable, "-m", "splice"]


def collect_statistics(workdir: Path, model: Path, kind: str, env: dict, rebuild: bool = False) -> Path:
    """splice's statistics artifact of `model` (`splice stats collect`), made once and cached. The collection run
    is measured (wall time, peak RSS: information, not a target) and recorded beside it."""
    samples = FISHER_SAMPLES if kind == "fisher" else SEQUENCES
    out = workdir / "stats" / model.parent.name / f"{model.name}-{kind}"
    stamp = out.parent / f"{out.name}.json"
    spec = {"model": json.loads((model.parent / "spec.json").read_text()), "samples": samples}
    if rebuild or not stamp.is_file() or json.loads(stamp.read_text())["spec"] != spec:
        argv = [*_splice(), "stats", "collect", str(model), "--data", f"{HERE / 'datamerge_bench.py'}:tokens"]
        argv += ["--kind", kind, "--samples", str(samples), "--out", str(out), "--device", "cpu", "--force"]
        run = measure(Case(f"collect-{kind}", argv, None, ""), -1, workdir, env)
        collected = {"wall_s": run.wall_s, "peak_rss_mb": run.peak_rss_mb, "mb": _size(out) / 1e6}
        stamp.write_text(json.dumps({"spec": spec, "collected": collected}))
        print(f"  {kind} statistics of {model.parent.name}/{model.name}: {run.wall_s:.1f} s, {collected['mb']:.0f} MB")
    return out


def collection_figures(artifacts: list[Path]) -> dict[str, dict]:
    """What each statistics collection cost, as recorded when it ran."""
    return {
        f"{path.parent.name}/{path.name}": json.loads((path.parent / f"{path.name}.json").read_text())["collected"]
        for path in artifacts
    }


def _artifact(directory: Path) -> tuple[dict, dict]:
    """(settings, tensors) of a splice statistics artifact."""
    from safetensors.torch import load_file

    settings = json.loads((directory / "patch.json").read_text())["settings"]
    return settings, load_file(directory / "tensors.safetensors")


def fusion_bench_statistics(artifact: Path) -> Path:
    """The artifact's numbers in fusion-bench's own format, as its GPT-2 algorithms would have computed them:
    RegMean {module name: X^T X / tokens} in fp32, one matrix per layer (splice stores a matrix once for the layers
    that share an input, summed over `tokens[key]` tokens); Fisher {parameter name: diagonal} as stored."""
    import torch
    from safetensors.torch import save_file

    out = artifact.parent / f"{artifact.name}.fusion-bench.safetensors"
    if out.is_file() and out.stat().st_mtime >= (artifact / "tensors.safetensors").stat().st_mtime:
        return out
    settings, tensors = _artifact(artifact)
    if settings["statistic"] == "gram":
        serves = {key: key for key in tensors} | settings.get("shared", {})  # layer weight -> its matrix
        converted = {
            weight.removesuffix(".weight"): (tensors[key] / settings["tokens"][key]).to(torch.float32).contiguous()
            for weight, key in serves.items()
        }
    else:
        converted = {name: tensor.to(torch.float32).contiguous() for name, tensor in tensors.items()}
    save_file(converted, out)
    return out


def fisher_model_weights(fishers: list[Path]) -> list[float]:
    """fusion-bench's normalize_fisher_weight: model i scaled by 1 / (||F_i|| + 1e-6) (the L2 norm over all its
    Fisher entries), normalised to sum 1, times its equal scaling coefficient 1/3. splice's Fisher merge takes
    per-model weights, so giving it these reproduces fusion-bench's default merge exactly."""
    import torch
    from safetensors.torch import load_file

    norms = []
    for path in fishers:
        diagonals = load_file(path)
        norms.append(float(torch.stack([torch.linalg.vector_norm(t) for t in diagonals.values()]).norm()))
    inverse = [1.0 / (norm + EPSILON) for norm in norms]
    return [value / sum(inverse) / len(fishers) for value in inverse]


# --------------------------------------------------------------------------------------------------
# The two tools
# --------------------------------------------------------------------------------------------------

# fusion-bench's side: its merging functions, called as its GPT-2 algorithms call them once they have computed
# their statistics (RegMeanAlgorithm.run, FisherMergingAlgorithm.run), on the state dicts and statistics from disk
# (safetensors load_file: memory-mapped). `dtype` float64 runs the same function on fp64 copies: the parity
# reference. Phase times and RSS are written to the job's report.
PEER_SCRIPT = r"""
import json, os, shutil, sys, time
started = time.perf_counter()
job = json.load(open(sys.argv[1]))
import torch
from safetensors.torch import load_file, save_file
from fusion_bench.method.fisher_merging.fisher_merging import merging_with_fisher_weights
from fusion_bench.method.regmean.regmean import merging_with_regmean_weights

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}

phases = {"import_s": time.perf_counter() - started, "after_import_mb": status()}
dtype = getattr(torch, job["dtype"])
mark = time.perf_counter()
states = [{k: v.to(dtype) for k, v in load_file(f"{m}/model.safetensors").items()} for m in job["models"]]
stats = [{k: v.to(dtype) for k, v in load_file(s).items()} for s in job["stats"]]
by_name = {name: [state[name] for state in states] for name in states[0]}
phases["load_s"] = time.perf_counter() - mark
mark = time.perf_counter()
with torch.no_grad():
    if job["method"] == "regmean":
        merged = merging_with_regmean_weights(by_name, stats, job["alpha"], weight_transpose=False)
    else:
        merged = merging_with_fisher_weights(
            by_name, stats, torch.ones(len(states)) / len(states), normalize_fisher_weight=True,
            minimal_fisher_weight=job["epsilon"],
        )
phases["merge_s"] = time.perf_counter() - mark
mark = time.perf_counter()
os.makedirs(job["out"])
save_file({k: v.to(torch.float32).contiguous() for k, v in merged.items()}, f"{job['out']}/model.safetensors",
          metadata={"format": "pt"})
shutil.copy(f"{job['models'][0]}/config.json", job["out"])
phases["save_s"] = time.perf_counter() - mark
phases["end_mb"] = status()
json.dump(phases, open(job["report"], "w"))
"""


@dataclass
class Inputs:
    """One size's three models and their statistics (splice's artifacts, fusion-bench's files)."""

    models: list[Path]
    grams: list[Path]
    fishers: list[Path] = field(default_factory=list)

    def peer(self, artifacts: list[Path]) -> list[str]:
        return [str(fusion_bench_statistics(path)) for path in artifacts]


def write_recipe(path: Path, method: str, inputs: Inputs, weights: list[float], **parameters) -> Path:
    lines = [f"merge_method: {method}", "models:"]
    for model, artifact, weight in zip(inputs.models, inputs.grams if method == "regmean" else inputs.fishers, weights):
        lines += [f"  - model: {model}", f"    stats: {artifact}", "    parameters:", f"      weight: {weight!r}"]
    lines += ["parameters:", *(f"  {key}: {value!r}" for key, value in parameters.items()), "dtype: float32"]
    path.write_text("\n".join(lines) + "\n")
    return path


def splice_case(name: str, recipe: Path, outs: Path) -> Case:
    argv = [*_splice(), "merge", str(recipe), "--out", str(outs / name), "--device", "cpu", "--quiet", "--force"]
    return Case(name, argv, outs / name, f"splice merge {recipe.name}")


def peer_case(name: str, workdir: Path, peer: str, job: dict) -> Case:
    """fusion-bench's merge as a `job` for PEER_SCRIPT, run by `peer` (an interpreter with fusion-bench)."""
    jobs = workdir / "jobs"
    jobs.mkdir(exist_ok=True)
    (jobs / f"{name}.json").write_text(json.dumps({**job, "report": str(jobs / f"{name}.report.json")}))
    argv = [peer, str(workdir / "peer_merge.py"), str(jobs / f"{name}.json")]
    return Case(name, argv, Path(job["out"]), f"fusion-bench {job['method']} ({job['dtype']})")


def build_cases(args, workdir: Path, small: Inputs, large: Inputs | None) -> tuple[list[Case], Case, list[float]]:
    """(the measured cases, fusion-bench's fp64 parity run, the Fisher model weights)."""
    outs = workdir / "outputs"
    outs.mkdir(exist_ok=True)
    weights = fisher_model_weights(small.peer(small.fishers))
    regmean = write_recipe(workdir / "regmean.yml", "regmean", small, [1.0] * 3, alpha=ALPHA)
    fisher = write_recipe(workdir / "fisher.yml", "fisher", small, weights, epsilon=EPSILON)
    job = {"models": [str(m) for m in small.models], "alpha": ALPHA, "epsilon": EPSILON, "dtype": "float32"}
    regmean_job = {**job, "method": "regmean", "stats": small.peer(small.grams)}
    fisher_job = {**job, "method": "fisher", "stats": small.peer(small.fishers)}
    cases = [
        splice_case("splice-regmean", regmean, outs),
        peer_case("fusionbench-regmean", workdir, args.peer_python, {**regmean_job, "out": str(outs / "fb-regmean")}),
        splice_case("splice-fisher", fisher, outs),
        peer_case("fusionbench-fisher", workdir, args.peer_python, {**fisher_job, "out": str(outs / "fb-fisher")}),
    ]
    if large is not None:
        recipe = write_recipe(workdir / "regmean-1gb.yml", "regmean", large, [1.0] * 3, alpha=ALPHA)
        cases.append(splice_case("splice-regmean-1gb", recipe, outs))
        if args.peer_large:
            large_job = {**job, "models": [str(m) for m in large.models], "method": "regmean"}
            large_job |= {"stats": large.peer(large.grams), "out": str(outs / "fb-regmean-1gb")}
            cases.append(peer_case("fusionbench-regmean-1gb", workdir, args.peer_python, large_job))
    fp64 = {**regmean_job, "dtype": "float64", "out": str(outs / "fb-regmean-fp64")}
    return cases, peer_case("fusionbench-regmean-fp64", workdir, args.peer_python, fp64), weights


def baseline_cases(peer: str) -> list[Case]:
    py = sys.executable
    imports = "import fusion_bench.method.regmean.regmean, fusion_bench.method.fisher_merging.fisher_merging"
    splice = "import splice.cli.app, splice.merge.recipe, splice.merge.stats.datamerge, splice.workflows.stats"
    return [
        Case("import torch", [py, "-c", "import torch"], None, "python -c 'import torch'"),
        Case("fusion-bench import", [peer, "-c", f"import safetensors.torch; {imports}"], None, "its merge functions"),
        Case("splice start-up", [py, "-c", splice], None, "the CLI and the data-merge engine imported"),
    ]


# --------------------------------------------------------------------------------------------------
# Running, checking, reporting
# --------------------------------------------------------------------------------------------------


def summarize(runs: list[Run]) -> dict[str, dict]:
    summary = {}
    for name in dict.fromkeys(r.case for r in runs):
        timed = [r for r in runs if r.case == name and r.round >= 0]
        if timed:
            walls = [r.wall_s for r in timed]
            summary[name] = {
                "runs": len(timed),
                "wall_s": statistics.median(walls),
                "wall_min_s": min(walls),
                "wall_max_s": max(walls),
                "peak_rss_mb": statistics.median(r.peak_rss_mb for r in timed),
                "peak_rss_max_mb": max(r.peak_rss_mb for r in timed),
                "peak_anon_mb": statistics.median(r.peak_anon_mb or 0 for r in timed),
                "cpu_s": statistics.median(r.cpu_s for r in timed),
                "other_load": max((r.other_load for r in timed if r.other_load is not None), default=None),
            }
    for row in summary.values():
        row["net_wall_s"] = None
    for name, startup in STARTUP_OF.items():
        if name in summary and startup in summary:
            summary[name]["net_wall_s"] = summary[name]["wall_s"] - summary[startup]["wall_s"]
    return summary


def ratios_of(summary: dict) -> list[dict]:
    found = []
    for name, numerator, denominator, metric, target in TARGETS:
        if numerator in summary and denominator in summary:
            value = summary[numerator][metric] / summary[denominator][metric]
            found.append({"name": name, "value": value, "target": target, "met": value <= target})
    return found


def check_outputs(outs: Path, names: set[str]) -> dict[str, dict]:
    """Max |difference| of the outputs, tensor by tensor. fusion-bench's fp64 run tells its fp32 rounding from
    splice's (splice solves RegMean in fp64)."""
    pairs = [
        ("regmean: splice vs fusion-bench", "splice-regmean", "fb-regmean"),
        ("regmean: splice vs fusion-bench run in fp64", "splice-regmean", "fb-regmean-fp64"),
        ("regmean: fusion-bench vs itself in fp64", "fb-regmean", "fb-regmean-fp64"),
        ("fisher: splice vs fusion-bench", "splice-fisher", "fb-fisher"),
        ("regmean 1 GB: splice vs fusion-bench", "splice-regmean-1gb", "fb-regmean-1gb"),
    ]
    return {
        label: compare(outs / left, outs / right, PARITY_TOLERANCE)
        for label, left, right in pairs
        if (outs / left).is_dir() and (outs / right).is_dir() and {left, right} <= names
    }


def print_report(summary: dict, phases: dict, ratios: list[dict], checks: dict, repeats: int, model_mb: dict) -> None:
    sizes = f"3 x {model_mb['small']:.0f} MB" + (f" (1gb: 3 x {model_mb['large']:.0f} MB)" if model_mb["large"] else "")
    print(f"\nmedians of {repeats} round(s); GPT-2 models, {sizes}")
    header = f"{'case':<24} {'wall s':>7} {'min-max':>13} {'- start-up':>10} {'peak RSS MB':>11} {'anon MB':>7}"
    print(f"  {header} {'CPU s':>6} {'other load':>10}")
    for name, row in summary.items():
        net = "-" if row["net_wall_s"] is None else f"{row['net_wall_s']:.2f}"
        print(
            f"  {name:<24} {row['wall_s']:7.2f} {row['wall_min_s']:6.2f}-{row['wall_max_s']:<6.2f} {net:>10} "
            f"{row['peak_rss_mb']:11.0f} {row['peak_anon_mb']:7.0f} {row['cpu_s']:6.1f} {row['other_load'] or 0:10.2f}"
        )
    for name, runs in phases.items():
        timed = [p for p in runs if p["round"] >= 0] or runs
        medians = {key: statistics.median(p[key] for p in timed) for key in ("import_s", "load_s", "merge_s", "save_s")}
        print(f"  {name}, inside: " + ", ".join(f"{key} {value:.2f}" for key, value in medians.items()))
    for ratio in ratios:
        verdict = "met" if ratio["met"] else "MISSED"
        print(f"  {ratio['name']:<48} {ratio['value']:6.2f}  (target <= {ratio['target']}: {verdict})")
    for label, check in checks.items():
        if "error" in check:
            print(f"  {label}: {check['error']}")
            continue
        print(
            f"  {label}: max |diff| {check['max_abs_diff']:.2e} ({check['worst_tensor']}), "
            f"{check['elements_over_tolerance']} of {check['elements']} elements over {PARITY_TOLERANCE:g}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="models, statistics, outputs, results")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (1 for a quick look); medians reported")
    parser.add_argument("--warmup", action="store_true", help="an untimed round first")
    parser.add_argument("--only", nargs="+", metavar="CASE", help="a subset of the cases (see the module doc)")
    parser.add_argument("--no-large", action="store_true", help="skip the 1 GB models (no RSS-by-size check)")
    parser.add_argument("--peer-large", action="store_true", help="fusion-bench on the 1 GB models too (~10 GB RAM)")
    parser.add_argument("--peer-python", default=sys.executable, help="an interpreter with fusion-bench installed")
    parser.add_argument("--quiet-wait", type=float, default=20.0, help="wait up to S s for the machine to go quiet")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the models and statistics")
    args = parser.parse_args(argv)

    workdir = args.workdir.resolve()
    prepare_workdir(workdir)
    (workdir / "peer_merge.py").write_text(PEER_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    peer_env = {**env, "PYTHONPATH": ""}  # fusion-bench's interpreter on its own

    started = time.perf_counter()
    models = build_models(workdir / "models-small", LAYERS["small"], args.rebuild)
    small = Inputs(
        models,
        [collect_statistics(workdir, m, "gram", env, args.rebuild) for m in models],
        [collect_statistics(workdir, m, "fisher", env, args.rebuild) for m in models],
    )
    large = None
    if not args.no_large:
        models = build_models(workdir / "models-large", LAYERS["large"], args.rebuild)
        large = Inputs(models, [collect_statistics(workdir, m, "gram", env, args.rebuild) for m in models])
    cases, reference, weights = build_cases(args, workdir, small, large)
    print(f"inputs ready in {time.perf_counter() - started:.0f} s")
    baselines = baseline_cases(args.peer_python)
    if args.only:
        unknown = set(args.only) - {c.name for c in cases + baselines}
        if unknown:
            parser.error(f"unknown case(s) {sorted(unknown)}")
        cases = [c for c in cases if c.name in args.only]
        needed = {STARTUP_OF.get(c.name) for c in cases} | set(args.only)
        baselines = [c for c in baselines if c.name in needed]

    runs: list[Run] = []
    phases: dict[str, list] = {}

    def record(case: Case, round_index: int) -> None:
        fusion_bench = case.name.startswith("fusion")
        run = measure(case, round_index, workdir, peer_env if fusion_bench else env, args.quiet_wait, 0.25)
        runs.append(run)
        label = "warm-up" if round_index < 0 else f"round {round_index + 1}/{args.repeats}"
        print(
            f"  [{label}] {case.name:<24} {run.wall_s:7.2f} s  peak RSS {run.peak_rss_mb:6.0f} MB  "
            f"CPU {run.cpu_s:5.1f} s  other load {run.other_load or 0:.2f}",
            flush=True,
        )
        if fusion_bench and case.out is not None:
            report = json.loads((workdir / "jobs" / f"{case.name}.report.json").read_text())
            phases.setdefault(case.name, []).append({**report, "round": round_index})

    for round_index in range(-1 if args.warmup else 0, args.repeats):
        shift = max(round_index, 0) % len(cases)  # rotated, so no case always follows the same one
        for case in baselines + cases[shift:] + cases[:shift]:
            record(case, round_index)
    names = {Path(c.out).name for c in cases if c.out is not None}
    if "fb-regmean" in names:
        record(reference, -1)  # once, untimed: the parity reference
        names.add("fb-regmean-fp64")

    summary = summarize(runs)
    ratios = ratios_of(summary)
    checks = check_outputs(workdir / "outputs", names)
    model_mb = {"small": _size(small.models[0]) / 1e6, "large": _size(large.models[0]) / 1e6 if large else None}
    print_report(summary, phases, ratios, checks, args.repeats, model_mb)
    sources = sorted({r.splice_source for r in runs})
    artifacts = small.grams + small.fishers + (large.grams if large else [])
    results = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": {**machine_info(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "peer_python": args.peer_python,
        "spec": SPEC,
        "layers": LAYERS,
        "model_mb": model_mb,
        "cases": {c.name: c.argv for c in baselines + cases},
        "summary": summary,
        "fusion_bench_phases": phases,
        "ratios": ratios,
        "checks": checks,
        "fisher_model_weights": weights,
        "statistics": collection_figures(artifacts),
        "splice_sources": sources,
        "runs": [asdict(r) for r in runs],
    }
    (workdir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"results: {workdir / 'results.json'}")
    if len(sources) > 1:
        print("WARNING: splice's sources changed during the runs; its figures mix versions.")
    return 0 if all(checks[label].get("ok") for label in EXPECTED_EQUAL if label in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
