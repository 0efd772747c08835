"""PNG figures beside a report's JSON: matplotlib without a display, imported only when a figure is drawn, or
drawn by a child process that imports it while the caller works (`FigureProcess`)."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any, Literal

Layout = Literal["constrained", "compressed", "tight"] | None


def png_bytes(
    draw: Callable[[Any], None],
    size: tuple[float, float] = (9.0, 5.0),
    layout: Layout = "tight",
) -> bytes:
    """`draw(figure)` onto a new matplotlib figure, rendered as PNG bytes (no window, no global state kept).
    `layout`: matplotlib's layout engine ("tight" by default; None for figures that place their own margins)."""
    from matplotlib.figure import Figure  # a bare Figure needs no pyplot backend

    figure = Figure(figsize=size, dpi=110, layout=layout)
    draw(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


# The child: matplotlib imported with the modules named in argv, and a small figure drawn (fonts, the mathtext parser
# of log-scale tick labels, a legend: first-use costs), then one pickled (draw, size, layout) read from stdin and its
# PNG written to stdout; it then leaves without the interpreter's tear-down (its caller waits for it). It imports
# neither torch nor the caller's data, only what `draw` pickles.
_CHILD = """
import importlib, os, pickle, sys
import matplotlib.figure, matplotlib.backends.backend_agg
from splice.plots import png_bytes, warm_up
for module in sys.argv[1:]:
    importlib.import_module(module)
png_bytes(warm_up, (2.0, 1.5), None)
draw, size, layout = pickle.load(sys.stdin.buffer)
sys.stdout.buffer.write(png_bytes(draw, size, layout))
sys.stdout.buffer.flush()
os._exit(0)
"""
FIGURE_TIMEOUT_S = 300.0


def warm_up(figure: Any) -> None:
    """What a figure process draws while it waits (~7% off its first real figure)."""
    axes = figure.add_subplot()
    axes.plot([1e-3, 1.0], [0, 1], label="warm-up")
    axes.set_xscale("log")
    axes.legend(fontsize="x-small")
    figure.suptitle("warm-up", fontsize="medium")


class FigureProcess:
    """One figure drawn by a child process started now, so that matplotlib's start-up (~0.5 s: imports, fonts)
    overlaps the caller's work instead of adding to it; `png` then pays only the drawing. Where the child cannot
    give the figure (it died, or a figure fails in it), `png` draws it in this process, so the bytes (or the
    error) are what `png_bytes` gives. Where this process has imported matplotlib already, no child is started: the
    figure is drawn here, for the drawing alone. `preload`: modules the child imports while it waits (those `draw`
    needs). A context manager: leaving it ends a child that is still running."""

    def __init__(self, preload: Sequence[str] = ()) -> None:
        self.child: subprocess.Popen | None = None
        if "matplotlib.figure" in sys.modules:
            return
        path = os.pathsep.join(p for p in sys.path if p)  # the child imports splice and `draw` as this process does
        try:
            self.child = subprocess.Popen(
                [sys.executable, "-c", _CHILD, *preload],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": path, "MPLBACKEND": "agg"},
            )
        except OSError:
            self.child = None

    def png(self, draw: Callable[[Any], None], size: tuple[float, float], layout: Layout = "tight") -> bytes:
        """`png_bytes(draw, size, layout)`, drawn by the child (`draw` must pickle: a module-level function or a
        method of a picklable object)."""
        child, self.child = self.child, None
        if child is not None:
            try:
                data, _ = child.communicate(pickle.dumps((draw, size, layout)), timeout=FIGURE_TIMEOUT_S)
                if child.returncode == 0 and data:
                    return data
            except (OSError, subprocess.TimeoutExpired, pickle.PicklingError, AttributeError, TypeError):
                pass  # (a `draw` that does not pickle, a child that died or hung): drawn here instead
            finally:
                _end(child)
        return png_bytes(draw, size, layout)

    def close(self) -> None:
        child, self.child = self.child, None
        if child is not None:
            _end(child)

    def __enter__(self) -> FigureProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _end(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.kill()
    child.wait()
    for stream in (child.stdin, child.stdout):
        if stream is not None:
            stream.close()
