"""Optimal-transport fusion of transformers (Imfeld et al., "Transformer Fusion with Optimal Transport",
ICLR 2024): per-layer transport maps carried through residual streams, heads and LayerNorms, on POT.

`architectures` holds one declarative description per architecture; `options` the validated `FusionOptions`;
`plan` unrolls and checks each model's description; `maps` solves the transport maps of one model onto the
anchor and `align` carries them through its tensors; `streams` what the residual policies read; `driver` is
`fuse`, which does all of it in order. `transport` holds the costs, solvers and map statistics, `activations`
the forward hooks, `report` the per-map and per-layer report written as `fusion_report.json`.
"""

from splice.merge.fusion.architectures import ARCHITECTURES, Architecture
from splice.merge.fusion.driver import fuse
from splice.merge.fusion.options import FusionOptions
from splice.merge.fusion.plan import plan
from splice.merge.fusion.report import REPORT_FILE, FusionReport, LayerStat, MapStat

__all__ = [
    "ARCHITECTURES",
    "REPORT_FILE",
    "Architecture",
    "FusionOptions",
    "FusionReport",
    "LayerStat",
    "MapStat",
    "fuse",
    "plan",
]
