"""How long-running library calls report progress; the CLI plugs a rich bar in, Python users may too."""

from __future__ import annotations

from collections import deque
from typing import Protocol


class Progress(Protocol):
    def start(self, description: str, total_items: int, total_bytes: int, unit: str = "tensors") -> None: ...

    def advance(self, items: int, nbytes: int) -> None: ...

    def finish(self) -> None: ...


class NoProgress:
    def start(self, description: str, total_items: int, total_bytes: int, unit: str = "tensors") -> None:
        pass

    def advance(self, items: int, nbytes: int) -> None:
        pass

    def finish(self) -> None:
        pass


# What this process has published lately (an output path, a registry version or alias), for the one message an
# interrupted command prints: a Ctrl-C that lands after a publication (while a table is printed, say) must not
# say that nothing was published. Bounded: a long-lived Python process publishes without end.
_published: deque[str] = deque(maxlen=8)


def note_published(what: str) -> None:
    _published.append(what)


def published() -> list[str]:
    return list(_published)


def forget_published() -> None:
    _published.clear()
