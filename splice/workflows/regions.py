"""The regions a Localize-and-Stitch recipe's models give (`merge_method: localize_stitch`): each model's `mask:`, a
mask patch (a directory or URL, or a registry ref) checked against the recipe's base as deploy checks a patch, its
mask bits read into memory packed, its values (a sparse delta's) left where they are stored for the stream to read;
or a region learned here from the model's `data:` (`splice.localize`, with the method's parameters)."""

from __future__ import annotations

from typing import Any

from splice.adapters.fingerprint import compare_base, refuse_drift
from splice.adapters.kinds.mask import MASK_SUFFIX, VALUES_SUFFIX, covered_shapes
from splice.adapters.meta import PatchKind
from splice.errors import PatchError, RecipeError
from splice.merge.localize_stitch import METHOD, TaskRegion
from splice.merge.recipe import InputModel
from splice.options import RunOptions
from splice.tensors.checkpoint import Checkpoint
from splice.workflows.localize import localize
from splice.workflows.stats import stored_patch

EXTRACT = "extract one with `splice patch extract --base BASE --tuned MODEL --kind mask --mask-scope model --density D`"


def open_region(
    entry: InputModel, base: Checkpoint, tuned: Checkpoint, learning: dict[str, Any], run: RunOptions
) -> TaskRegion:
    """The region of one localize_stitch model (`entry`, stored at `tuned`): its `mask:`, refused unless it is a mask
    patch made on `base` (by its base fingerprint), or the region learned from its `data:` with the `learning`
    parameters (density, steps, lr, l1, candidates, head)."""
    if entry.data is not None:
        return _learned_region(entry.data, base, tuned, learning, run)
    if entry.mask is None:  # the recipe's checks say so first
        raise RecipeError(f"{METHOD}: model {entry.model} gives no mask:")
    patch, stored, label = stored_patch(entry.mask, run.storage_options)
    if patch.meta.kind is not PatchKind.mask:
        raise PatchError(f"mask: {label} is a {patch.meta.kind.value} patch, not a mask patch; {EXTRACT}")
    if patch.meta.base is None:
        raise PatchError(f"mask: {label} has no record of the base it was made on; {EXTRACT}")
    try:
        refuse_drift(compare_base(patch.meta.base, base), base.location, "mask", None)
        shapes = covered_shapes(patch)
    except PatchError as exc:
        raise PatchError(f"mask: {label}: {exc}") from None
    return TaskRegion(
        label,
        {name: stored.read(name + MASK_SUFFIX) for name in shapes},
        shapes,
        {name: (stored, name + VALUES_SUFFIX) for name in shapes if name + VALUES_SUFFIX in stored.tensors},
        _carried(patch.meta.settings),
    )


def _carried(settings: dict[str, Any]) -> frozenset[str]:
    """The tensors a localized mask patch carries whole (its head), by its settings; none for other mask patches."""
    localized = settings.get("localized")
    carried = localized.get("carried") if isinstance(localized, dict) else None
    return frozenset(name for name in carried if isinstance(name, str)) if isinstance(carried, list) else frozenset()


def _learned_region(
    data: str, base: Checkpoint, tuned: Checkpoint, learning: dict[str, Any], run: RunOptions
) -> TaskRegion:
    """The region `splice.localize` learns for `tuned` on `data`, held in memory (bits packed, no values to check:
    they are the model's change by construction)."""
    given = {name: value for name, value in learning.items() if value is not None}  # the others: localize's defaults
    found = localize(base, tuned, data, **given, run=run)
    shapes = found.patch.meta.settings["shapes"]
    return TaskRegion(
        f"the region learned on {data}",
        {name: found.patch.tensors[name + MASK_SUFFIX] for name in shapes},
        {name: tuple(shape) for name, shape in shapes.items()},
        carried=frozenset(found.carried),
    )
