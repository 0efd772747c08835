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
from pathlib import Path

from rich.console import Console

from splice.cli.demo import soup_study_table
from splice.demo.soups import best_ingredient, run_soup_study

JSON_OUT = Path(__file__).resolve().parent / "_out" / "soups_digits.json"


def show(results: dict, console: Console) -> None:
    console.print(soup_study_table(results))
    best = best_ingredient(results)
    pct = "{:.2%}".format
    console.print(
        f"best ingredient by held-out accuracy: {best['name']} (held-out {pct(best['val'])}, test {pct(best['test'])})"
    )
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
            results = run_soup_study(Path(workdir), args.ingredients, args.seed)
    else:
        results = run_soup_study(args.workdir, args.ingredients, args.seed)
    show(results, Console())
    JSON_OUT.parent.mkdir(parents=True, exist_ok=True)
    JSON_OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {JSON_OUT}")


if __name__ == "__main__":
    main()
