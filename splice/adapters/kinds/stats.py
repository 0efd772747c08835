"""Statistics artifacts: a model's Gram matrices or Fisher diagonals on the user's data, stored and versioned like a
patch (fingerprinted against the model they were collected on) so merges can refuse another model's. They change no
model: applying, porting or extracting one is refused."""

from __future__ import annotations

from typing import Any, NoReturn

from splice.adapters.kinds.spec import KindSpec
from splice.errors import PatchError

COLLECT = "collect them with `splice stats collect MODEL --data MODULE:FUNCTION --kind gram|fisher`"


def not_a_change(*_: Any) -> NoReturn:
    raise PatchError(
        "a stats artifact holds a model's statistics on data, not a change to the model: name it as a model's "
        "`stats:` in a regmean or fisher merge recipe; it cannot be applied, ported or merged as a patch"
    )


def _collected_not_extracted(*_: Any) -> NoReturn:
    raise PatchError(f"statistics are not extracted from two models: {COLLECT}")


def data_tokens(settings: dict[str, Any]) -> int:
    """How many tokens of the data the Gram matrices were collected over: the most any layer saw (every layer of the
    blocks sees each real token; a pooler or a head may see one per sample). Not their sum over the layers."""
    return max(settings.get("tokens", {}).values(), default=0)


def describe_stats(settings: dict[str, Any]) -> str:
    statistic = settings.get("statistic", "?")
    parts = [f"{statistic} over {settings.get('samples', '?')} samples"]
    if statistic == "gram":
        parts.append(f"{data_tokens(settings)} tokens")
        if settings.get("shared"):
            parts.append(f"{len(settings['shared'])} layers sharing another's inputs")
    elif settings.get("labels"):
        parts.append(f"labels: {settings['labels']}")
    if settings.get("data"):
        parts.append(f"data: {settings['data']}")
    return ", ".join(parts)


SPEC = KindSpec(extract=_collected_not_extracted, steps=not_a_change, describe=describe_stats, rescale=not_a_change)
