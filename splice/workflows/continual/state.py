"""What a continual pipeline has done so far, as the run keeps it and its report reads it."""

from __future__ import annotations

from dataclasses import dataclass, field

from splice.continual import align


@dataclass
class RunState:
    """What the pipeline has done so far: rebuilt from the registry on --resume."""

    matrix: list[list[float]] = field(default_factory=list)
    oracle: list[list[float]] = field(default_factory=list)
    task_id: list[float] = field(default_factory=list)
    losses: list[dict[str, float]] = field(default_factory=list)
    stored: list[int] = field(default_factory=list)  # LayerNorm entries each task's version holds
    resumed: int = 0  # tasks taken from the registry rather than trained here
    kept: int = 0  # tasks in the registry (resumed or pushed by this run)
    legacy_aliases: bool = False  # the registry numbers its tasks' aliases from task-0
    statistics: list[dict[int, align.ClassStatistics]] = field(default_factory=list)  # per task, for `align:`
