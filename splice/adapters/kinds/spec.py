"""What a patch kind gives the rest of splice: its options, its extractor, its steps, its description."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from splice.adapters.deltas import Extracted
from splice.adapters.steps import PatchContents, Step
from splice.progress import Progress
from splice.tensors.checkpoint import Checkpoint

Extractor = Callable[[Checkpoint, Checkpoint, Any, str, Progress | None], Extracted]
"""(base, tuned, the kind's options or None, device ("auto", "cpu", "cuda"), progress) -> what the patch holds."""


@dataclass(frozen=True)
class KindSpec:
    extract: Extractor
    steps: Callable[[PatchContents], dict[str, Step]]  # base tensor name -> the step the patch applies to it
    describe: Callable[[dict[str, Any]], str]  # the kind's settings in one readable line
    options: type | None = None  # the kind's options (a dataclass), None when it takes none
    # extract_patch's loose keywords that fill the options: keyword -> options field
    keywords: Mapping[str, str] = field(default_factory=dict)


def describe_plain(settings: dict[str, Any]) -> str:
    """Settings as `key=value`, tables summarised by their size; "none" when there are none."""
    return ", ".join(f"{key}={value}" if not isinstance(value, dict | list) else f"{key}: {len(value)} entries"
                     for key, value in settings.items()) or "none"
