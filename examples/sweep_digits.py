"""What `splice sweep` finds on a small real task: TIES merges of two class-group fine-tunes of a tiny ViT on
scikit-learn's 8x8 digits, searched by a grid and by TPE, and a speculative greedy soup.

A base ViT is pretrained on the digits' pretraining split; from it, as task-arithmetic papers do, two models are
fine-tuned on the fine-tuning split with one class group emphasised: task A on every image of digits 0-4 and a
quarter of the others, task B the same for 5-9. Each alone gains on its own group and loses on the other; a
merge can keep both gains. A sweep file searches a TIES recipe over the two (each model's weight and density, and
`lambda`), scored by this file's `split_accuracy` hook on the held-out split: (a) a grid, (b) TPE over the same
ranges with the same budget, each on the local executor with 2 workers. The best candidate of each (out/best) and
the default recipe (weight 1, density 0.5, lambda 1: mergekit's example values) are then scored on the test split.

The same base's soup ingredients (splice/demo/digits.py, as in examples/soups_digits.py) are then souped greedily
through `splice sweep` (search: greedy_soup, speculate 2 and 4) and by `splice.greedy_soup`, which must agree.

    python examples/sweep_digits.py [--out DIR] [--workdir DIR] [--seed 0] [--quick]

Prints a table and writes DIR/sweep_digits.json and the sweeps' plots as DIR/sweep_digits-*.png (DIR defaults to
examples/_out). Seeds are fixed: a rerun on the same machine gives the same numbers (not the same wall times).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from rich import box
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file

import splice
from splice.arch.quiet import quiet_transformers
from splice.demo import digits
from splice.options import RunOptions

OUT_DIR = Path(__file__).resolve().parent / "_out"
JSON_NAME = "sweep_digits.json"
HOOK = f"{Path(__file__).resolve()}:split_accuracy"
TASKS = {"A": range(0, 5), "B": range(5, 10)}  # the class group each task fine-tune emphasises
WORKERS = 2
PLOTS = ("score_by_parameter.png", "score_over_trials.png", "greedy_soup.png")


@dataclass(frozen=True)
class Settings:
    pretrain_steps: int = 200  # the task models' base: fewer steps than the soups' 300 leave the fine-tunes room
    task_steps: int = 100
    task_lr: float = 1e-3
    other_fraction: float = 0.25  # of the other group's fine-tuning images, kept in a task's data
    ingredients: int = 8  # soup ingredients for the greedy soup: examples/soups_digits.py's, with its steps
    soup_pretrain_steps: int = 300
    soup_finetune_steps: int = 75
    weight: tuple[float, float, float] = (0.5, 1.5, 0.5)  # (low, high, grid step) of each model's weight
    density: tuple[float, float, float] = (0.2, 0.8, 0.3)
    lam: tuple[float, float, float] = (0.5, 1.5, 0.5)
    speculate: tuple[int, ...] = (2, 4)


FULL = Settings()
QUICK = Settings(
    pretrain_steps=60,
    task_steps=30,
    ingredients=4,
    soup_pretrain_steps=150,  # a soup that keeps 3 of 4: the speculative pass accepts, and wastes, twice
    soup_finetune_steps=30,
    weight=(1.0, 1.0, 0.5),
    speculate=(2,),
)
DEFAULT_VALUES = {"weight": 1.0, "density": 0.5, "lambda": 1.0}  # mergekit's TIES example, lambda's default


# ---------------------------------------------------------------- the evaluation hook (runs in the sweep's workers)


@functools.cache
def _scorer(model_dir: str, split: str, seed: int) -> Callable[[digits.StateDict], float]:
    return digits.make_scorer(*getattr(digits.load_digits_splits(seed), split), model_dir)


def split_accuracy(state: digits.StateDict, model_dir: str, split: str = "val", seed: int = 0) -> float:
    """Top-1 accuracy of a candidate on one digits split (`val`: held-out, `test`); the model and the data are
    loaded once per worker process."""
    return _scorer(str(model_dir), split, seed)(state)


# ---------------------------------------------------------------- models


def task_data(splits: digits.DigitsSplits, classes: range, other_fraction: float, seed: int) -> digits.Split:
    """The fine-tuning images of `classes`, and a seeded `other_fraction` of the rest."""
    x, y = splits.finetune
    inside = torch.isin(y, torch.tensor(list(classes)))
    drawn = torch.rand(len(y), generator=torch.Generator().manual_seed(seed)) < other_fraction
    keep = inside | drawn
    return digits.Split(x[keep], y[keep])


def task_datasets(splits: digits.DigitsSplits, settings: Settings, seed: int) -> dict[str, digits.Split]:
    return {
        name: task_data(splits, classes, settings.other_fraction, 100 * seed + index)
        for index, (name, classes) in enumerate(TASKS.items())
    }


def train_tasks(
    workdir: Path, base_dir: Path, datasets: dict[str, digits.Split], settings: Settings, seed: int
) -> dict[str, Path]:
    """Task A and task B fine-tuned from the base; their directories."""
    made = {}
    for index, (name, data) in enumerate(datasets.items()):
        model = digits.load_model(base_dir)
        digits.train(model, data, lr=settings.task_lr, steps=settings.task_steps, seed=1000 * seed + 500 + index)
        made[name] = workdir / f"task-{name}"
        with quiet_transformers():
            model.save_pretrained(made[name])
    return made


def scores(model_dir: Path, seed: int) -> dict[str, float]:
    model = digits.load_model(model_dir)
    splits = digits.load_digits_splits(seed)
    return {"val": digits.accuracy(model, *splits.val), "test": digits.accuracy(model, *splits.test)}


# ---------------------------------------------------------------- sweep files


def mark(bounds: tuple[float, float, float], stepped: bool) -> dict[str, Any]:
    low, high, step = bounds
    return {"search": "uniform", "low": low, "high": high, **({"step": step} if stepped else {})}


def ties_recipe(base: Path, tasks: dict[str, Path], values: dict[str, Any]) -> dict[str, Any]:
    """A TIES recipe over the task models with `values` (numbers, or marks) for lambda and each model's weight and
    density; each model gets its own copy of a mark, so each is searched on its own."""
    return {
        "merge_method": "ties",
        "base_model": str(base),
        "parameters": {"lambda": copy.deepcopy(values["lambda"])},
        "models": [
            {"model": str(path), "parameters": copy.deepcopy({name: values[name] for name in ("weight", "density")})}
            for path in tasks.values()
        ],
    }


def write_sweep(path: Path, recipe: dict[str, Any] | None, search: dict[str, Any], seed: int) -> Path:
    document = {
        **({"recipe": recipe} if recipe is not None else {}),
        "search": search,
        "evaluate": {"hook": HOOK, "args": {"split": "val", "seed": seed}},
        "keep": "best",
        "out": f"{path.stem}-out",
    }
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def run_sweep(sweep_file: Path, plots_to: Path, label: str) -> tuple[splice.SweepReport, dict[str, Any]]:
    """`splice.sweep` on the local executor with 2 workers; the report, and its timings and plots (copied to
    `plots_to` as sweep_digits-LABEL-*.png)."""
    started = time.perf_counter()
    report = splice.sweep(sweep_file, executor="local", workers=WORKERS, run=RunOptions(device="cpu", force=True))
    wall = time.perf_counter() - started
    copied = []
    for name in PLOTS:
        if (report.out / name).exists():
            target = plots_to / f"sweep_digits-{label}-{name}"
            shutil.copyfile(report.out / name, target)
            copied.append(str(target))
    spent = [t.merge_seconds + t.eval_seconds for t in report.trials]
    return report, {
        "wall_seconds": wall,
        "candidate_seconds": sum(spent),  # merges and evaluations, over both workers
        "slowest_candidate_seconds": max(spent),  # a worker's first: it imports the hook (transformers) and data
        "plots": copied,
    }


# ---------------------------------------------------------------- the study


def search_study(
    workdir: Path, base: Path, tasks: dict[str, Path], settings: Settings, seed: int, out: Path
) -> dict[str, Any]:
    """The default recipe, then a grid and TPE with the grid's budget; each best scored on held-out and test."""
    default_file = workdir / "default_recipe.yaml"
    default_file.write_text(yaml.safe_dump(ties_recipe(base, tasks, DEFAULT_VALUES), sort_keys=False))
    splice.merge(default_file, workdir / "default-merge", seed=seed, device="cpu", force=True)
    results: dict[str, Any] = {"default": {"values": DEFAULT_VALUES, **scores(workdir / "default-merge", seed)}}
    bounds = {"weight": settings.weight, "density": settings.density, "lambda": settings.lam}
    budget = None
    for method in ("grid", "tpe"):
        recipe = ties_recipe(base, tasks, {name: mark(bounds[name], method == "grid") for name in bounds})
        search = {"method": method, "seed": seed, **({"trials": budget} if budget else {})}
        report, timing = run_sweep(write_sweep(workdir / f"sweep-{method}.yaml", recipe, search, seed), out, method)
        budget = report.budget  # TPE gets exactly the grid's number of trials
        assert report.best is not None and report.best_model is not None, f"{method}: every trial failed"
        best = scores(Path(report.best_model), seed)
        results[method] = {
            "trials": len(report.trials),
            "failed": len(report.failed),
            **timing,
            "best_trial": report.best.number,
            "best_values": report.best.values,
            "best_trial_score": report.best.score,  # the sweep's own held-out score of the best candidate
            **best,  # out/best loaded and scored here
            "results": [
                {"number": t.number, "values": t.values, "score": t.score}
                for t in sorted(report.trials, key=lambda t: t.number)
            ],
        }
    grid_best = results["grid"]["best_trial_score"]
    above = [t["number"] for t in results["tpe"]["results"] if t["score"] is not None and t["score"] > grid_best]
    results["tpe"]["first_trial_above_grid_best"] = above[0] if above else None
    results["tpe"]["trials_above_grid_best"] = len(above)
    return results


def same_tensors(first: Path, second: Path) -> bool:
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def greedy_study(
    workdir: Path, base: Path, ingredients: list[Path], settings: Settings, seed: int, out: Path
) -> dict[str, Any]:
    """`splice.greedy_soup` (sequential), then the same soup through `splice sweep` with each `speculate`."""
    started = time.perf_counter()
    library = splice.greedy_soup(
        ingredients,
        workdir / "greedy-library",
        digits.make_scorer(*digits.load_digits_splits(seed).val, base),
        device="cpu",
        force=True,
    )
    results: dict[str, Any] = {
        "library": {
            "kept": [Path(m).name for m in library.kept],
            "soup_score": library.soup_score,
            "evaluations": len(ingredients) + len(library.steps) - 1,
            "steps": [
                {
                    "ingredient": Path(step.model).name,
                    "score": step.score,
                    "soup_score": step.soup_score,
                    "kept": step.kept,
                }
                for step in library.steps
            ],
            "wall_seconds": time.perf_counter() - started,
            **scores(workdir / "greedy-library", seed),
        },
        "sweeps": {},
    }
    for speculate in settings.speculate:
        search = {"method": "greedy_soup", "ingredients": [str(p) for p in ingredients], "speculate": speculate}
        sweep_file = write_sweep(workdir / f"sweep-greedy-{speculate}.yaml", None, search, seed)
        report, timing = run_sweep(sweep_file, out, f"greedy-speculate{speculate}")
        assert report.greedy is not None and report.best_model is not None
        greedy = report.greedy
        results["sweeps"][str(speculate)] = {
            "kept": [Path(m).name for m in greedy.kept],
            "soup_score": greedy.soup_score,
            "same_as_library": [Path(m).name for m in greedy.kept] == results["library"]["kept"]
            and greedy.soup_score == library.soup_score,
            "same_tensors_as_library": same_tensors(Path(report.best_model), workdir / "greedy-library"),
            "evaluations": len(report.trials),  # each ingredient alone, then the accept/reject pass
            "speculation": asdict(greedy.speculation) | {"saved_rounds": greedy.speculation.saved_rounds},
            **timing,
            **scores(Path(report.best_model), seed),
        }
    return results


def run_study(workdir: Path, out: Path, settings: Settings, seed: int) -> dict[str, Any]:
    started = time.perf_counter()
    base, _, splits = digits.prepare_ingredients(workdir / "tasks", 0, seed, pretrain_steps=settings.pretrain_steps)
    datasets = task_datasets(splits, settings, seed)
    tasks = train_tasks(workdir / "tasks", base, datasets, settings, seed)
    soup_base, ingredients, _ = digits.prepare_ingredients(
        workdir / "soup",
        settings.ingredients,
        seed,
        pretrain_steps=settings.soup_pretrain_steps,
        finetune_steps=settings.soup_finetune_steps,
        splits=splits,
    )
    trained = time.perf_counter()
    results: dict[str, Any] = {
        "seed": seed,
        "settings": asdict(settings),
        "split_sizes": {name: len(getattr(splits, name).y) for name in ("pretrain", "finetune", "val", "test")},
        "task_sizes": {name: len(data.y) for name, data in datasets.items()},
        "base": scores(base, seed),
        "tasks": {name: scores(path, seed) for name, path in tasks.items()},
        "soup_base": scores(soup_base, seed),
        "ingredients": {path.name: scores(path, seed) for path in ingredients},
    }
    results["search"] = search_study(workdir, base, tasks, settings, seed, out)
    results["greedy_soup"] = greedy_study(workdir, soup_base, ingredients, settings, seed, out)
    results["seconds"] = {"train": trained - started, "total": time.perf_counter() - started}
    return results


# ---------------------------------------------------------------- report


def short(name: str) -> str:
    """A searched value's name for the table: `models[0].parameters.weight` -> `weight A`."""
    *where, what = name.split(".")
    return what if where == [] or where == ["parameters"] else f"{what} {list(TASKS)[int(where[0][7:-1])]}"


def table(results: dict[str, Any]) -> Table:
    pct = "{:.2%}".format
    out = Table(title=f"splice sweep on digits (seed {results['seed']})", box=box.SIMPLE_HEAD)
    for column in ("model", "held-out", "test", "evaluations", "wall s"):
        out.add_column(column, justify="left" if column == "model" else "right")

    def row(label: str, scored: dict[str, Any], evaluations: Any = "", wall: float | None = None) -> None:
        out.add_row(
            label, pct(scored["val"]), pct(scored["test"]), str(evaluations), "" if wall is None else f"{wall:.1f}"
        )

    row("task base", results["base"])
    for name, scored in results["tasks"].items():
        row(f"task {name} alone (digits {TASKS[name][0]}-{TASKS[name][-1]} emphasised)", scored)
    search = results["search"]
    row("TIES default (weight 1, density 0.5, lambda 1)", search["default"], 1)
    for method in ("grid", "tpe"):
        found = search[method]
        values = ", ".join(f"{short(name)} {value:.3g}" for name, value in found["best_values"].items())
        row(f"TIES best of {method}: {values}", found, found["trials"], found["wall_seconds"])
    greedy = results["greedy_soup"]
    row("soup base", results["soup_base"])
    best = max(results["ingredients"].items(), key=lambda item: item[1]["val"])
    row(f"best soup ingredient on held-out ({best[0].split('-')[1]})", best[1])
    library = greedy["library"]
    row(
        f"greedy soup, splice.greedy_soup (kept {len(library['kept'])})",
        library,
        library["evaluations"],
        library["wall_seconds"],
    )
    for speculate, found in greedy["sweeps"].items():
        spent = found["speculation"]
        row(
            f"greedy soup, sweep, speculate {speculate} (identical to splice.greedy_soup's: "
            f"{found['same_tensors_as_library']}; pass: {spent['evaluations']} evaluations, {spent['wasted']} "
            f"wasted, {spent['rounds']} rounds of {spent['sequential_rounds']})",
            found,
            found["evaluations"],
            found["wall_seconds"],
        )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"where the JSON and PNGs go (default {OUT_DIR})")
    parser.add_argument("--workdir", type=Path, help="keep the models and sweeps here (default: a temporary directory)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smaller grid and shorter training: a smoke run")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    if args.workdir is None:
        with tempfile.TemporaryDirectory(prefix="splice-sweep-digits-") as workdir:
            results = run_study(Path(workdir), args.out, settings, args.seed)
    else:
        args.workdir.mkdir(parents=True, exist_ok=True)
        results = run_study(args.workdir, args.out, settings, args.seed)
    Console(width=200).print(table(results))
    print(f"training {results['seconds']['train']:.1f} s, everything {results['seconds']['total']:.1f} s")
    (args.out / JSON_NAME).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out / JSON_NAME}")
    return results


if __name__ == "__main__":
    main()
