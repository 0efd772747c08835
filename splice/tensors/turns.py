"""Draws from torch's default generator in the plan's order while a kernel's tensors are computed on several threads.

DARE and DELLA draw one number per entry of each delta from one generator, tensor after tensor: the same seed gives
the same draws only if the tensors draw in the same order. Their draws are made in `Kernel.prepare`, before the
tensor is merged; the merge draws nothing. So each work unit takes its turn to draw (`DrawingTurns.taken`, turns
given in the order the units were handed out) and gives it up as soon as it has drawn (`drawn`, called when
`prepare` returns), and its merge then runs beside the next unit's draws. A unit either waits for its turn as it
starts, or (`wait=False`) when it is about to draw (`my_turn`): what it computes before that, DELLA's ranks of every
magnitude, runs beside the other units' draws. A unit that never draws passes its turn on when it ends, without
waiting for it; one that never reaches `prepare` (its tensor computed whole, by a kernel that draws as it computes)
holds its turn until it is computed.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from splice.errors import SpliceError

TURN_WAIT_S = 3600.0
"""How long a unit waits for the units before it to draw (a tensor's draws take seconds at most)."""

_current = threading.local()


class DrawingTurns:
    """Turns to draw, given in ticket order (0, 1, 2, ...: the order the units were handed to the threads)."""

    def __init__(self, wait_s: float = TURN_WAIT_S) -> None:
        self._turn = 0
        self._finished: set[int] = set()  # tickets done drawing before their turn came: passed over when it does
        self._changed = threading.Condition()
        self._wait_s = wait_s

    @contextlib.contextmanager
    def taken(self, ticket: int, wait: bool = True) -> Iterator[None]:
        """Within: `ticket`'s unit, which may draw in its turn until `drawn` is called on this thread or the block
        ends. `wait`: its turn is waited for now; else when the unit calls `my_turn`."""
        unit = _Unit(self, ticket)
        _current.unit = unit
        try:
            if wait:
                unit.wait()
            yield
        finally:
            _current.unit = None
            unit.finish()

    def _wait(self, ticket: int) -> None:
        deadline = time.monotonic() + self._wait_s
        with self._changed:
            while self._turn != ticket:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SpliceError(f"the tensors before this one did not finish drawing in {self._wait_s:.0f} s")
                self._changed.wait(left)

    def _finish(self, ticket: int) -> None:
        with self._changed:
            self._finished.add(ticket)
            while self._turn in self._finished:
                self._finished.discard(self._turn)
                self._turn += 1
            self._changed.notify_all()


@dataclass
class _Unit:
    turns: DrawingTurns
    ticket: int
    waited: bool = False
    finished: bool = False

    def wait(self) -> None:
        if self.finished:  # its turn may be long gone: drawing now would take another unit's draws
            raise RuntimeError("a work unit drew after it said it had drawn (turns.drawn)")
        if not self.waited:
            self.turns._wait(self.ticket)
            self.waited = True

    def finish(self) -> None:
        if not self.finished:
            self.finished = True
            self.turns._finish(self.ticket)


def my_turn() -> None:
    """Wait until the calling thread's unit may draw (at once where it holds its turn, or holds none)."""
    unit = getattr(_current, "unit", None)
    if unit is not None:
        unit.wait()


def drawn() -> None:
    """The calling thread's unit has made its draws: the next unit may draw (nothing where no turn is held)."""
    unit = getattr(_current, "unit", None)
    if unit is not None:
        unit.finish()
