"""Soups on the digits task, end to end: ingredients, uniform soup, greedy soup, each scored on held-out
and test data. Shared by `splice demo` and `examples/soups_digits.py`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from splice.demo import digits
from splice.merge.soup import greedy_soup, soup
from splice.progress import Progress


def scores(model_dir: Path, splits: digits.DigitsSplits) -> dict[str, float]:
    model = digits.load_model(model_dir)
    return {"val": digits.accuracy(model, *splits.val), "test": digits.accuracy(model, *splits.test)}


def run_soup_study(workdir: Path, count: int, seed: int = 0, progress: Progress | None = None, **training: Any) -> dict:
    """Fine-tune `count` ingredients from one pretrained init under `workdir`, soup them, score everything."""
    started = time.perf_counter()
    base_dir, ingredient_dirs, splits = digits.prepare_ingredients(workdir, count, seed, **training)
    trained = time.perf_counter()
    recipes = digits.fine_tunes(count, seed)

    uniform_dir, greedy_dir = workdir / "uniform-soup", workdir / "greedy-soup"
    soup(ingredient_dirs, uniform_dir, device="cpu", force=True, progress=progress)
    report = greedy_soup(
        ingredient_dirs,
        greedy_dir,
        digits.make_scorer(*splits.val, base_dir),
        device="cpu",
        force=True,
        progress=progress,
    )
    kept = {Path(model).name for model in report.kept}
    return {
        "seed": seed,
        "split_sizes": {name: len(getattr(splits, name).y) for name in ("pretrain", "finetune", "val", "test")},
        "base": scores(base_dir, splits),
        "ingredients": [
            {
                "name": path.name,
                "lr": r.lr,
                "noise": r.noise,
                "shift": r.shift,
                "seed": r.seed,
                **scores(path, splits),
                "in_greedy_soup": path.name in kept,
            }
            for path, r in zip(ingredient_dirs, recipes)
        ],
        "uniform_soup": scores(uniform_dir, splits),
        "greedy_soup": {**scores(greedy_dir, splits), "reported_val": report.soup_score, "kept": len(kept)},
        "outputs": {
            "base": str(base_dir),
            "ingredients": [str(p) for p in ingredient_dirs],
            "uniform_soup": str(uniform_dir),
            "greedy_soup": str(greedy_dir),
        },
        "seconds": {"train": trained - started, "total": time.perf_counter() - started},
    }


def best_ingredient(results: dict) -> dict:
    return max(results["ingredients"], key=lambda item: item["val"])
