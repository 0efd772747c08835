"""Model soups on a small real task: a tiny ViT fine-tuned on scikit-learn's 8x8 digits.

One base model is pretrained; ingredients are fine-tuned from it with different learning rates, seeds and
augmentation. Every ingredient, the uniform soup and the greedy soup (ingredients added in order of held-out
accuracy, each kept only if held-out accuracy does not drop) are scored on the held-out and the test split.

    python examples/soups_digits.py [--ingredients 8] [--workdir DIR] [--seed 0]

Prints a table and writes the numbers to examples/_out/soups_digits.json. Seeds are fixed, so a rerun on
the same machine gives the same numbers.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

import splice
from splice.workflows import digits

JSON_OUT = Path(__file__).resolve().parent / "_out" / "soups_digits.json"


def scores(model_dir: Path, splits: digits.DigitsSplits) -> dict[str, float]:
    model = digits.load_model(model_dir)
    return {"val": digits.accuracy(model, *splits.val), "test": digits.accuracy(model, *splits.test)}


def run(count: int, workdir: Path, seed: int) -> dict:
    started = time.perf_counter()
    base_dir, ingredient_dirs, splits = digits.prepare_ingredients(workdir, count, seed)
    trained = time.perf_counter()
    recipes = digits.fine_tunes(count, seed)

    uniform_dir, greedy_dir = workdir / "uniform-soup", workdir / "greedy-soup"
    splice.soup(ingredient_dirs, uniform_dir, device="cpu", force=True)
    report = splice.greedy_soup(ingredient_dirs, greedy_dir, digits.make_scorer(*splits.val, base_dir),
                                device="cpu", force=True)
    kept = {Path(model).name for model in report.kept}
    greedy = scores(greedy_dir, splits)
    return {
        "seed": seed,
        "split_sizes": {name: len(getattr(splits, name).y) for name in ("pretrain", "finetune", "val", "test")},
        "base": scores(base_dir, splits),
        "ingredients": [
            {"name": path.name, "lr": r.lr, "noise": r.noise, "shift": r.shift, "seed": r.seed,
             **scores(path, splits), "in_greedy_soup": path.name in kept}
            for path, r in zip(ingredient_dirs, recipes)
        ],
        "uniform_soup": scores(uniform_dir, splits),
        "greedy_soup": {**greedy, "reported_val": report.soup_score, "kept": len(kept)},
        "seconds": {"train": trained - started, "total": time.perf_counter() - started},
    }


def show(results: dict, console: Console) -> None:
    table = Table(title=f"model soups on digits (seed {results['seed']})", box=box.SIMPLE_HEAD)
    for column in ("model", "lr", "noise", "shift", "held-out", "test", "greedy"):
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=True)
    pct = "{:.2%}".format
    base = results["base"]
    table.add_row("base (shared init)", "", "", "", pct(base["val"]), pct(base["test"]), "", style="dim")
    for index, item in enumerate(results["ingredients"]):
        table.add_row(f"ingredient {index:02d}", f"{item['lr']:g}", f"{item['noise']:g}", str(item["shift"]),
                      pct(item["val"]), pct(item["test"]), "kept" if item["in_greedy_soup"] else "")
    table.add_section()
    uniform, greedy = results["uniform_soup"], results["greedy_soup"]
    table.add_row(f"uniform soup of {len(results['ingredients'])}", "", "", "", pct(uniform["val"]),
                  pct(uniform["test"]), "", style="bold")
    table.add_row(f"greedy soup of {greedy['kept']}", "", "", "", pct(greedy["val"]), pct(greedy["test"]), "",
                  style="bold")
    console.print(table)

    best = max(results["ingredients"], key=lambda item: item["val"])
    console.print(f"best ingredient by held-out accuracy: {best['name']} "
                  f"(held-out {pct(best['val'])}, test {pct(best['test'])})")
    console.print(f"split sizes: {results['split_sizes']}")
    console.print(f"training took {results['seconds']['train']:.1f} s, everything {results['seconds']['total']:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ingredients", type=int, default=8, help="how many models to fine-tune (default 8)")
    parser.add_argument("--workdir", type=Path, help="keep the models here (default: a temporary directory)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.ingredients < 2:
        parser.error("a soup needs at least 2 ingredients")

    if args.workdir is None:
        with tempfile.TemporaryDirectory(prefix="splice-soups-digits-") as workdir:
            results = run(args.ingredients, Path(workdir), args.seed)
    else:
        results = run(args.ingredients, args.workdir, args.seed)
    show(results, Console())
    JSON_OUT.parent.mkdir(parents=True, exist_ok=True)
    JSON_OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {JSON_OUT}")


if __name__ == "__main__":
    main()
