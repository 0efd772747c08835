"""The pipeline's report: the accuracy matrix and the metrics of splice.continual.metrics, as JSON and
PNG plots (the matrix as a heatmap, average accuracy after each task)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from splice.continual.metrics import summarize
from splice.plots import png_bytes
from splice.tensors.writer import write_report_files

if TYPE_CHECKING:
    from collections.abc import Sequence

    from matplotlib.figure import Figure

    from splice.continual.bank import LayerNormBank
    from splice.continual.data import TaskData
    from splice.workflows.continual.pipeline import Pipeline
    from splice.workflows.continual.state import RunState

REPORT_JSON = "continual_report.json"
MATRIX_PNG = "accuracy_matrix.png"
CURVE_PNG = "average_accuracy.png"
REPORT_FILES = (REPORT_JSON, MATRIX_PNG, CURVE_PNG)


@dataclass
class ContinualReport:
    name: str
    pipeline: str  # its digest
    protocol: str
    tasks: list[str]
    accuracy: list[list[float]]  # R[i][j]: task j's test accuracy after task i, routed by keys
    oracle_accuracy: list[list[float]]  # the same with each task's own slot (routing's upper bound)
    task_id_accuracy: list[float]  # after each task: share of seen test inputs routed to their task
    final_average_accuracy: float
    average_incremental_accuracy: float
    forgetting: float
    backward_transfer: float
    average_accuracy: list[float]  # A_i after each task
    oracle_final_average_accuracy: float
    parameters_per_task: list[int]  # LayerNorm entries each task's version stores (a Fisher subset stores fewer)
    key_size: int
    head_parameters: int  # the shared head, stored with every task
    losses: list[dict[str, float]]
    resumed_tasks: int

    @classmethod
    def of(
        cls, pipeline: Pipeline, tasks: Sequence[TaskData], state: RunState, bank: LayerNormBank, head_parameters: int
    ) -> ContinualReport:
        summary, oracle = summarize(state.matrix), summarize(state.oracle)
        return cls(
            pipeline.name,
            pipeline.digest(),
            pipeline.protocol,
            [t.name for t in tasks],
            state.matrix,
            state.oracle,
            state.task_id,
            summary.final_average_accuracy,
            summary.average_incremental_accuracy,
            summary.forgetting,
            summary.backward_transfer,
            summary.average_accuracies,
            oracle.final_average_accuracy,
            state.stored,
            int(bank.keys.shape[-1]),
            head_parameters,
            state.losses,
            state.resumed,
        )

    def files(self) -> dict[str, bytes]:
        return {
            REPORT_JSON: (json.dumps(asdict(self), indent=2) + "\n").encode(),
            MATRIX_PNG: png_bytes(self._draw_matrix, size=(6.5, 5.5)),
            CURVE_PNG: png_bytes(self._draw_curve, size=(6.5, 4.0)),
        }

    def save(self, directory: str | os.PathLike, force: bool = False) -> list[Path]:
        """The JSON and the PNGs into `directory`, by the output rule (`force` replaces them)."""
        return write_report_files(directory, self.files(), force)

    def _draw_matrix(self, figure: Figure) -> None:
        import numpy as np

        count = len(self.tasks)
        grid = np.full((count, count), np.nan)
        for i, row in enumerate(self.accuracy):
            grid[i, : len(row)] = row
        axes = figure.subplots()
        image = axes.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        for i, row in enumerate(self.accuracy):
            for j, value in enumerate(row):
                axes.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize="small",
                    color="white" if value < 0.6 else "black",
                )
        axes.set_xticks(range(count), self.tasks, rotation=45, ha="right", fontsize="small")
        axes.set_yticks(range(count), [f"after {t}" for t in self.tasks], fontsize="small")
        axes.set_xlabel("evaluated on")
        axes.set_title(f"{self.name}: accuracy (final average {self.final_average_accuracy:.3f})", fontsize="medium")
        figure.colorbar(image, ax=axes, shrink=0.8)

    def _draw_curve(self, figure: Figure) -> None:
        axes = figure.subplots()
        steps = range(1, len(self.average_accuracy) + 1)
        axes.plot(steps, self.average_accuracy, "o-", label="average accuracy (keys)")
        axes.plot(steps, [sum(r) / len(r) for r in self.oracle_accuracy], "s--", label="oracle task ids")
        axes.plot(steps, self.task_id_accuracy, "^:", label="task-identification accuracy")
        axes.set_ylim(0, 1.02)
        axes.set_xticks(list(steps))
        axes.set_xlabel("tasks learned")
        axes.legend(fontsize="small")
        axes.set_title(f"{self.name}: after each task", fontsize="medium")
