"""Draws from torch's default generator in the plan's order while a kernel's tensors are computed on several threads.

DARE and DELLA draw one number per entry of each delta from one generator, tensor after tensor: the same seed gives
the same draws only if the tensors draw in the same order. Their draws are made in `Kernel.prepare`, before the
tensor is merged; the merge draws nothing. So each work unit takes its turn to compute (`DrawingTurns.taken`, in
the order the units were handed out) and gives it up as soon as it has drawn (`drawn`, called when `prepare`
returns), and its merge then runs beside the next unit's draws. A unit that never reaches `prepare` (its tensor
computed whole, by a kernel that draws as it computes) keeps its turn until it is computed.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from splice.errors import SpliceError

TURN_WAIT_S = 3600.0
"""How long a unit waits for the units before it to draw (a tensor's draws take seconds at most)."""

_current = threading.local()


class DrawingTurns:
    """Turns to draw, given in ticket order (0, 1, 2, ...: the order the units were handed to the threads)."""

    def __init__(self, wait_s: float = TURN_WAIT_S) -> None:
        self._turn = 0
        self._changed = threading.Condition()
        self._wait_s = wait_s

    @contextlib.contextmanager
    def taken(self, ticket: int) -> Iterator[None]:
        """Within: it is `ticket`'s turn, until `drawn` is called on this thread or the block ends."""
        deadline = time.monotonic() + self._wait_s
        with self._changed:
            while self._turn != ticket:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SpliceError(f"the tensors before this one did not finish drawing in {self._wait_s:.0f} s")
                self._changed.wait(left)
        _current.give_up = lambda: self._give_up(ticket)
        try:
            yield
        finally:
            _current.give_up = None
            self._give_up(ticket)

    def _give_up(self, ticket: int) -> None:
        with self._changed:
            if self._turn == ticket:
                self._turn += 1
                self._changed.notify_all()


def drawn() -> None:
    """The calling thread's unit has made its draws: the next unit may draw (nothing where no turn is held)."""
    give_up = getattr(_current, "give_up", None)
    if give_up is not None:
        give_up()
