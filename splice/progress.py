"""How long-running library calls report progress; the CLI plugs a rich bar in, Python users may too."""

from __future__ import annotations

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
