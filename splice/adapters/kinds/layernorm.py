"""LayerNorm patches: the tuned model's LayerNorm / RMSNorm weights and biases, replacing the base's, and the
classification head when the fine-tune changed it (LayerNorm tuning trains the head too: PEFT's LN tuning keeps
it in `modules_to_save`).

`PatchMeta.settings` of an extracted LayerNorm patch (each only when not empty):
    head        [tensors] the changed classification head, carried (its values replace the base's)
    included    [tensors] changed tensors `include` named, carried
    left_out    {tensor: why}: changed tensors the patch does not carry; a delta patch carries them
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from splice.adapters.deltas import Extracted, deltas, left_out_warnings
from splice.adapters.kinds.spec import KindSpec, describe_plain, keep_as_is
from splice.adapters.steps import replace_steps
from splice.arch.heads import stored_head
from splice.arch.norms import norm_tensor_names
from splice.errors import PatchError
from splice.progress import Progress
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.device import resolve_device


@dataclass(frozen=True)
class LayerNormOptions:
    """`include`: glob patterns (fnmatch) of further tensors, such as small non-norm ones, that the patch carries
    when the fine-tune changed them. The classification head is carried when it changed, without asking."""

    include: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.include, list | tuple) or not all(isinstance(p, str) and p for p in self.include):
            raise PatchError(f"include takes a list of tensor name patterns, e.g. ['*.pooler.*'], not {self.include!r}")
        object.__setattr__(self, "include", tuple(self.include))


def _named(tuned: Checkpoint, patterns: tuple[str, ...]) -> set[str]:
    """The tensors `patterns` name; a pattern naming none is refused (a typo would silently carry nothing)."""
    named: set[str] = set()
    for pattern in patterns:
        found = fnmatch.filter(tuned.tensors, pattern)
        if not found:
            raise PatchError(
                f"`include` {pattern!r} names no tensor of {tuned.location}; its tensors are named "
                f"like {next(iter(tuned.tensors))}"
            )
        named.update(found)
    return named


def extract_layernorm(
    base: Checkpoint,
    tuned: Checkpoint,
    options: LayerNormOptions | None = None,
    device: str = "auto",
    progress: Progress | None = None,
) -> Extracted:
    """Every norm's tuned values; of the other tensors the fine-tune changed, the classification head's and those
    `options.include` names (tuned values too); the rest listed in `left_out`, and said so."""
    options = options or LayerNormOptions()
    norms = norm_tensor_names(tuned)
    if not norms:
        raise PatchError(f"{tuned.location}: no LayerNorm or RMSNorm modules found; try `kind='delta'`")
    head, named, carried = set(stored_head(tuned)), _named(tuned, options.include), set(norms)
    settings: dict = {"head": [], "included": [], "left_out": {}}
    for name, _ in deltas(base, tuned, resolve_device(device), progress):
        if name in carried:
            continue
        if name in head:
            settings["head"].append(name)
        elif name in named:
            settings["included"].append(name)
        else:
            settings["left_out"][name] = "neither a norm nor the classification head"
    settings["head"].sort()
    settings["included"].sort()
    names = norms + settings["head"] + settings["included"]
    warnings = left_out_warnings(
        settings["left_out"],
        "layernorm patch",
        "being neither norms nor the classification head",
        "name them with --include PATTERN, or carry them with a delta patch",
    )
    return Extracted(
        {name: tuned.read(name) for name in names},
        names,
        sorted({n.rpartition(".")[0] for n in names}),
        {k: v for k, v in settings.items() if v},
        warnings,
    )


SPEC = KindSpec(
    extract=extract_layernorm,
    steps=replace_steps,
    describe=describe_plain,
    rescale=keep_as_is,
    options=LayerNormOptions,
    keywords={"include": "include"},
)
