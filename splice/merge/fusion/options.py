"""Every option `fuse` takes, checked when made: a bad value is a one-line error before any model is read."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from splice.errors import SpliceError
from splice.merge.fusion import transport
from splice.merge.fusion.activations import DataSource

ALIGNMENTS = ("activations", "weights")
QK_POLICIES = ("separate", "shared", "joint")
HEAD_POLICIES = ("mixed", "whole")
DEFAULT_TOKENS = 4096
RUN_FIELDS = ("device", "shard_size", "force")  # RunOptions' fields FusionOptions has always taken too


def _one_of(kind: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SpliceError(f"unknown {kind} {value!r}: use one of {', '.join(allowed)}")


@dataclass(frozen=True)
class FusionOptions:
    """How to fuse.

    data: inputs for activation alignment: a dict of input tensors (or one tensor), a function returning
      one (given the anchor's location if it takes an argument), or 'MODULE:FUNCTION' / 'file.py:FUNCTION'.
      The first `samples` inputs are used, and about `tokens` token positions of them per neuron.
    align: "activations" (neurons compared by their standardised activations) or "weights" (by their
      unit-normalised, input-aligned incoming weights; no data needed).
    solver: "emd" (exact, hard maps) or "sinkhorn" (entropic with `reg`, log-domain below 0.05).
    anchor: the index of the model whose widths, neuron order, config and side files the output keeps.
    residual: how maps combine where streams add: "average" (default), "skip", "branch", "identity", or
      weighted by each stream's mean |activation| in the anchor at that add: "weighted_scalar" (one weight per
      stream) or "weighted_matrix" (one per stream and neuron). The weighted policies need `data`; with
      align="weights" only the anchor is run on it, to measure its streams. Beyond the paper, "stream": one
      map for the whole residual stream, from its activations wherever it enters a block, that every
      embedding, attention output and MLP output written into the stream is aligned with (activations only).
    qk: "separate" maps for queries and keys, one "shared" map from both, or "joint": [W_Q; W_K] fused as one
      layer (one map over the query and key neurons together).
    heads: "mixed" (the paper's cross-head alignment: any neuron may move to any head) or "whole" (beyond
      the paper: heads are matched as units, from the summed costs of their Q/K and V within-head maps, so a
      head keeps its queries, keys and values together). With residual="stream", heads="whole", qk="shared"
      and solver="emd" between equal widths every map is a permutation consistent with the data flow: the
      aligned model computes exactly what it computed before alignment.
    device ("auto", "cpu", "cuda" or "cuda:N"), shard_size (bytes per output shard), force (replace `out`): how
      the run runs, as `fuse`'s `run` (a `RunOptions`) says; set here (None: not set), they are put into it.
    """

    data: DataSource | None = field(default=None, repr=False)  # a batch may be large
    align: str = "activations"
    solver: str = "emd"
    reg: float = 0.08
    anchor: int = 0
    samples: int = 200
    residual: str = "average"
    qk: str = "separate"
    heads: str = "mixed"
    tokens: int = DEFAULT_TOKENS
    device: str | None = None
    shard_size: int | None = None
    force: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "reg", float(self.reg))
        _one_of("alignment", self.align, ALIGNMENTS)
        _one_of("solver", self.solver, transport.SOLVERS)
        if self.solver == "sinkhorn" and not self.reg > 0:
            raise SpliceError(f"`reg` must be positive for Sinkhorn, got {self.reg}")
        _one_of("residual policy", self.residual, transport.RESIDUAL_POLICIES)
        if self.weighted and self.align == "weights" and self.data is None:
            raise SpliceError(
                f"`residual={self.residual!r}` weighs the maps by the streams' activations: "
                "give `data` (with `align='weights'` only the anchor is run, to measure them)"
            )
        if self.residual == "stream" and self.align != "activations":
            raise SpliceError(
                "`residual='stream'` compares the residual stream's activations: use `align='activations'`"
            )
        _one_of("Q/K policy", self.qk, QK_POLICIES)
        _one_of("head policy", self.heads, HEAD_POLICIES)
        if self.heads == "whole" and self.qk == "joint":
            raise SpliceError(
                "`qk='joint'` maps query and key neurons onto each other, which splits heads: use "
                "`qk='shared'` or `qk='separate'` with `heads='whole'`"
            )
        if self.tokens < 1:
            raise SpliceError(f"tokens must be at least 1, got {self.tokens}")
        if self.needs_inputs and self.data is None:
            raise SpliceError(
                "activation alignment needs `data=MODULE:FUNCTION` returning a batch of inputs, "
                "or use `align='weights'`"
            )
        if self.needs_inputs and self.samples < 1:
            raise SpliceError(f"`samples` must be at least 1, got {self.samples}")

    @classmethod
    def of(cls, options: FusionOptions | None, keywords: Mapping[str, Any]) -> FusionOptions:
        """`options` (or the defaults) with `keywords` put in; an unknown keyword is an error."""
        names = [option.name for option in fields(cls)]
        unknown = sorted(set(keywords) - set(names))
        if unknown:
            raise SpliceError(f"fuse got an unknown option {unknown[0]!r}: the options are {', '.join(names)}")
        if options is None:
            return cls(**keywords)
        return cls(**{**{name: getattr(options, name) for name in names}, **keywords})

    def run_keywords(self) -> dict[str, Any]:
        """The run's fields set here, to be put into the run."""
        return {name: getattr(self, name) for name in RUN_FIELDS if getattr(self, name) is not None}

    @property
    def weighted(self) -> bool:
        """The residual policy weighs maps by the anchor's stream activations."""
        return self.residual in transport.WEIGHTED_POLICIES

    @property
    def needs_inputs(self) -> bool:
        return self.align == "activations" or self.weighted

    def check_models(self, count: int) -> None:
        """What can only be checked once the number of models is known."""
        if count < 2:
            raise SpliceError(f"fusion needs at least two models, got {count}")
        if not 0 <= self.anchor < count:
            raise SpliceError(f"`anchor={self.anchor}` is not a model index: give 0..{count - 1}")
