"""The fusion report: per transport map and per layer, saved as `fusion_report.json` beside the fused model."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from splice.tensors.writer import write_output_file

REPORT_FILE = "fusion_report.json"


@dataclass(frozen=True)
class MapStat:
    """One transport map of one model onto the anchor."""

    model: int  # index of the aligned model in the inputs
    layer: str  # "embeddings", "layer 3", "head"
    space: str  # "q", "mlp", "stream", ...
    kind: str  # "ot": solved here; "residual": combined from other maps by the residual policy
    width: tuple[int, int]  # (the model's neurons, the anchor's)
    permutation_closeness: float  # 1: a hard assignment (a permutation between equal widths)
    cost: float | None = None  # <T, M>, M divided by its max; None for combined maps
    cross_head_mass: float | None = None  # head-structured spaces: mass moved to another head index
    head_split_mass: float | None = None  # head-structured spaces: mass not following its head's main match
    skip_weight: float | None = None  # weighted residual policies: the skip map's weight, mean over anchor neurons


@dataclass(frozen=True)
class LayerStat:
    """The maps of one layer of one model, summarised."""

    model: int
    layer: str
    maps: int
    cost: float | None  # mean transport cost of the solved maps (None: the layer's maps were all combined)
    permutation_closeness: float  # lowest closeness among the layer's maps
    cross_head_mass: float | None  # mean over the layer's head-structured maps
    head_split_mass: float | None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass
class FusionReport:
    out: Path
    architecture: str
    models: list[str]
    anchor: int
    align: str
    solver: str
    reg: float | None
    residual: str
    qk: str
    heads: str  # "mixed" (neurons may change heads) or "whole" (heads matched as units)
    samples: int  # inputs used for activations (0 for weight-based alignment)
    tokens: int  # activation rows per neuron (0 for weight-based alignment)
    widths: list[dict[str, int]]  # per model: hidden size, intermediate size, heads as stored
    device: str
    seconds: float = 0.0
    maps: list[MapStat] = field(default_factory=list)
    # wall seconds per phase: read (checkpoints into memory), activations (forward passes with hooks), ot
    # (neuron points, cost matrices and solves), transport (aligning and averaging the weights), write, total
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # e.g. where the solver really ran

    def timing_summary(self) -> str:
        """'activations 3.1s, OT 5.2s, ...' for the phases that were timed ('' if none)."""
        labels = {"read": "read", "activations": "activations", "ot": "OT", "transport": "transport", "write": "write"}
        return ", ".join(f"{label} {self.timings[key]:.1f}s" for key, label in labels.items() if key in self.timings)

    @property
    def layers(self) -> list[LayerStat]:
        groups: dict[tuple[int, str], list[MapStat]] = {}
        for stat in self.maps:
            groups.setdefault((stat.model, stat.layer), []).append(stat)
        out = []
        for (model, layer), stats in groups.items():
            out.append(
                LayerStat(
                    model,
                    layer,
                    len(stats),
                    _mean([s.cost for s in stats if s.cost is not None]),
                    min(s.permutation_closeness for s in stats),
                    _mean([s.cross_head_mass for s in stats if s.cross_head_mass is not None]),
                    _mean([s.head_split_mass for s in stats if s.head_split_mass is not None]),
                )
            )
        return out

    def to_json(self) -> dict:
        data = asdict(self)
        data["out"] = str(self.out)
        data["layers"] = [asdict(layer) for layer in self.layers]
        return data

    def save(self, directory: Path) -> Path:
        return write_output_file(Path(directory) / REPORT_FILE, (json.dumps(self.to_json(), indent=2) + "\n").encode())
