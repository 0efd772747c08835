"""PNG figures beside a report's JSON: matplotlib without a display, imported only when a figure is drawn."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any, Literal


def png_bytes(
    draw: Callable[[Any], None],
    size: tuple[float, float] = (9.0, 5.0),
    layout: Literal["constrained", "compressed", "tight"] | None = "tight",
) -> bytes:
    """`draw(figure)` onto a new matplotlib figure, rendered as PNG bytes (no window, no global state kept).
    `layout`: matplotlib's layout engine ("tight" by default; None for figures that place their own margins)."""
    from matplotlib.figure import Figure  # a bare Figure needs no pyplot backend

    figure = Figure(figsize=size, dpi=110, layout=layout)
    draw(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
