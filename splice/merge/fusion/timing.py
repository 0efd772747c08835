"""Wall time per fusion phase, for the report's `timings`."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

TIMED = ("read", "activations", "ot", "transport", "write")  # the report's `timings`, besides "total"


class Clock:
    """Wall time per phase; synchronises the GPU at the edges so queued kernels are charged to their phase."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = dict.fromkeys(TIMED, 0.0)

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        self._sync()
        started = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[phase] += time.perf_counter() - started

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def rounded(self, total: float) -> dict[str, float]:
        """The phases' seconds and the `total`, as the report keeps them."""
        return {**{phase: round(self.seconds[phase], 4) for phase in TIMED}, "total": round(total, 4)}
