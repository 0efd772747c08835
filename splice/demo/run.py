"""What `splice demo` runs: the soup study and the patch study on tiny ViTs and digits, in a workspace it
removes afterwards (or keeps, when given one)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from splice.errors import SpliceError
from splice.progress import Progress
from splice.workflows.inspect import ModelSummary, summarize

INGREDIENTS = 4


@dataclass
class DemoResults:
    soups: dict  # run_soup_study's results
    soup_summary: ModelSummary  # what `splice inspect` says of the uniform soup
    patches: dict  # run_patch_study's results
    kept_in: Path | None  # the workspace, when it was kept

    @property
    def seconds(self) -> float:
        return self.soups["seconds"]["total"] + self.patches["seconds"]


def _run_in(workspace: Path, progress: Callable[[], Progress]) -> tuple[dict, ModelSummary, dict]:
    try:
        from splice.demo.soups import run_soup_study
    except ImportError as exc:
        raise SpliceError(f"splice demo needs scikit-learn for its data ({exc}): pip install 'splice[demo]'") from None
    from splice.demo.digits import load_digits_splits
    from splice.demo.patches import run_patch_study

    soups = run_soup_study(workspace, INGREDIENTS, progress=progress())
    outputs = soups["outputs"]
    patches = run_patch_study(
        workspace / "patches",
        Path(outputs["base"]),
        Path(outputs["ingredients"][0]),
        load_digits_splits(soups["seed"]),
        progress=progress(),
    )
    return soups, summarize(outputs["uniform_soup"]), patches


def run_demo(keep: Path | None = None, progress: Callable[[], Progress] | None = None) -> DemoResults:
    """Both studies in `keep` (a new or empty directory) or in a temporary directory that is gone afterwards.
    `progress()` makes a progress reporter for each long step."""
    from splice.progress import NoProgress

    progress = progress or NoProgress
    if keep is None:
        with tempfile.TemporaryDirectory(prefix="splice-demo-") as workspace:
            return DemoResults(*_run_in(Path(workspace), progress), kept_in=None)
    if keep.exists() and any(keep.iterdir()):
        raise SpliceError(f"`keep` {keep} exists and is not empty; give a new directory")
    keep.mkdir(parents=True, exist_ok=True)
    return DemoResults(*_run_in(keep, progress), kept_in=keep)
