"""Optimal-transport fusion of transformers (Imfeld et al., "Transformer Fusion with Optimal Transport",
ICLR 2024): per-layer transport maps carried through residual streams, heads and LayerNorms, on POT.

`architectures` holds one declarative description per architecture; `engine` is the one generic engine
that reads them; `transport` the costs, solvers and map statistics; `activations` the forward hooks;
`report` the per-map and per-layer report written as `fusion_report.json`.
"""

from splice.merge.fusion.architectures import ARCHITECTURES, Architecture
from splice.merge.fusion.engine import fuse, plan
from splice.merge.fusion.report import REPORT_FILE, FusionReport, LayerStat, MapStat

__all__ = ["ARCHITECTURES", "REPORT_FILE", "Architecture", "FusionReport", "LayerStat", "MapStat", "fuse", "plan"]
