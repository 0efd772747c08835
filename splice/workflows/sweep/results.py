"""What a sweep leaves beside its journal: every trial as JSON and CSV, the best candidate's recipe (which
`splice merge` runs as is), and PNG plots (score against each searched parameter, score over trials; for a greedy
soup, the held-out score as ingredients are tried)."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from splice.plots import png_bytes
from splice.workflows.sweep.greedy import GreedyOutcome
from splice.workflows.sweep.study import TrialRecord, ranked
from splice.workflows.sweep.subjects import PORT_KEY, port_spec

RESULTS_JSON, RESULTS_CSV, BEST_RECIPE = "sweep_results.json", "sweep_results.csv", "best_recipe.yaml"
BEST_PORT = "best_port.yaml"  # a port's best: the port entry as `splice port` takes it
BY_PARAMETER_PNG, OVER_TRIALS_PNG, GREEDY_PNG = "score_by_parameter.png", "score_over_trials.png", "greedy_soup.png"
BEST_MODEL, CANDIDATES = "best", "candidates"
RESULT_FILES = (RESULTS_JSON, RESULTS_CSV, BEST_RECIPE, BEST_PORT, BY_PARAMETER_PNG, OVER_TRIALS_PNG, GREEDY_PNG)


@dataclass(frozen=True)
class SweepReport:
    """A sweep's results: every finished trial, the best one, and where everything was written."""

    source: str
    method: str
    direction: str
    budget: int
    executor: str
    workers: int
    seconds: float
    trials: list[TrialRecord]
    parameters: list[str]
    best: TrialRecord | None  # None for a greedy soup (its `greedy` says what it kept), or when every trial failed
    out: Path
    best_model: str | None = None  # where the best candidate's model was written (None: `keep: none`)
    pushed: str | None = None  # the registry version `push:` made of the best (NAME@vN)
    rerun: int = 0  # trials found running in the journal and run again on this resume
    skipped: int = 0  # trials found finished in the journal (a resume does not run them again)
    greedy: GreedyOutcome | None = None

    @property
    def failed(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.failed]

    def ranked(self) -> list[TrialRecord]:
        """Scored trials best first (ties: the lower number first), then the failed ones."""
        return ranked(self.trials, self.direction)

    def as_json(self) -> dict[str, Any]:
        summary = {
            "sweep": self.source,
            "method": self.method,
            "direction": self.direction,
            "budget": self.budget,
            "executor": self.executor,
            "workers": self.workers,
            "seconds": round(self.seconds, 3),
            "parameters": self.parameters,
            "best": asdict(self.best) if self.best else None,
            "best_model": self.best_model,
            "pushed": self.pushed,
            "trials": [asdict(t) for t in sorted(self.trials, key=lambda t: t.number)],
        }
        if self.greedy is not None:
            summary["greedy_soup"] = {
                "kept": self.greedy.kept,
                "soup_score": self.greedy.soup_score,
                "ingredient_scores": self.greedy.scores,
                "failed_ingredients": self.greedy.failed,
                "steps": [asdict(s) for s in self.greedy.steps],
                "speculation": asdict(self.greedy.speculation) | {"saved_rounds": self.greedy.speculation.saved_rounds},
            }
        return summary


def result_files(report: SweepReport, best_recipe: dict[str, Any] | None, seed: int | None) -> dict[str, bytes]:
    files = {
        RESULTS_JSON: (json.dumps(report.as_json(), indent=2, allow_nan=False) + "\n").encode(),
        RESULTS_CSV: _csv(report).encode(),
    }
    if best_recipe is not None and report.best is not None and PORT_KEY in best_recipe:
        files[BEST_PORT] = _port_yaml(report, best_recipe).encode()
    elif best_recipe is not None and report.best is not None:
        files[BEST_RECIPE] = _recipe_yaml(report, best_recipe, seed).encode()
    greedy = report.greedy
    if greedy is not None:
        files[GREEDY_PNG] = png_bytes(lambda figure: _draw_greedy(figure, greedy))
    elif any(not t.failed for t in report.trials):
        files[BY_PARAMETER_PNG] = png_bytes(lambda figure: _draw_by_parameter(figure, report), size=_grid_size(report))
        files[OVER_TRIALS_PNG] = png_bytes(lambda figure: _draw_over_trials(figure, report))
    return files


def _csv(report: SweepReport) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["trial", "state", "score", *report.parameters, "merge_s", "eval_s", "worker", "error"])
    for t in sorted(report.trials, key=lambda t: t.number):
        writer.writerow(
            [
                t.number,
                "failed" if t.failed else "complete",
                "" if t.score is None else repr(t.score),
                *(t.values.get(name, "") for name in report.parameters),
                f"{t.merge_seconds:.3f}",
                f"{t.eval_seconds:.3f}",
                t.worker,
                t.error or "",
            ]
        )
    return buffer.getvalue()


def _recipe_yaml(report: SweepReport, recipe: dict[str, Any], seed: int | None) -> str:
    assert report.best is not None
    rerun = f"splice merge {BEST_RECIPE} --out DIR" + (f" --seed {seed}" if seed is not None else "")
    header = (
        f"# The best candidate of {report.source}: trial {report.best.number}, score {report.best.score!r}.\n"
        f"# `{rerun}` reproduces it bit for bit.\n"
    )
    return header + yaml.safe_dump(recipe, sort_keys=False)


def _port_yaml(report: SweepReport, document: dict[str, Any]) -> str:
    assert report.best is not None
    header = (
        f"# The best candidate of {report.source}: trial {report.best.number}, score {report.best.score!r}.\n"
        f"# `{port_spec(document, BEST_PORT).command('DIR')}` reproduces it bit for bit.\n"
    )
    return header + yaml.safe_dump(document, sort_keys=False)


def _panels(report: SweepReport) -> tuple[int, int]:
    """(rows, columns) of the by-parameter figure: one panel a searched parameter, three to a row."""
    count = max(1, len(report.parameters))
    columns = min(3, count)
    return math.ceil(count / columns), columns


def _grid_size(report: SweepReport) -> tuple[float, float]:
    rows, columns = _panels(report)
    return (4.2 * columns, 3.4 * rows)


def _draw_by_parameter(figure: Any, report: SweepReport) -> None:
    names = report.parameters or ["trial"]
    rows, columns = _panels(report)
    scored = [t for t in report.trials if not t.failed]
    for index, name in enumerate(names):
        axes = figure.add_subplot(rows, columns, index + 1)
        xs = [t.values.get(name) for t in scored]
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs):
            axes.scatter(xs, [t.score for t in scored], s=18)
        else:  # a choice of strings or booleans: one column per value
            labels = sorted({str(x) for x in xs})
            axes.scatter([labels.index(str(x)) for x in xs], [t.score for t in scored], s=18)
            axes.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        if report.best is not None:
            axes.axhline(report.best.score or 0.0, color="tab:red", linewidth=0.8, linestyle="--")
        axes.set_xlabel(name, fontsize=8)
        axes.set_ylabel("score", fontsize=8)
    figure.suptitle(f"{report.method} sweep: score against each searched value ({report.direction})", fontsize=9)


def _draw_over_trials(figure: Any, report: SweepReport) -> None:
    axes = figure.add_subplot(1, 1, 1)
    ordered = sorted(report.trials, key=lambda t: t.number)
    scored = [t for t in ordered if not t.failed]
    axes.scatter([t.number for t in scored], [t.score for t in scored], s=18, label="trial")
    sign = 1.0 if report.direction == "maximize" else -1.0
    best: list[float] = []
    for t in scored:
        score = t.score or 0.0
        best.append(score if not best or sign * score > sign * best[-1] else best[-1])
    axes.step([t.number for t in scored], best, where="post", color="tab:red", label="best so far")
    failed = [t.number for t in ordered if t.failed]
    if failed:
        low = min(t.score or 0.0 for t in scored) if scored else 0.0
        axes.scatter(failed, [low] * len(failed), marker="x", color="gray", label="failed")
    axes.set_xlabel("trial")
    axes.set_ylabel("score")
    axes.legend(fontsize=8)
    axes.set_title(f"{report.method} sweep, {len(ordered)} trials ({report.direction})", fontsize=9)


def _draw_greedy(figure: Any, greedy: GreedyOutcome) -> None:
    """Each ingredient in the order it was tried: the soup's score with it (green: kept, gray: not), the ingredient's
    own score, and the kept soup's score so far (points and a step line: scores may be negative, so no bars)."""
    axes = figure.add_subplot(1, 1, 1)
    tried = [s for s in greedy.steps if s.soup_score is not None or s.kept]
    positions = range(len(tried))
    scores = [s.soup_score if s.soup_score is not None else s.score for s in tried]
    kept_so_far: list[float] = []
    for step, score in zip(tried, scores):
        kept_so_far.append(score if step.kept or not kept_so_far else kept_so_far[-1])
    axes.step(positions, kept_so_far, where="post", color="tab:green", linewidth=1, label="the soup kept so far")
    for kept, label, color in ((True, "kept", "tab:green"), (False, "not kept", "tab:gray")):
        chosen = [(i, score) for i, (step, score) in enumerate(zip(tried, scores)) if step.kept == kept]
        if chosen:
            axes.scatter(*zip(*chosen), s=60, color=color, label=f"soup with it: {label}", zorder=3)
    axes.scatter(positions, [s.score for s in tried], s=18, color="black", label="ingredient alone", zorder=3)
    axes.set_xticks(positions, [Path(s.model).name for s in tried], rotation=30, ha="right", fontsize=7)
    axes.set_ylabel("held-out score")
    axes.legend(fontsize=8)
    axes.set_title(
        f"greedy soup: the soup's score as each ingredient is tried (green: kept, {len(greedy.kept)} of "
        f"{len(greedy.steps)})",
        fontsize=9,
    )
