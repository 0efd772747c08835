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
from dataclasses import asdict, dataclass, field
from pathlib import Path

from splice.plots import png_bytes

REPORT_JSON = "port_report.json"
REPORT_PNG = "port_report.png"
LARGE_CHANGE = 0.25  # base change above this: beyond what the residual argument covers
ALIGNED = 0.5  # |cosine| above this: the base itself moved along (or against) the patch's update


@dataclass(frozen=True)
class TensorDrift:
    name: str
    old_norm: float  # ||W|| (from the patch's fingerprint when the old base is not given)
    new_norm: float  # ||W'||
    update_norm: float  # ||U||, the patch's update on its own base (before --scale)
    change_norm: float | None = None  # ||W' - W||; None: the old base's values are unknown
    dot: float | None = None  # <W' - W, U>
    changed: bool | None = None  # W' differs from W (None: unknown)

    @property
    def base_change(self) -> float | None:
        return None if self.change_norm is None else _ratio(self.change_norm, self.old_norm)

    @property
    def base_change_at_least(self) -> float:
        return _ratio(abs(self.new_norm - self.old_norm), self.old_norm)

    @property
    def cosine(self) -> float | None:
        if self.dot is None or not self.change_norm or not self.update_norm:
            return None
        return self.dot / (self.change_norm * self.update_norm)

    @property
    def update_to_change(self) -> float | None:
        return None if not self.change_norm else self.update_norm / self.change_norm

    def as_dict(self) -> dict:
        return {**asdict(self), "base_change": self.base_change, "base_change_at_least": self.base_change_at_least,
                "cosine": self.cosine, "update_to_change": self.update_to_change}


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else (0.0 if not numerator else math.inf)


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
        return all(t.change_norm is not None for t in self.tensors)

    @property
    def base_change(self) -> float | None:
        if not self.measured:
            return None
        return _ratio(_root_sum(t.change_norm for t in self.tensors), _root_sum(t.old_norm for t in self.tensors))

    @property
    def base_change_at_least(self) -> float:
        """A lower bound of `base_change` from norms alone (each |‖W'‖ - ‖W‖| <= ‖W' - W‖)."""
        return _ratio(_root_sum(abs(t.new_norm - t.old_norm) for t in self.tensors),
                      _root_sum(t.old_norm for t in self.tensors))

    @property
    def cosine(self) -> float | None:
        if not self.measured:
            return None
        change, update = _root_sum(t.change_norm for t in self.tensors), _root_sum(t.update_norm for t in self.tensors)
        return sum(t.dot for t in self.tensors) / (change * update) if change and update else None

    @property
    def update_to_change(self) -> float | None:
        if not self.measured:
            return None
        change = _root_sum(t.change_norm for t in self.tensors)
        return _root_sum(t.update_norm for t in self.tensors) / change if change else None

    @property
    def unchanged(self) -> bool:
        return bool(self.tensors) and all(t.changed is False for t in self.tensors)

    def summary(self) -> dict:
        """The figures a registry keeps of this port (no per-tensor table)."""
        return _finite({"verdict": self.verdict, "reason": self.reason, "base_change": self.base_change,
                        "base_change_at_least": self.base_change_at_least, "cosine": self.cosine,
                        "update_to_change": self.update_to_change, "tensors": len(self.tensors),
                        "changed_tensors": sum(t.changed is not False for t in self.tensors), "scale": self.scale})

    def as_dict(self) -> dict:
        return {"patch": self.patch, "kind": self.kind, "old_base": self.old_base, "old_digest": self.old_digest,
                "new_base": self.new_base, "new_digest": self.new_digest, "notes": self.notes, **self.summary(),
                "per_tensor": [t.as_dict() for t in self.tensors]}

    def json_bytes(self) -> bytes:
        return (json.dumps(_finite(self.as_dict()), indent=2, allow_nan=False) + "\n").encode()

    def files(self) -> dict[str, bytes]:
        """The report as the files written beside the output: port_report.json and port_report.png (drawn once)."""
        if self._files is None:
            self._files = {REPORT_JSON: self.json_bytes(),
                           REPORT_PNG: png_bytes(self._draw, size=(10.0, 5.5), layout=None)}
        return self._files

    def save(self, directory: str | Path) -> list[Path]:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for name, data in self.files().items():
            (directory / name).write_bytes(data)
            written.append(directory / name)
        return written

    def _draw(self, figure) -> None:
        """Per patched tensor: the base change (and the patch update) in % of ||W||, and the cosine. Drawn as
        line collections (one artist per series), which stays fast for models with hundreds of tensors."""
        names = [t.name for t in self.tensors]
        positions = list(range(len(names)))
        figure.subplots_adjust(left=0.08, right=0.98, top=0.93, bottom=0.42, hspace=0.12)  # room for tensor names
        change_axes, cosine_axes = figure.subplots(2, 1, sharex=True)
        if self.measured:
            change_axes.vlines(positions, 0, [_shown(100 * t.base_change) for t in self.tensors], color="tab:blue",
                               linewidth=3, label="base change ||W'-W|| / ||W||")
            change_axes.plot(positions, [100 * t.update_norm / t.old_norm if t.old_norm else math.nan
                                         for t in self.tensors], ".", color="tab:orange",
                             label="patch update ||U|| / ||W||")
            cosine_axes.vlines(positions, 0, [t.cosine or 0.0 for t in self.tensors], color="tab:green", linewidth=3)
            cosine_axes.set_ylim(-1, 1)
        else:
            change_axes.vlines(positions, 0, [_shown(100 * t.base_change_at_least) for t in self.tensors],
                               color="tab:blue", linewidth=3, label="base change, at least (norms only)")
            cosine_axes.text(0.5, 0.5, "direction unknown: give the old base (--from) to measure it",
                             ha="center", va="center", transform=cosine_axes.transAxes)
        change_axes.set_ylim(bottom=0)
        change_axes.set_ylabel("% of ||W||")
        change_axes.legend(loc="upper right", fontsize="small")
        change_axes.set_title(f"{_short(self.patch, 50)} -> {_short(self.new_base, 50)}: {self.verdict}",
                              fontsize="medium")
        cosine_axes.set_ylabel("cos(W'-W, U)")
        cosine_axes.axhline(0, color="black", linewidth=0.5)
        step = max(1, -(-len(names) // 24))
        cosine_axes.set_xticks(positions[::step], [_short(n) for n in names[::step]], rotation=90,
                               fontsize="x-small")


def _shown(value: float) -> float:
    """A bar's height: an infinite ratio (from an all-zero base tensor) is left out."""
    return value if math.isfinite(value) else math.nan


def _short(name: str, keep: int = 36) -> str:
    return name if len(name) <= keep else "..." + name[-keep + 3:]


def _root_sum(values) -> float:
    return math.sqrt(sum(v * v for v in values))


def _finite(value):
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
    if not report.measured:
        if report.old_digest is None:
            return "unmeasured", ("no record of the base the patch was made on; give it (--from OLD_BASE) to measure "
                                  "how far the base moved")
        least = report.base_change_at_least
        if least > LARGE_CHANGE:
            return "check before deploying", (f"the base moved at least {least:.1%} in {where} (norms only): "
                                              "evaluate the ported model before deploying it")
        return "unmeasured", (f"norms moved by at most {least:.1%}, but the change itself is unknown; give the old "
                              "base (--from OLD_BASE) to measure it")
    change, cosine, ratio = report.base_change, report.cosine or 0.0, report.update_to_change
    moved = f"base moved {change:.1%} in {where}"
    relation = f"patch update {ratio:.2g}x that change" if ratio is not None else "no patch update"
    if change > LARGE_CHANGE:
        return "check before deploying", (f"{moved}, beyond what PortLLM's residual argument covers; evaluate the "
                                          "ported model (--eval) before deploying it")
    if abs(cosine) > ALIGNED:
        effect = ("along the patch's own update (cos {:+.2f}): the ported update may overshoot; try --scale below 1"
                  if cosine > 0 else "against the patch's own update (cos {:+.2f}): the evolution undid part of it")
        return "check before deploying", f"{moved}, {effect.format(cosine)}; evaluate before deploying"
    return "expected to transfer", f"{moved}; {relation}, nearly orthogonal to it (cos {cosine:+.2f})"
