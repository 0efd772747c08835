"""The patch kinds, one module each; this table is the only place that says which module a kind is.
Adding a kind: a module giving its `SPEC`, a `PatchKind` member, and a row here."""

from __future__ import annotations

from splice.adapters.kinds import delta, layernorm, lora, mask, stats
from splice.adapters.kinds.spec import KindSpec
from splice.adapters.meta import PatchKind
from splice.errors import PatchError

KINDS: dict[PatchKind, KindSpec] = {
    PatchKind.layernorm: layernorm.SPEC,
    PatchKind.lora: lora.SPEC,
    PatchKind.mask: mask.SPEC,
    PatchKind.delta: delta.SPEC,
    PatchKind.stats: stats.SPEC,
}


def parse_kind(kind: PatchKind | str) -> PatchKind:
    """A kind given by name, or a one-line error listing the kinds."""
    try:
        return PatchKind(kind)
    except ValueError:
        raise PatchError(f"unknown patch kind {kind!r}; use one of {', '.join(k.value for k in PatchKind)}") from None
