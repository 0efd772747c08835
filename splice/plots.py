"""PNG figures beside a report's JSON: matplotlib without a display, imported only when a figure is drawn."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any


def png_bytes(draw: Callable[[Any], None], size: tuple[float, float] = (9.0, 5.0)) -> bytes:
    """`draw(figure)` onto a new matplotlib figure, rendered as PNG bytes (no window, no global state kept)."""
    from matplotlib.figure import Figure  # a bare Figure needs no pyplot backend

    figure = Figure(figsize=size, dpi=110, layout="constrained")
    draw(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
