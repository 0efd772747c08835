"""`splice demo`: the whole soup workflow on tiny models it builds, in a workspace it cleans up."""

from __future__ import annotations

import tempfile
from pathlib import Path

from splice.cli import render
from splice.errors import SpliceError

INGREDIENTS = 4


def run_demo(keep: Path | None = None) -> None:
    try:
        from splice.workflows.soup_study import best_ingredient, run_soup_study, soup_study_table
    except ImportError as exc:
        raise SpliceError(f"splice demo needs scikit-learn for its data ({exc}): pip install 'splice[demo]'") from None
    from splice.tensors.summary import summarize

    console = render.console
    console.rule("[bold]splice demo: model soups")
    console.print(f"Pretraining a tiny ViT on part of scikit-learn's digits, then fine-tuning {INGREDIENTS} "
                  "copies of it with different learning rates, seeds and augmentations...")
    if keep is not None:
        if keep.exists() and any(keep.iterdir()):
            raise SpliceError(f"--keep {keep} exists and is not empty; give a new directory")
        keep.mkdir(parents=True, exist_ok=True)
        results = run_soup_study(keep, INGREDIENTS, progress=render.RichProgress())
        summary = summarize(results["outputs"]["uniform_soup"])
    else:
        with tempfile.TemporaryDirectory(prefix="splice-demo-") as workspace:
            results = run_soup_study(Path(workspace), INGREDIENTS, progress=render.RichProgress())
            summary = summarize(results["outputs"]["uniform_soup"])

    console.print(render.table("what a soup holds (splice inspect)", ["architecture", "tensors", "parameters",
                                                                      "LayerNorm modules", "size"],
                               [[summary.architecture, summary.tensors, f"{summary.parameters:,}",
                                 len(summary.norm_modules), render.human_bytes(summary.nbytes)]]))
    console.print(soup_study_table(results))
    best = best_ingredient(results)
    greedy, uniform = results["greedy_soup"], results["uniform_soup"]
    console.print(f"Greedy soup kept {greedy['kept']} of {INGREDIENTS} ingredients: held-out {greedy['val']:.2%} "
                  f"vs the best ingredient's {best['val']:.2%}; test {greedy['test']:.2%} vs {best['test']:.2%}.")
    console.print(f"Uniform soup: held-out {uniform['val']:.2%}, test {uniform['test']:.2%}.")
    console.print(f"Took {results['seconds']['total']:.1f} s.")
    if keep is None:
        console.print("Nothing was left behind: the workspace was a temporary directory and is gone.")
    else:
        console.print(f"Wrote to {keep}: base/, {INGREDIENTS} ingredient-*/ directories, uniform-soup/, greedy-soup/.")
