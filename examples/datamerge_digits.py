"""Merging with a little data on a small real task: averaging, task arithmetic and TIES against Fisher, RegMean and
RegMean++ merges of tiny ViTs fine-tuned on domains of scikit-learn's 8x8 digits.

Protocol (per seed; seeds 0, 1, 2 by default):
- The 1,797 digits are shuffled with the seed: 40% (719 images) pretrain, the other 1,078 are cut 60/15/25 into
  the tasks' train (647), val (162) and test (269) images. Every task uses the same images, each in its own domain.
- Pretrained model: a `ViTForImageClassification` built here from a tiny `ViTConfig` (8x8 inputs, patch 2, so 16
  patches and a CLS token; hidden 64, 2 layers, 4 heads, MLP 128; 69k parameters; nothing downloaded), trained on
  the clean pretraining images, 10-way (600 steps, AdamW 2e-3, cosine, 1-pixel shifts and pixel noise).
- Tasks: the same 10-way digit task in 5 domains the pretrained model never saw: the top, bottom, left or right 3
  of the 8 rows/columns erased (occlusion), or a 3x3 blur. One fine-tune per task from the pretrained model (every
  weight, AdamW 3e-4, 200 steps), saved with `save_pretrained` (safetensors).
- Why domains of one task with one shared head rather than class subsets with their own heads: splice merges whole
  checkpoints, head included. With a shared 10-way head every tensor of the fine-tunes means the same thing in each,
  so merging the head is meaningful and the merged model is one ordinary transformers model, scored on each task as
  it is. Class subsets with per-task heads would need the heads kept out of the merge (FusionBench keeps CLIP's
  text heads frozen) or relabelled rows that mean different digits in different models. Domains also give each
  task its own input distribution, which is what the data-dependent merges use (RegMean's Gram matrices, Fisher's
  sensitivities). Domains that remap space (rotations, flips, a transpose) or change intensities wholesale
  (inversion, low contrast) were tried first (seed 0, not kept) and left out: their fine-tunes reached 63-96% on
  their own tasks, but averaging, task arithmetic, RegMean and Fisher merges of them all stayed within 0-8 points
  of the pretrained model's average, too close to the floor to tell methods apart.
- Reference: a multi-task model, fine-tuned from the pretrained model on every task's training images at once (as
  many steps as the five fine-tunes together): what one model trained on all the data reaches.
- Merges (`splice.merge` on a recipe; every method merges all tensors): averaging (linear, equal weights); task
  arithmetic (base + lambda * sum of task vectors) and TIES (density 0.2, sign election, disjoint mean, lambda),
  their `lambda` picked on the val images (mean val accuracy over tasks) from a small grid, since they have no
  data of their own; Fisher (each fine-tune's diagonal Fisher, labels sampled from the model, splice's default
  epsilon) and RegMean (each fine-tune's input Gram matrices, alpha 0.9), both from statistics artifacts that
  `collect_stats` (`splice stats collect`) writes; RegMean++ (Grams taken layer by layer through the merged model,
  from each task's data hook in this file) where this splice has it. The statistics use the first 256 training
  images of each task, no labels. A method splice does not have is left out of the results.
- Scores: test accuracy of every model on every task; the statistics' size on disk and collection time; each
  merge's wall time; mean and spread (population std) over the seeds.

    python examples/datamerge_digits.py --report DIR [--seeds 0 1 2] [--workdir DIR] [--quick] [--force]

Writes DIR/datamerge_digits.json (every number, per seed and summarised) and DIR/datamerge_digits.png (accuracy
matrix, average accuracy per merge) under the output rule (existing report files are refused unless --force), and
prints the table. Models and statistics go to --workdir (default: a temporary directory, removed at the end).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers

import splice
from splice.arch.quiet import quiet_transformers
from splice.demo import digits
from splice.merge.recipe import parse_recipe
from splice.plots import png_bytes
from splice.tensors.writer import check_report_dir, ensure_output_free, write_report_files
from splice.workflows.merge import merged_model

JSON_NAME = "datamerge_digits.json"
PNG_NAME = "datamerge_digits.png"
SEED_VARIABLE = "DATAMERGE_DIGITS_SEED"  # the data hooks read the seed from here (recipes load them by path)
HERE = Path(__file__).resolve()
PRETRAIN_FRACTION = 0.4  # of all images
TASK_FRACTIONS = {"train": 0.6, "val": 0.15}  # of the rest; test takes what is left
TASKS = ("occlude-top", "occlude-bottom", "occlude-left", "occlude-right", "blur")
ERASED = 3  # rows or columns an occlusion erases, of 8
FUSIONBENCH_ORDER = ("RegMean++", "RegMean", "TIES", "Fisher", "task arithmetic", "averaging")


@dataclass(frozen=True)
class Settings:
    pretrain_steps: int = 600
    pretrain_lr: float = 2e-3
    finetune_steps: int = 200
    finetune_lr: float = 3e-4
    multitask_steps: int = 1000  # the multi-task reference: each image as often as in its own task's fine-tune
    batch_size: int = 64
    stats_samples: int = 256  # per task, for the Grams, the Fisher and RegMean++
    task_arithmetic_lambdas: tuple[float, ...] = (0.2, 0.3, 0.5, 0.7, 1.0)  # 0.2 = 1/5 tasks: averaging
    ties_lambdas: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
    ties_density: float = 0.2  # TIES' top-20% (Yadav et al. 2023)
    regmean_alpha: float = 0.9  # RegMean's off-diagonal shrinkage (Jin et al. 2023; FusionBench's default)


FULL = Settings()
QUICK = Settings(
    pretrain_steps=150,
    finetune_steps=60,
    finetune_lr=1e-3,
    multitask_steps=100,
    stats_samples=48,
    task_arithmetic_lambdas=(0.3, 1.0),
    ties_lambdas=(1.0,),
)


# ---------------------------------------------------------------------------------------------------------------
# data: the splits, the domains, and the statistics' data hooks


@functools.cache
def _split(seed: int) -> dict[str, digits.Split]:
    """pretrain / train / val / test, a seeded shuffle of all images (the task splits in the clean domain)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = round(PRETRAIN_FRACTION * len(y))
    parts = {"pretrain": digits.Split(x[order[:cut]], y[order[:cut]])}
    rest, start = order[cut:], 0
    for name, fraction in TASK_FRACTIONS.items():
        stop = start + round(fraction * len(rest))
        parts[name] = digits.Split(x[rest[start:stop]], y[rest[start:stop]])
        start = stop
    parts["test"] = digits.Split(x[rest[start:]], y[rest[start:]])
    return parts


def in_domain(task: str, x: torch.Tensor) -> torch.Tensor:
    """Images [N, 1, 8, 8] as task `task` sees them."""
    x = x.clone()
    if task == "occlude-top":
        x[..., :ERASED, :] = 0
    elif task == "occlude-bottom":
        x[..., -ERASED:, :] = 0
    elif task == "occlude-left":
        x[..., :, :ERASED] = 0
    elif task == "occlude-right":
        x[..., :, -ERASED:] = 0
    elif task == "blur":
        kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
        x = (1.6 * F.conv2d(x, kernel[None, None], padding=1)).clamp(0.0, 1.0)  # 1.6: the blur's lost contrast
    else:
        raise KeyError(task)
    return x


def task_split(task: str, part: str, seed: int) -> digits.Split:
    x, y = _split(seed)[part]
    return digits.Split(in_domain(task, x), y)


def study_seed() -> int:
    return int(os.environ.get(SEED_VARIABLE, "0"))


def task_inputs(task: str) -> dict[str, torch.Tensor]:
    """The statistics' data: task `task`'s training images (no labels: Grams need none, and the Fisher samples its
    labels from the model); `samples` takes the first N, a seeded random subset."""
    return {"pixel_values": task_split(task, "train", study_seed()).x}


def data_occlude_top() -> dict[str, torch.Tensor]:
    return task_inputs("occlude-top")


def data_occlude_bottom() -> dict[str, torch.Tensor]:
    return task_inputs("occlude-bottom")


def data_occlude_left() -> dict[str, torch.Tensor]:
    return task_inputs("occlude-left")


def data_occlude_right() -> dict[str, torch.Tensor]:
    return task_inputs("occlude-right")


def data_blur() -> dict[str, torch.Tensor]:
    return task_inputs("blur")


def data_hook(task: str) -> str:
    """The `--data`-style reference to task `task`'s hook, FILE.py:FUNCTION (what recipes and statistics record)."""
    return f"{HERE}:data_{task.replace('-', '_')}"


@contextmanager
def seed_variable(seed: int) -> Iterator[None]:
    previous = os.environ.get(SEED_VARIABLE)
    os.environ[SEED_VARIABLE] = str(seed)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(SEED_VARIABLE, None)
        else:
            os.environ[SEED_VARIABLE] = previous


# ---------------------------------------------------------------------------------------------------------------
# models


def model_config() -> transformers.ViTConfig:
    return transformers.ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=10,
    )


def save(model: torch.nn.Module, directory: Path) -> Path:
    with quiet_transformers():
        model.save_pretrained(directory)  # safetensors
    return directory


def pretrain(directory: Path, seed: int, settings: Settings) -> dict[str, Any]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.ViTForImageClassification(model_config())
    losses = digits.train(
        model,
        _split(seed)["pretrain"],
        lr=settings.pretrain_lr,
        steps=settings.pretrain_steps,
        seed=seed,
        batch_size=settings.batch_size,
        augmentation=digits.Augmentation(noise=0.05, shift=1),
    )
    save(model, directory)
    return {
        "steps": settings.pretrain_steps,
        "final_loss": losses[-1],
        "parameters": model.num_parameters(),
        "clean_test_accuracy": digits.accuracy(model, *_split(seed)["test"]),  # the images the tasks test, undistorted
    }


def fine_tune(
    pretrained: Path, data: digits.Split, directory: Path, seed: int, steps: int, settings: Settings
) -> dict[str, Any]:
    model = digits.load_model(pretrained)
    losses = digits.train(model, data, lr=settings.finetune_lr, steps=steps, seed=seed, batch_size=settings.batch_size)
    save(model, directory)
    return {"steps": steps, "images": len(data.y), "final_loss": losses[-1]}


def all_tasks(part: str, seed: int) -> digits.Split:
    """Every task's `part` images together: the multi-task model's data."""
    splits = [task_split(task, part, seed) for task in TASKS]
    return digits.Split(torch.cat([s.x for s in splits]), torch.cat([s.y for s in splits]))


def accuracies(model: torch.nn.Module, part: str, seed: int) -> dict[str, float]:
    """{task: accuracy on its `part` images}; `model` a transformers ViT."""
    return {task: digits.accuracy(model, *task_split(task, part, seed)) for task in TASKS}


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


# ---------------------------------------------------------------------------------------------------------------
# merges: the recipes, and what picks a data-free method's lambda


def recipe_for(method: str, pretrained: Path, tuned: dict[str, Path], stats: dict[str, dict[str, Path]], **values):
    """The splice recipe (as a dict) of `method` over the fine-tunes `tuned` ({task: directory})."""
    models = list(tuned.values())
    if method == "averaging":
        return {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models]}
    if method == "task arithmetic":
        return {
            "merge_method": "task_arithmetic",
            "base_model": str(pretrained),
            "parameters": {"lambda": values["lambda"], "normalize": False},  # base + lambda * sum of task vectors
            "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
        }
    if method == "TIES":
        return {
            "merge_method": "ties",
            "base_model": str(pretrained),
            "parameters": {"lambda": values["lambda"], "normalize": True},  # the disjoint mean
            "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": values["density"]}} for m in models],
        }
    if method == "Fisher":
        return {
            "merge_method": "fisher",
            "models": [
                {"model": str(m), "stats": str(stats["fisher"][t]), "parameters": {"weight": 1.0}}
                for t, m in tuned.items()
            ],
        }
    if method == "RegMean":
        return {
            "merge_method": "regmean",
            "parameters": {"alpha": values["alpha"]},
            "models": [{"model": str(m), "stats": str(stats["gram"][t])} for t, m in tuned.items()],
        }
    if method == "RegMean++":
        return {
            "merge_method": "regmean_plusplus",
            "parameters": {"alpha": values["alpha"], "samples": values["samples"]},
            "models": [{"model": str(m), "data": data_hook(t)} for t, m in tuned.items()],
        }
    raise KeyError(method)


def lambda_recipe(method: str, pretrained: Path, tuned: dict[str, Path], extra: dict, value: float) -> dict:
    return recipe_for(method, pretrained, tuned, {}, **{"lambda": value, **extra})


def pick_lambda(
    lambdas: Sequence[float], make: Callable[[float], dict], template: torch.nn.Module, seed: int
) -> tuple[float, dict[str, float]]:
    """The lambda of `lambdas` whose merge (held in memory) scores best on the val images, mean over tasks (the
    first on a tie); and each lambda's score."""
    scores = {}
    for value in lambdas:
        state = merged_model(parse_recipe(make(value)), run=splice.RunOptions(device="cpu")).state
        scores[f"{value:g}"] = mean(list(accuracies(digits.load_state(template, state), "val", seed).values()))
    best = max(lambdas, key=lambda value: scores[f"{value:g}"])
    return best, scores


METHODS = {  # the study's name -> splice's merge_method
    "averaging": "linear",
    "task arithmetic": "task_arithmetic",
    "TIES": "ties",
    "Fisher": "fisher",
    "RegMean": "regmean",
    "RegMean++": "regmean_plusplus",
}


def available_methods() -> list[str]:
    """The study's methods this splice can run: the data-dependent ones (issue 20) arrive one by one; a method
    splice does not know yet is left out of the results, never approximated."""
    from splice.merge.methods import SPLICE_METHODS, method_names

    known = {*method_names(), *SPLICE_METHODS}
    return [name for name, method in METHODS.items() if method in known]


def collect(model: Path, task: str, kind: str, out: Path, settings: Settings) -> dict[str, Any]:
    """One statistics artifact of `kind` for the fine-tune `model` on task `task`'s data; its time and size."""
    from splice import collect_stats

    started = time.perf_counter()
    outcome = collect_stats(
        str(model), data_hook(task), kind=kind, out=str(out), samples=settings.stats_samples, device="cpu"
    )
    seconds = time.perf_counter() - started
    size = sum(path.stat().st_size for path in out.rglob("*") if path.is_file())
    return {
        "seconds": seconds,  # the whole call: checks, loading the model and the data, the pass, writing
        "pass_seconds": outcome.seconds,  # the pass through the model alone
        "bytes": size,  # the artifact on disk: tensors.safetensors + patch.json
        "tensor_bytes": outcome.nbytes,
        "path": str(out),
    }


# ---------------------------------------------------------------------------------------------------------------
# one seed


def run_seed(workdir: Path, seed: int, settings: Settings, methods: Sequence[str]) -> dict[str, Any]:
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    workdir.mkdir(parents=True)
    pretrained = workdir / "pretrained"
    pretraining = pretrain(pretrained, seed, settings)
    seconds["pretrain"] = time.perf_counter() - started

    tuned, tuning = {}, {}
    mark = time.perf_counter()
    for index, task in enumerate(TASKS):
        tuned[task] = workdir / f"fine-tuned-{task}"
        data = task_split(task, "train", seed)
        tuning[task] = fine_tune(
            pretrained, data, tuned[task], 1000 * seed + index + 1, settings.finetune_steps, settings
        )
    seconds["fine-tune"] = time.perf_counter() - mark
    # the reference a merge aims at: one model fine-tuned on every task's data
    joint, mark = workdir / "multi-task", time.perf_counter()
    data, steps = all_tasks("train", seed), settings.multitask_steps
    tuning["multi-task"] = fine_tune(pretrained, data, joint, 1000 * seed, steps, settings)
    seconds["multi-task"] = time.perf_counter() - mark

    models: dict[str, dict[str, dict[str, float]]] = {}
    references = {"pretrained": pretrained, **{f"fine-tuned {t}": d for t, d in tuned.items()}, "multi-task": joint}
    for name, directory in references.items():
        model = digits.load_model(directory)
        models[name] = {"test": accuracies(model, "test", seed), "val": accuracies(model, "val", seed)}

    stats: dict[str, dict[str, Path]] = {}
    collected: dict[str, dict[str, dict[str, Any]]] = {}
    for kind, method in (("gram", "RegMean"), ("fisher", "Fisher")):
        if method in methods:
            collected[kind] = {t: collect(tuned[t], t, kind, workdir / f"stats-{kind}-{t}", settings) for t in TASKS}
            stats[kind] = {t: Path(c["path"]) for t, c in collected[kind].items()}

    template = digits.load_model(pretrained)
    merges: dict[str, dict[str, Any]] = {}
    for method in methods:
        values: dict[str, Any] = {}
        mark = time.perf_counter()
        if method in ("task arithmetic", "TIES"):
            lambdas = settings.task_arithmetic_lambdas if method == "task arithmetic" else settings.ties_lambdas
            extra = {"density": settings.ties_density} if method == "TIES" else {}
            values["lambda"], values["val_by_lambda"] = pick_lambda(
                lambdas,
                functools.partial(lambda_recipe, method, pretrained, tuned, extra),
                template,
                seed,
            )
            values.update(extra)
        if method.startswith("RegMean"):
            values["alpha"] = settings.regmean_alpha
        if method == "RegMean++":
            values["samples"] = settings.stats_samples
        picked = time.perf_counter() - mark
        recipe = recipe_for(method, pretrained, tuned, stats, **values)
        out = workdir / f"merged-{method.replace(' ', '-').replace('+', 'p')}"
        mark = time.perf_counter()
        splice.merge(parse_recipe(recipe), out, device="cpu")
        merge_seconds = time.perf_counter() - mark
        model = digits.load_model(out)  # the merged model, reloaded by transformers
        models[method] = {"test": accuracies(model, "test", seed), "val": accuracies(model, "val", seed)}
        merges[method] = {
            **values,
            "merge_seconds": merge_seconds,
            "search_seconds": picked,
            "directory": str(out),
        }
    seconds["total"] = time.perf_counter() - started
    return {
        "seed": seed,
        "pretraining": pretraining,
        "model_bytes": (pretrained / "model.safetensors").stat().st_size,
        "fine-tuning": tuning,
        "models": models,
        "merges": merges,
        "statistics": collected,
        "seconds": seconds,
    }


# ---------------------------------------------------------------------------------------------------------------
# over seeds


def spread(values: Sequence[float]) -> dict[str, Any]:
    return {"mean": mean(values), "std": statistics.pstdev(values), "per_seed": list(values)}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over the seeds: per model and task, of each row's average over tasks, of the fine-tunes on
    their own tasks ("fine-tuned (own task)": FusionBench's "individual" row), and of the statistics' cost."""
    rows: dict[str, dict[str, Any]] = {}
    for name in runs[0]["models"]:
        tests = [run["models"][name]["test"] for run in runs]
        rows[name] = {task: spread([t[task] for t in tests]) for task in TASKS}
        rows[name]["average"] = spread([mean([t[task] for task in TASKS]) for t in tests])
    own = [{task: run["models"][f"fine-tuned {task}"]["test"][task] for task in TASKS} for run in runs]
    rows["fine-tuned (own task)"] = {task: spread([o[task] for o in own]) for task in TASKS}
    rows["fine-tuned (own task)"]["average"] = spread([mean(list(o.values())) for o in own])
    merges = list(runs[0]["merges"])
    individual = rows["fine-tuned (own task)"]["average"]["per_seed"]
    normalized = {
        method: spread([a / i for a, i in zip(rows[method]["average"]["per_seed"], individual)]) for method in merges
    }
    costs: dict[str, Any] = {}
    for kind in runs[0]["statistics"]:
        per = [c for run in runs for c in run["statistics"][kind].values()]
        costs[kind] = {
            "bytes_per_model": spread([c["bytes"] for c in per]),
            "seconds_per_model": spread([c["seconds"] for c in per]),
            "models_per_seed": len(TASKS),
            "pass_seconds_per_model": spread([c["pass_seconds"] for c in per]),
        }
    merge_seconds = {m: spread([run["merges"][m]["merge_seconds"] for run in runs]) for m in merges}
    order = sorted(merges, key=lambda m: -rows[m]["average"]["mean"])
    return {
        "accuracy": rows,
        "normalized_accuracy": normalized,
        "statistics": costs,
        "merge_seconds": merge_seconds,
        "ordering": order,
        "fusionbench_ordering": [m for m in FUSIONBENCH_ORDER if m in merges],
    }


@contextmanager
def study_workspace(
    report: Path, workdir: Path | None, force: bool, names: Sequence[str], prefix: str
) -> Iterator[Path]:
    """Where a study's models go, once its report files `names` in `report` are known to be free (refused if they
    exist, unless `force`): `workdir` (refused if it exists, unless `force`: then replaced) or a temporary directory
    removed at the end; torch runs on one thread meanwhile (the studies' timings are single-threaded)."""
    check_report_dir(report, [workdir] if workdir is not None else [], list(names), force)
    if workdir is not None:
        ensure_output_free(workdir, force, parameter_name="workdir")
        shutil.rmtree(workdir, ignore_errors=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix=prefix) as scratch:
            yield workdir if workdir is not None else Path(scratch)
    finally:
        torch.set_num_threads(threads)


def versions() -> dict[str, str]:
    """The versions a study's numbers were measured with."""
    return {"torch": torch.__version__, "transformers": transformers.__version__, "splice": splice.__version__}


def run_study(
    report: Path,
    seeds: Sequence[int],
    settings: Settings,
    *,
    workdir: Path | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """The study over `seeds`; the report's JSON and PNG written into `report` (existing ones refused unless
    `force`); models and statistics in `workdir` (refused if it exists, unless `force`: then replaced), else in a
    temporary directory removed at the end."""
    protected = [workdir] if workdir is not None else []
    methods = available_methods()
    with study_workspace(report, workdir, force, [JSON_NAME, PNG_NAME], "splice-datamerge-digits-") as where:
        runs = []
        for seed in seeds:
            with seed_variable(seed):
                runs.append(run_seed(where / f"seed-{seed}", seed, settings, methods))
    results = {
        "settings": asdict(settings),
        "tasks": list(TASKS),
        "seeds": list(seeds),
        "methods": methods,
        "methods_missing": [m for m in METHODS if m not in methods],
        "summary": summarise(runs),
        "runs": runs,
        "versions": versions(),
    }
    write_report_files(
        report,
        {
            JSON_NAME: (json.dumps(results, indent=2) + "\n").encode(),
            PNG_NAME: png_bytes(draw(results), size=(13.0, 5.5)),
        },
        force,
        protected,
    )
    return results


# ---------------------------------------------------------------------------------------------------------------
# the table and the figure


def row_names(results: dict[str, Any]) -> list[str]:
    accuracy = results["summary"]["accuracy"]
    tuned = [f"fine-tuned {task}" for task in results["tasks"]]
    references = ("pretrained", *tuned, "fine-tuned (own task)", "multi-task")
    return [*references, *(m for m in accuracy if m not in references)]


def table(results: dict[str, Any]) -> str:
    summary = results["summary"]
    accuracy = summary["accuracy"]

    def cell(value: dict[str, Any]) -> str:
        return f"{100 * value['mean']:.1f} ± {100 * value['std']:.1f}"

    lines = [
        "| model | " + " | ".join(results["tasks"]) + " | average | normalized |",
        "|---|" + "---:|" * (len(results["tasks"]) + 2),
    ]
    for name in row_names(results):
        row = accuracy[name]
        normalized = summary["normalized_accuracy"].get(name)
        lines.append(
            f"| {name} | "
            + " | ".join(cell(row[task]) for task in results["tasks"])
            + f" | {cell(row['average'])} | {cell(normalized) if normalized else ''} |"
        )
    model_bytes = results["runs"][0]["model_bytes"]
    lines.append("")
    for kind, cost in summary["statistics"].items():
        size = cost["bytes_per_model"]["mean"]
        lines.append(
            f"statistics `{kind}`: {size / 1024:.0f} KiB per model on disk ({size / model_bytes:.2f}x the model's "
            f"{model_bytes / 1024:.0f} KiB), {cost['seconds_per_model']['mean']:.2f} ± "
            f"{cost['seconds_per_model']['std']:.2f} s to collect (the pass alone "
            f"{cost['pass_seconds_per_model']['mean']:.2f} s)"
        )
    if "RegMean++" in summary["merge_seconds"]:
        lines.append("RegMean++ keeps no statistics: it takes its Grams from the data hooks during the merge")
    lines.append(
        "merge wall s: "
        + ", ".join(f"{m} {v['mean']:.2f}" for m, v in summary["merge_seconds"].items())
        + f"\nordering by average accuracy: {' > '.join(summary['ordering'])}"
        + f"\nFusionBench's ordering:        {' > '.join(summary['fusionbench_ordering'])}"
    )
    return "\n".join(lines)


def draw(results: dict[str, Any]) -> Callable[[Any], None]:
    def _draw(figure: Any) -> None:
        import numpy as np

        heat, bars = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1.5, 1]})
        accuracy = results["summary"]["accuracy"]
        names = row_names(results)
        columns = [*results["tasks"], "average"]
        grid = np.array([[accuracy[n][c]["mean"] for c in columns] for n in names])
        image = heat.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i in range(len(names)):
            for j in range(len(columns)):
                value = grid[i, j]
                color = "white" if value < 0.6 else "black"
                heat.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize="x-small", color=color)
        heat.set_xticks(range(len(columns)), columns, rotation=30, ha="right", fontsize="small")
        heat.set_yticks(range(len(names)), names, fontsize="small")
        heat.set_title(f"test accuracy %, mean over seeds {results['seeds']}", fontsize="medium")
        figure.colorbar(image, ax=heat, shrink=0.8)

        merges = [n for n in names if n in results["summary"]["normalized_accuracy"]]
        shown = ["pretrained", "fine-tuned (own task)", "multi-task", *merges]
        means = [accuracy[n]["average"]["mean"] for n in shown]
        stds = [accuracy[n]["average"]["std"] for n in shown]
        colors = ["tab:gray", "tab:green", "tab:olive", *["tab:blue"] * len(merges)]
        bars.barh(range(len(shown)), means, xerr=stds, color=colors, capsize=3)
        bars.set_yticks(range(len(shown)), shown, fontsize="small")
        bars.invert_yaxis()
        bars.set_xlim(0, 1)
        bars.set_xlabel(f"average test accuracy over {len(results['tasks'])} tasks (mean ± std over seeds)")
        for i, (value, std) in enumerate(zip(means, stds)):
            bars.text(value + std + 0.02, i, f"{100 * value:.1f}", va="center", fontsize="x-small")

    return _draw


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, required=True, help="directory for the JSON and PNG report")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default 0 1 2")
    parser.add_argument("--workdir", type=Path, help="keep the models and statistics here (default: temporary)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run: fewer steps and samples")
    parser.add_argument("--force", action="store_true", help="replace existing report files (and --workdir)")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    results = run_study(args.report, args.seeds, settings, workdir=args.workdir, force=args.force)
    if results["methods_missing"]:
        print(f"not run (this splice has no such merge method): {', '.join(results['methods_missing'])}")
    print(table(results))
    print(f"wrote {args.report / JSON_NAME}, {args.report / PNG_NAME}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
