"""Declarative descriptions of the architectures OT fusion knows, on the tensor names stored on disk.

A description is a little program over *spaces*: named sets of neurons (the residual stream, the query
neurons of one block, the MLP's hidden units, ...). Each node says which stored tensors it owns and how
they sit between spaces; the generic engine (`plan.py`, `align.py`) walks the nodes in order, computes one transport
map per space and carries the maps through the model. Nothing in the engine knows any architecture: a walker
asks each node (`visit`, `defines`, `origin`, ...) instead of switching on its kind.

Node kinds
- `Linear`: a weight `[out, in, *kernel]` (read through its layout: GPT-2's Conv1D stores `[in, out]`, and
  a fused `c_attn` holds Q, K and V as row blocks) with an optional bias. Its input is aligned with the map
  of space `inp` (None: the model input, nothing to align); its output *defines* space `out` by optimal
  transport (None: outputs are fixed, e.g. class logits, and only the input is aligned).
- `Table`: an embedding table `[..., rows, width]` whose width axis lives in `space`. With `source`
  "columns" the table defines that space's map from its columns (the authors' position-embedding map,
  weight-based in both modes); with "activations" the map comes from its module's output in activation
  alignment (token embeddings) and from its columns in weight alignment; with None it is aligned by the
  map `space` already has.
- `Norm`: LayerNorm weight and bias, transported by the map of `space`; the map passes through.
- `Residual`: `out` gets the residual policy applied to the maps of `inputs` (first: the skip stream). The
  activation-weighted policies also need each input stream's values at the add: `taps` names, per input, a
  module whose *input* is that stream (the skip stream of a block: the module that first reads it); None
  takes the activations of the node that defined the space (a Linear's output, an embedding's output, a
  "columns" table's rows).

Space names are local to their section (embeddings, each block, the head) except `stream`, the residual
stream, which flows from the embeddings through every block into the head.
Templates: `{base}` is the backbone prefix (`vit.`, `bert.`, `transformer.` or nothing for a bare
backbone), `{i}` the block index.
"""

from __future__ import annotations

import re
from dataclasses import Field, dataclass, replace
from typing import Any, ClassVar, Literal, TypedDict, TypeVar, overload

STREAM = "stream"

SourceKind = Literal["output", "input", "rows"]
"""Where a space's values are read: a module's output, what enters a module, or an embedding table's rows."""
TableSource = Literal["columns", "activations"]
"""How a `Table` defines its space's map (see the module's docstring)."""


@dataclass(frozen=True)
class Source:
    """Where one space's values can be read: a module's output ("output"), what enters a module ("input"),
    or the rows of an embedding table ("rows"); `part` picks a row block of a fused weight's output."""

    kind: SourceKind
    name: str
    part: tuple[int, int] | None = None


class NodeWalker:
    """Something that walks a description: a node calls the method of its kind (those not overridden do
    nothing), so walkers never switch on node types."""

    def linear(self, step: Step, node: Linear) -> None:
        pass

    def table(self, step: Step, node: Table) -> None:
        pass

    def norm(self, step: Step, node: Norm) -> None:
        pass

    def residual(self, step: Step, node: Residual) -> None:
        pass


_N = TypeVar("_N", bound="_Node")


class _Node:
    """What every node answers; the kinds override what concerns them. Every kind is a frozen dataclass."""

    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]  # every kind is a frozen dataclass (`fill` replaces)
    optional = False
    role: str | None = None  # see Linear
    part: tuple[int, int] | None = None  # see Linear
    taps: tuple[str | None, ...] = ()  # see Residual

    @property
    def tensors(self) -> set[str]:
        """Stored tensors the node may own (a bias is owned when present)."""
        return set()

    @property
    def required(self) -> set[str]:
        """Stored tensors the node cannot do without."""
        return set()

    @property
    def defines(self) -> str | None:
        """The space whose map this node makes (None: it only uses maps)."""
        return None

    @property
    def origin(self) -> Source | None:
        """Where the values of the space this node defines are read (for activations and stream weights)."""
        return None

    @property
    def head_space(self) -> str | None:
        """The space split into attention heads, if the node defines one."""
        return None

    @property
    def adds(self) -> tuple[str, ...]:
        """The spaces a residual add combines (skip stream first); () for every other node."""
        return ()

    def fill(self: _N, **values: object) -> _N:
        """The node with its name templates (`{base}`, `{i}`) filled in."""
        return self


_M = TypeVar("_M", bound="_ModuleTensors")


class _ModuleTensors(_Node):
    """A module's stored tensors: `<module>.weight` and, when stored, `<module>.bias`."""

    module: str

    @property
    def weight(self) -> str:
        return f"{self.module}.weight"

    @property
    def bias(self) -> str:
        return f"{self.module}.bias"

    @property
    def tensors(self) -> set[str]:
        return {self.weight, self.bias}

    @property
    def required(self) -> set[str]:
        return {self.weight}

    def fill(self: _M, **values: object) -> _M:
        return replace(self, module=self.module.format(**values))


@dataclass(frozen=True)
class Linear(_ModuleTensors):
    key: str
    module: str  # on-disk module name; its tensors are module + ".weight" and (optionally) module + ".bias"
    inp: str | None
    out: str | None
    heads: bool = False  # `out` is split into attention heads (for the report's cross-head mass)
    role: str | None = None  # "q", "k" or "v": what the Q/K policy shares and whole-head maps move together
    conv1d: bool = False  # stored as [in, out] (GPT-2 Conv1D)
    part: tuple[int, int] | None = None  # (k, n): the k-th of n equal row blocks of a fused weight
    optional: bool = False

    @property
    def defines(self) -> str | None:
        return self.out

    @property
    def origin(self) -> Source | None:
        return None if self.out is None else Source("output", self.module, self.part)

    @property
    def head_space(self) -> str | None:
        return self.out if self.heads else None

    def visit(self, walker: NodeWalker, step: Step) -> None:
        walker.linear(step, self)


@dataclass(frozen=True)
class Table(_Node):
    key: str
    tensor: str
    space: str
    source: TableSource | None = None  # None: aligned by the existing map of `space`
    optional: bool = False

    @property
    def module(self) -> str:
        return self.tensor.removesuffix(".weight")

    @property
    def tensors(self) -> set[str]:
        return {self.tensor}

    @property
    def required(self) -> set[str]:
        return {self.tensor}

    @property
    def defines(self) -> str | None:
        return None if self.source is None else self.space

    @property
    def origin(self) -> Source | None:
        if self.source is None:
            return None
        return Source("output", self.module) if self.source == "activations" else Source("rows", self.tensor)

    def fill(self, **values: object) -> Table:
        return replace(self, tensor=self.tensor.format(**values))

    def visit(self, walker: NodeWalker, step: Step) -> None:
        walker.table(step, self)


@dataclass(frozen=True)
class Norm(_ModuleTensors):
    key: str
    module: str
    space: str
    optional: bool = False

    def visit(self, walker: NodeWalker, step: Step) -> None:
        walker.norm(step, self)


@dataclass(frozen=True)
class Residual(_Node):
    out: str
    inputs: tuple[str, ...]  # (skip, branch, ...): the policy's skip map is the first
    taps: tuple[str | None, ...] = ()  # per input: module whose input holds that stream (None: its defining node)

    @property
    def key(self) -> str:
        return f"residual:{self.out}"

    @property
    def defines(self) -> str | None:
        return self.out

    @property
    def adds(self) -> tuple[str, ...]:
        return self.inputs

    def fill(self, **values: object) -> Residual:
        if not self.taps:
            return self
        return replace(self, taps=tuple(None if tap is None else tap.format(**values) for tap in self.taps))

    def visit(self, walker: NodeWalker, step: Step) -> None:
        walker.residual(step, self)


Node = Linear | Table | Norm | Residual


@dataclass(frozen=True)
class Architecture:
    name: str
    model_type: str  # config.json's model_type
    classes: dict[str, str]  # transformers class -> the backbone prefix its checkpoints use
    layers_key: str  # config key: number of blocks
    heads_key: str  # config key: number of attention heads
    must_match: tuple[str, ...]  # config keys every fused model must agree on (widths may differ)
    embeddings: tuple[Node, ...]
    block: tuple[Node, ...]
    head: tuple[Node, ...]
    copied: tuple[str, ...] = ()  # regexes (on stored names) of buffers copied from the anchor


@dataclass(frozen=True)
class Step:
    """One node with its templates filled in, in the scope it belongs to."""

    scope: str  # "embeddings", "layer 3", "head"
    node: Node

    @overload
    def space(self, name: str) -> str: ...

    @overload
    def space(self, name: None) -> None: ...

    def space(self, name: str | None) -> str | None:
        """The engine-wide key of a space named in this step."""
        if name is None or name == STREAM:
            return name
        return f"{self.scope}/{name}"

    @property
    def id(self) -> str:
        return f"{self.scope}/{self.node.key}"


class _Layout(TypedDict, total=False):
    """How a Linear's weight is stored (see Linear)."""

    conv1d: bool
    part: tuple[int, int]


def _attention_block(
    layer: str,
    modules: tuple[str, str, str, str],
    layouts: tuple[_Layout, _Layout, _Layout, _Layout] = ({}, {}, {}, {}),
) -> tuple[Node, ...]:
    """Q, K, V from the stream (one map each over all heads' neurons: cross-head alignment), and the output
    projection whose input is aligned with V's map."""
    q, k, v, o = modules
    return (
        Linear("q", layer + q, STREAM, "q", heads=True, role="q", **layouts[0]),
        Linear("k", layer + k, STREAM, "k", heads=True, role="k", **layouts[1]),
        Linear("v", layer + v, STREAM, "v", heads=True, role="v", **layouts[2]),
        Linear("o", layer + o, "v", "o", **layouts[3]),
    )


# ViT (pre-LN). The patch projection is a conv fused as a linear map [d, C*p*p]; the position embedding gets a
# map from its columns; the stream map is the residual policy over both (Imfeld et al., A.3). The CLS token
# is aligned by the stream map it is added into (the authors give it a throwaway map of its own from a single
# row of values, which carries no information).
_VIT_LAYER = "{base}encoder.layer.{i}."
VIT = Architecture(
    name="vit",
    model_type="vit",
    classes={"ViTModel": "", "ViTForImageClassification": "vit."},
    layers_key="num_hidden_layers",
    heads_key="num_attention_heads",
    must_match=(
        "num_hidden_layers",
        "image_size",
        "patch_size",
        "num_channels",
        "hidden_act",
        "qkv_bias",
        "layer_norm_eps",
        "encoder_stride",
    ),
    embeddings=(
        Linear("patch", "{base}embeddings.patch_embeddings.projection", None, "patch"),
        Table("position", "{base}embeddings.position_embeddings", "position", source="columns"),
        Residual(STREAM, ("patch", "position")),
        Table("cls", "{base}embeddings.cls_token", STREAM),
        Table("mask", "{base}embeddings.mask_token", STREAM, optional=True),
    ),
    block=(
        Norm("norm1", _VIT_LAYER + "layernorm_before", STREAM),
        *_attention_block(
            _VIT_LAYER,
            (
                "attention.attention.query",
                "attention.attention.key",
                "attention.attention.value",
                "attention.output.dense",
            ),
        ),
        Residual(STREAM, (STREAM, "o"), taps=(_VIT_LAYER + "layernorm_before", None)),
        Norm("norm2", _VIT_LAYER + "layernorm_after", STREAM),
        Linear("fc1", _VIT_LAYER + "intermediate.dense", STREAM, "mlp"),
        Linear("fc2", _VIT_LAYER + "output.dense", "mlp", "fc2"),
        Residual(STREAM, (STREAM, "fc2"), taps=(_VIT_LAYER + "layernorm_after", None)),
    ),
    head=(
        Norm("norm", "{base}layernorm", STREAM),
        Linear("pooler", "{base}pooler.dense", STREAM, "pooler", optional=True),
        Linear("classifier", "classifier", STREAM, None, optional=True),
    ),
)

# BERT (post-LN): LayerNorms sit after each residual add and after the embedding sum.
_BERT_LAYER = "{base}encoder.layer.{i}."
BERT = Architecture(
    name="bert",
    model_type="bert",
    classes={"BertModel": "", "BertForSequenceClassification": "bert."},
    layers_key="num_hidden_layers",
    heads_key="num_attention_heads",
    must_match=(
        "num_hidden_layers",
        "vocab_size",
        "max_position_embeddings",
        "type_vocab_size",
        "hidden_act",
        "layer_norm_eps",
        "position_embedding_type",
    ),
    embeddings=(
        Table("word", "{base}embeddings.word_embeddings.weight", "word", source="activations"),
        Table("position", "{base}embeddings.position_embeddings.weight", "position", source="columns"),
        Residual(STREAM, ("word", "position")),
        Table("token_type", "{base}embeddings.token_type_embeddings.weight", STREAM, optional=True),
        Norm("norm", "{base}embeddings.LayerNorm", STREAM),
    ),
    block=(
        *_attention_block(
            _BERT_LAYER,
            ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
        ),
        Residual(STREAM, (STREAM, "o"), taps=(_BERT_LAYER + "attention.self.query", None)),
        Norm("norm1", _BERT_LAYER + "attention.output.LayerNorm", STREAM),
        Linear("fc1", _BERT_LAYER + "intermediate.dense", STREAM, "mlp"),
        Linear("fc2", _BERT_LAYER + "output.dense", "mlp", "fc2"),
        Residual(STREAM, (STREAM, "fc2"), taps=(_BERT_LAYER + "intermediate.dense", None)),
        Norm("norm2", _BERT_LAYER + "output.LayerNorm", STREAM),
    ),
    head=(
        Linear("pooler", "{base}pooler.dense", STREAM, "pooler", optional=True),
        Linear("classifier", "classifier", "pooler", None, optional=True),
    ),
    copied=(r"(.*\.)?embeddings\.position_ids",),
)

# GPT-2 (pre-LN). Conv1D weights are stored [in, out]; c_attn holds Q, K and V as three row blocks of the
# [3d, d] matrix (columns of the stored [d, 3d]). The LM head is tied to wte unless stored.
_GPT2_LAYER = "{base}h.{i}."
_CONV: _Layout = {"conv1d": True}
GPT2 = Architecture(
    name="gpt2",
    model_type="gpt2",
    classes={"GPT2Model": "", "GPT2LMHeadModel": "transformer."},
    layers_key="n_layer",
    heads_key="n_head",
    must_match=(
        "n_layer",
        "vocab_size",
        "n_positions",
        "activation_function",
        "layer_norm_epsilon",
        "scale_attn_weights",
        "scale_attn_by_inverse_layer_idx",
        "reorder_and_upcast_attn",
    ),
    embeddings=(
        Table("wte", "{base}wte.weight", "token", source="activations"),
        Table("wpe", "{base}wpe.weight", "position", source="columns"),
        Residual(STREAM, ("token", "position")),
    ),
    block=(
        Norm("norm1", _GPT2_LAYER + "ln_1", STREAM),
        *_attention_block(
            _GPT2_LAYER,
            ("attn.c_attn", "attn.c_attn", "attn.c_attn", "attn.c_proj"),
            ({**_CONV, "part": (0, 3)}, {**_CONV, "part": (1, 3)}, {**_CONV, "part": (2, 3)}, _CONV),
        ),
        Residual(STREAM, (STREAM, "o"), taps=(_GPT2_LAYER + "ln_1", None)),
        Norm("norm2", _GPT2_LAYER + "ln_2", STREAM),
        Linear("fc1", _GPT2_LAYER + "mlp.c_fc", STREAM, "mlp", **_CONV),
        Linear("fc2", _GPT2_LAYER + "mlp.c_proj", "mlp", "fc2", **_CONV),
        Residual(STREAM, (STREAM, "fc2"), taps=(_GPT2_LAYER + "ln_2", None)),
    ),
    head=(
        Norm("norm", "{base}ln_f", STREAM),
        Linear("lm_head", "lm_head", STREAM, None, optional=True),
    ),
    copied=(r"(.*\.)?h\.\d+\.attn\.(bias|masked_bias)",),
)

ARCHITECTURES: dict[str, Architecture] = {arch.model_type: arch for arch in (VIT, BERT, GPT2)}


def supported() -> str:
    return ", ".join(cls for arch in ARCHITECTURES.values() for cls in arch.classes)


def steps(arch: Architecture, base: str, layers: int, present: set[str]) -> list[Step]:
    """The description unrolled for one model: templates filled, optional nodes whose tensors are absent
    dropped (a missing required tensor is the caller's error to report)."""
    out: list[Step] = []
    sections: list[tuple[str, tuple[Node, ...], int | None]] = [("embeddings", arch.embeddings, None)]
    sections += [(f"layer {i}", arch.block, i) for i in range(layers)]
    sections.append(("head", arch.head, None))
    for scope, nodes, index in sections:
        for node in nodes:
            filled = node.fill(base=base, i=index)
            if filled.optional and not (filled.tensors & present):
                continue
            out.append(Step(scope, filled))
    return out


def is_copied(arch: Architecture, name: str) -> bool:
    return any(re.fullmatch(pattern, name) for pattern in arch.copied)
