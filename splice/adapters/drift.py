"""The drift report of a port: how far the base moved in the tensors a patch changes, against the patch's update.

Per patched tensor W (old base), W' (new base) and the patch's update U on its own base:
    base change      ||W' - W|| / ||W||
    cosine           <W' - W, U> / (||W' - W|| ||U||)
    update / change  ||U|| / ||W' - W||
Aggregates take the tensors together (as one long vector). Without the old base's values only the norms its
fingerprint recorded are known: |‖W'‖ - ‖W‖| / ‖W‖ is then a lower bound of the base change.

Verdict (heuristic thresholds, in the README): PortLLM's argument is that the new base's best update differs
from the old one by a negligible residual; that is plausible when the base moved little where the patch acts
and not along the patch's own direction.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splice.plots import FigureProcess, png_bytes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

REPORT_JSON = "port_report.json"
REPORT_PNG = "port_report.png"
REPORT_FILES = (REPORT_JSON, REPORT_PNG)
LARGE_CHANGE = 0.25  # base change above this: beyond what the residual argument covers
ALIGNED = 0.5  # |cosine| above this: the base itself moved along (or against) the patch's update
MAX_PLOT_ROWS = 64  # a plot panel with more tensors than this draws one row per layer
# The figure places its own margins (from its labels' measured widths): a layout engine draws the figure twice, ~40%
# more of the time a port waits for its PNG.
PNG_LAYOUT = None
ROW_LABEL_POINTS = 7  # the rows' labels: drawn at this size, and measured at it for the left margin


@dataclass(frozen=True)
class TensorDrift:
    name: str
    old_norm: float | None  # ||W|| (from the patch's fingerprint when the old base is not given; None: unknown)
    new_norm: float  # ||W'||
    update_norm: float  # ||U||, the patch's update on its own base (before --scale)
    change_norm: float | None = None  # ||W' - W||; None: the old base's values are unknown
    dot: float | None = None  # <W' - W, U>
    changed: bool | None = None  # W' differs from W (None: unknown)
    shape: tuple[int, ...] = ()  # the tensor's shape (the plot draws matrices and vectors apart)

    @property
    def base_change(self) -> float | None:
        if self.change_norm is None or self.old_norm is None:  # both are known when the old base was read
            return None
        return _ratio(self.change_norm, self.old_norm)

    @property
    def base_change_at_least(self) -> float | None:
        """None when nothing records ||W|| (a PEFT adapter without --from)."""
        return None if self.old_norm is None else _ratio(abs(self.new_norm - self.old_norm), self.old_norm)

    @property
    def cosine(self) -> float | None:
        if self.dot is None or not self.change_norm or not self.update_norm:
            return None
        return _clamped(self.dot / (self.change_norm * self.update_norm))

    @property
    def update_share(self) -> float | None:
        """||U|| / ||W|| (||W'|| when ||W|| is unknown): how large the patch's update is against the tensor."""
        norm = self.new_norm if self.old_norm is None else self.old_norm
        return _ratio(self.update_norm, norm)

    @property
    def update_to_change(self) -> float | None:
        return None if not self.change_norm else self.update_norm / self.change_norm

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "base_change": self.base_change,
            "base_change_at_least": self.base_change_at_least,
            "cosine": self.cosine,
            "update_to_change": self.update_to_change,
        }


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else (0.0 if not numerator else math.inf)


def _clamped(cosine: float) -> float:
    """A cosine from rounded sums can leave [-1, 1] by an ulp or two (1.0000000053): held to its range."""
    return max(-1.0, min(1.0, cosine))


def percent(value: float | None) -> str:
    """A ratio as the report's table and its verdict both print it."""
    if value is None:
        return "unknown"
    return "from 0" if value == math.inf else f"{value:.2%}"


@dataclass
class DriftReport:
    patch: str  # where the patch came from (a path, or name@version)
    kind: str
    new_base: str
    new_digest: str  # fingerprint digest of the new base (the ported patch's)
    old_base: str | None  # the old base's location, when given
    old_digest: str | None  # the digest of the base the patch was made on (None: no record and not given)
    scale: float
    tensors: list[TensorDrift]
    notes: list[str] = field(default_factory=list)  # what a user should know about how it was ported
    verdict: str = ""
    reason: str = ""
    _files: dict[str, bytes] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.verdict:
            self.verdict, self.reason = judge(self)

    @property
    def measured(self) -> bool:
        """The old base's values were read: the change itself and its direction are known."""
        return self._measurements() is not None

    def _measurements(self) -> list[tuple[float, float, float]] | None:
        """Per tensor (||W||, ||W' - W||, <W' - W, U>), known when the port read the old base; else None."""
        found = [
            (t.old_norm, t.change_norm, t.dot)
            for t in self.tensors
            if t.old_norm is not None and t.change_norm is not None and t.dot is not None
        ]
        return found if len(found) == len(self.tensors) else None

    @property
    def base_change(self) -> float | None:
        found = self._measurements()
        if found is None:
            return None
        return _ratio(_root_sum(change for _, change, _ in found), _root_sum(old for old, _, _ in found))

    @property
    def base_change_at_least(self) -> float | None:
        """A lower bound of `base_change` from norms alone (each |‖W'‖ - ‖W‖| <= ‖W' - W‖); None when no record
        of the old base's norms exists (a PEFT adapter without --from)."""
        norms = [(t.new_norm, t.old_norm) for t in self.tensors if t.old_norm is not None]
        if len(norms) < len(self.tensors):
            return None
        return _ratio(_root_sum(abs(new - old) for new, old in norms), _root_sum(old for _, old in norms))

    @property
    def cosine(self) -> float | None:
        found = self._measurements()
        if found is None:
            return None
        change, update = _root_sum(c for _, c, _ in found), _root_sum(t.update_norm for t in self.tensors)
        return _clamped(sum(dot for _, _, dot in found) / (change * update)) if change and update else None

    @property
    def update_to_change(self) -> float | None:
        found = self._measurements()
        if found is None:
            return None
        change = _root_sum(c for _, c, _ in found)
        return _root_sum(t.update_norm for t in self.tensors) / change if change else None

    @property
    def unchanged(self) -> bool:
        return bool(self.tensors) and all(t.changed is False for t in self.tensors)

    def summary(self) -> dict:
        """The figures a registry keeps of this port (no per-tensor table)."""
        return _finite(
            {
                "verdict": self.verdict,
                "reason": self.reason,
                "base_change": self.base_change,
                "base_change_at_least": self.base_change_at_least,
                "cosine": self.cosine,
                "update_to_change": self.update_to_change,
                "tensors": len(self.tensors),
                "changed_tensors": sum(t.changed is not False for t in self.tensors),
                "scale": self.scale,
            }
        )

    def as_dict(self) -> dict:
        return {
            "patch": self.patch,
            "kind": self.kind,
            "old_base": self.old_base,
            "old_digest": self.old_digest,
            "new_base": self.new_base,
            "new_digest": self.new_digest,
            "notes": self.notes,
            **self.summary(),
            "per_tensor": [t.as_dict() for t in self.tensors],
        }

    def json_bytes(self) -> bytes:
        return (json.dumps(_finite(self.as_dict()), indent=2, allow_nan=False) + "\n").encode()

    def files(self, figures: FigureProcess | None = None) -> dict[str, bytes]:
        """The report as the files written beside the output: port_report.json and port_report.png (drawn once; by
        `figures`' child process when given, so that matplotlib's start-up is not paid here)."""
        if self._files is None:
            size = self._figure_size()
            png = figures.png(self._draw, size, PNG_LAYOUT) if figures else png_bytes(self._draw, size, PNG_LAYOUT)
            self._files = {REPORT_JSON: self.json_bytes(), REPORT_PNG: png}
        return self._files

    def save(self, directory: str | os.PathLike, force: bool = False) -> list[Path]:
        """port_report.json and port_report.png into `directory`, by the output rule (`force` replaces them)."""
        from splice.tensors.writer import write_report_files  # torch: kept out of `registry show`'s imports

        return write_report_files(directory, self.files(), force)

    @property
    def update_share(self) -> float | None:
        """||U|| / ||W|| over the patched tensors together (||W'|| where ||W|| is unknown)."""
        norms = [t.new_norm if t.old_norm is None else t.old_norm for t in self.tensors]
        return _ratio(_root_sum(t.update_norm for t in self.tensors), _root_sum(norms))

    def _panels(self) -> list[tuple[str, list[tuple[str, TensorDrift | DriftReport]]]]:
        """The plot's panels: matrices and vectors apart (a bias's ||U||/||W|| can be 1000x a matrix's), each a
        row per tensor, or per layer (the tensors' figures together) when a panel would hold too many rows."""
        panels: list[tuple[str, list[tuple[str, TensorDrift | DriftReport]]]] = []
        rows: list[tuple[str, TensorDrift | DriftReport]]
        for title, part in (
            ("matrices", [t for t in self.tensors if len(t.shape) >= 2]),
            ("vectors (biases, norms, scales)", [t for t in self.tensors if len(t.shape) < 2]),
        ):
            if len(part) > MAX_PLOT_ROWS:
                layers: dict[str, list[TensorDrift]] = {}
                for t in part:
                    layers.setdefault(_layer_of(t.name), []).append(t)
                rows = [
                    (f"{layer} ({len(ts)} tensors)", replace(self, tensors=ts, verdict="-", _files=None))
                    for layer, ts in sorted(layers.items(), key=_layer_order)
                ]
                title += f", per layer ({len(part)} tensors)"
            else:
                rows = [(_short(t.name, 48), t) for t in part]
            if rows:
                panels.append((title, rows))
        return panels

    def _figure_size(self) -> tuple[float, float]:
        panels = self._panels()
        return 11.0, 1.6 + 0.9 * len(panels) + 0.16 * sum(len(rows) for _, rows in panels)

    def _draw(self, figure: Figure) -> None:
        """Per patched tensor (or layer), as horizontal bars so that every name can be read: the base change
        and the patch update in % of ||W|| on a log scale with the 25% threshold, and the cosine with +-0.5."""
        panels = self._panels()
        grid = figure.add_gridspec(
            len(panels),
            2,
            width_ratios=[3, 1.4],
            height_ratios=[len(rows) + 2 for _, rows in panels],
            **_margins(figure, panels),
        )
        figure.suptitle(f"{_short(self.patch, 50)} -> {_short(self.new_base, 50)}: {self.verdict}", fontsize="medium")
        for index, (title, rows) in enumerate(panels):
            change_axes = figure.add_subplot(grid[index, 0])
            cosine_axes = figure.add_subplot(grid[index, 1], sharey=change_axes)
            self._draw_panel(title, rows, change_axes, cosine_axes, legend=index == 0)

    def _draw_panel(
        self,
        title: str,
        rows: list[tuple[str, TensorDrift | DriftReport]],
        change_axes: Axes,
        cosine_axes: Axes,
        legend: bool,
    ) -> None:
        positions = list(range(len(rows)))
        figures = [item for _, item in rows]
        change = [item.base_change if self.measured else item.base_change_at_least for item in figures]
        update = [item.update_share for item in figures]
        shown = [100 * v for v in (*change, *update) if v is not None and 0 < v < math.inf]
        low = 10 ** math.floor(math.log10(min(shown) / 2)) if shown else 1e-3
        change_label = "base change ||W'-W|| / ||W||" if self.measured else "base change, at least (norms only)"
        change_axes.hlines(
            positions,
            low,
            [_shown(100 * v) if v else math.nan for v in change],
            color="tab:blue",
            linewidth=4,
            label=change_label,
        )
        known = all(t.old_norm is not None for t in self.tensors)
        change_axes.plot(
            [_shown(100 * v) if v else math.nan for v in update],
            positions,
            "o",
            color="tab:orange",
            markersize=3.5,
            label="patch update ||U|| / ||W||" if known else "patch update ||U|| / ||W'||",
        )
        for position, ratios in enumerate(zip(change, update)):
            if math.inf in ratios:  # a base tensor that was all zeros: no ratio to draw
                change_axes.text(low, position, " ||W|| = 0: no ratio", va="center", fontsize=6)
        change_axes.axvline(
            100 * LARGE_CHANGE,
            color="tab:red",
            linestyle="--",
            linewidth=1,
            label=f"{LARGE_CHANGE:.0%} change: check before deploying",
        )
        change_axes.set_xscale("log")
        change_axes.set_xlim(left=low)
        change_axes.set_yticks(positions, [label for label, _ in rows], fontsize=ROW_LABEL_POINTS)
        change_axes.set_ylim(len(rows) - 0.5, -0.5)
        change_axes.set_xlabel("% of ||W|| (log scale)", fontsize="small")
        change_axes.set_title(title, fontsize="small", loc="left")
        change_axes.grid(axis="x", which="major", linewidth=0.3)
        if not any(v is not None for v in change):
            change_axes.text(
                0.99,
                0.5,
                "base change unknown:\ngive the old base (--from)",
                ha="right",
                va="center",
                fontsize="small",
                transform=change_axes.transAxes,
                bbox=_NOTE_BOX,
            )
        if legend:
            change_axes.legend(loc="lower left", bbox_to_anchor=(0, 1.06), ncol=3, fontsize="x-small", frameon=False)
        cosine_axes.tick_params(axis="y", labelleft=False)
        cosine_axes.set_xlim(-1, 1)
        cosine_axes.axvline(0, color="black", linewidth=0.5)
        for bound in (-ALIGNED, ALIGNED):
            cosine_axes.axvline(bound, color="tab:red", linestyle="--", linewidth=1)
        cosine_axes.set_xlabel(f"cos(W'-W, U); |cos| > {ALIGNED} aligned", fontsize="small")
        if self.measured:
            cosines = [item.cosine or 0.0 for item in figures]
            cosine_axes.hlines(positions, 0, cosines, color="tab:green", linewidth=4)
            cosine_axes.plot(cosines, positions, "|", color="tab:green", markersize=6)  # seen when near 0
        else:
            cosine_axes.text(
                0.5,
                0.5,
                "direction unknown:\ngive the old base (--from)",
                ha="center",
                va="center",
                fontsize="small",
                transform=cosine_axes.transAxes,
                bbox=_NOTE_BOX,
            )


_NOTE_BOX = {"facecolor": "white", "edgecolor": "0.7", "boxstyle": "round"}


def _margins(figure: Figure, panels: list[tuple[str, list[tuple[str, Any]]]]) -> dict[str, float]:
    """The grid's margins and gaps (figure fractions) from inches: the widest row label at the left; at the top the
    title, the legend and a panel's title; between panels an axis label and the next panel's title."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import text_to_path

    width, height = figure.get_size_inches()
    font = FontProperties(size=ROW_LABEL_POINTS)
    label_points = max(
        text_to_path.get_text_width_height_descent(label, font, ismath=False)[0]
        for _, rows in panels
        for label, _ in rows
    )
    left, right, top, bottom, column_gap, panel_gap = label_points / 72 + 0.3, 0.25, 0.8, 0.55, 0.35, 0.75
    cell_width = (width - left - right - column_gap) / 2
    cell_height = (height - top - bottom - panel_gap * (len(panels) - 1)) / len(panels)
    return {
        "left": left / width,
        "right": 1 - right / width,
        "top": 1 - top / height,
        "bottom": bottom / height,
        "wspace": column_gap / cell_width,
        "hspace": panel_gap / cell_height,
    }


def _layer_of(name: str) -> str:
    """The group a tensor is plotted in when there are too many: its layer number, else its module's path."""
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return f"layer {match.group(1)}" if match else name.rsplit(".", 2)[0]


def _layer_order(item: tuple[str, Any]) -> tuple[str, int]:
    """Layers in their numeric order (layer 9 before layer 10), whatever order the checkpoint stores them in."""
    match = re.fullmatch(r"layer (\d+)", item[0])
    return ("", int(match.group(1))) if match else (item[0], 0)


def _shown(value: float) -> float:
    """A bar's height: an infinite ratio (from an all-zero base tensor) is left out."""
    return value if math.isfinite(value) else math.nan


def _short(name: str, keep: int = 36) -> str:
    return name if len(name) <= keep else "..." + name[-keep + 3 :]


def _root_sum(values: Iterable[float]) -> float:
    return math.sqrt(sum(v * v for v in values))


def _finite(value: Any) -> Any:
    """JSON-ready: an infinite ratio (a base tensor that was all zeros, e.g. a LayerNorm bias) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def judge(report: DriftReport) -> tuple[str, str]:
    """(verdict, the reason in one sentence)."""
    count = len(report.tensors)
    where = f"the {count} tensors the patch changes" if count != 1 else "the tensor the patch changes"
    if report.unchanged:
        return "unchanged", f"the new base has the same values in {where}: porting equals applying the patch"
    change = report.base_change
    if change is None:  # not `measured`: the old base's values were not read
        least = report.base_change_at_least
        if report.old_digest is None or least is None:
            return "unmeasured", (
                "no record of the base the patch was made on; give it (--from OLD_BASE) to measure "
                "how far the base moved"
            )
        if least > LARGE_CHANGE:
            return "check before deploying", (
                f"the base moved at least {percent(least)} in {where} (norms only): "
                "evaluate the ported model before deploying it"
            )
        return "unmeasured", (
            f"the base moved at least {percent(least)} in {where} (norms only), maybe more: give "
            "the old base (--from OLD_BASE) to measure the change itself"
        )
    cosine, ratio = report.cosine or 0.0, report.update_to_change
    moved = f"base moved {percent(change)} in {where}"
    relation = f"patch update {ratio:.2g}x that change" if ratio is not None else "no patch update"
    if change > LARGE_CHANGE:
        return "check before deploying", (
            f"{moved}, beyond what PortLLM's residual argument covers; evaluate the "
            "ported model (--eval) before deploying it"
        )
    if abs(cosine) > ALIGNED:
        effect = (
            "along the patch's own update (cos {:+.2f}): the ported update may overshoot; try --scale below 1"
            if cosine > 0
            else "against the patch's own update (cos {:+.2f}): the evolution undid part of it"
        )
        return "check before deploying", f"{moved}, {effect.format(cosine)}; evaluate before deploying"
    return "expected to transfer", f"{moved}; {relation}, nearly orthogonal to it (cos {cosine:+.2f})"
