"""Continual-learning metrics from an accuracy matrix, defined once (codebases disagree on the names).

R[i][j] is the accuracy on task j's test set after training task i (j <= i; later entries are unknown).
    average accuracy after task i       A_i = mean_{j <= i} R[i][j]
    final average accuracy              A_{T-1}
    average incremental accuracy        mean_i A_i
    forgetting                          mean_{j < T-1} (max_{j <= i < T-1} R[i][j] - R[T-1][j])   (>= 0 is worse)
    backward transfer (BWT)             mean_{j < T-1} (R[T-1][j] - R[j][j])                      (< 0: forgetting)
Forgetting and BWT are 0 for a single task.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Matrix = Sequence[Sequence[float]]  # row i: accuracies on tasks 0..i after training task i


def _checked(matrix: Matrix) -> list[list[float]]:
    rows = [list(row) for row in matrix]
    for i, row in enumerate(rows):
        if len(row) != i + 1:
            raise ValueError(f"row {i} of the accuracy matrix has {len(row)} entries; it needs {i + 1} (tasks 0..{i})")
    return rows


def average_accuracies(matrix: Matrix) -> list[float]:
    """A_i for every step i."""
    return [sum(row) / len(row) for row in _checked(matrix)]


def forgetting(matrix: Matrix) -> float:
    rows = _checked(matrix)
    last = len(rows) - 1
    if last < 1:
        return 0.0
    return sum(max(rows[i][j] for i in range(j, last)) - rows[last][j] for j in range(last)) / last


def backward_transfer(matrix: Matrix) -> float:
    rows = _checked(matrix)
    last = len(rows) - 1
    if last < 1:
        return 0.0
    return sum(rows[last][j] - rows[j][j] for j in range(last)) / last


@dataclass(frozen=True)
class Summary:
    final_average_accuracy: float
    average_incremental_accuracy: float
    forgetting: float
    backward_transfer: float
    average_accuracies: list[float]


def summarize(matrix: Matrix) -> Summary:
    averages = average_accuracies(matrix)
    return Summary(averages[-1], sum(averages) / len(averages), forgetting(matrix), backward_transfer(matrix), averages)
