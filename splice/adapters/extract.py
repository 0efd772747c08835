"""Extract a patch from a base model and its fine-tune, reading both tensor by tensor."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

from splice.adapters.fingerprint import fingerprint_base
from splice.adapters.kinds import KINDS, parse_kind
from splice.adapters.meta import PatchKind, PatchMeta
from splice.adapters.patch import Patch
from splice.errors import PatchError
from splice.options import RunOptions, run_options, split_run_keywords
from splice.tensors.checkpoint import Checkpoint, recorded_location
from splice.tensors.stream import check_same_tensors
from splice.tensors.writer import ensure_output_free


def _keyword_owners() -> dict[str, tuple[PatchKind, str, Any]]:
    """Every kind's loose keyword -> (its kind, the options field it fills, that field's default)."""
    owners = {}
    for kind, spec in KINDS.items():
        defaults = {f.name: f.default for f in fields(spec.options)} if spec.options else {}
        owners.update({keyword: (kind, name, defaults[name]) for keyword, name in spec.keywords.items()})
    return owners


def kind_options(kind: PatchKind, options: Any = None, keywords: dict[str, Any] | None = None) -> Any:
    """The kind's options object: `options` as given, or built (and checked) from loose keywords. A keyword
    another kind takes, set to anything but its default, is refused: it would have no effect."""
    spec, owners, given = KINDS[kind], _keyword_owners(), {}
    for keyword, value in (keywords or {}).items():
        if keyword not in owners:
            raise PatchError(f"extract_patch has no option {keyword!r}; the options are {', '.join(owners)}")
        owner, name, default = owners[keyword]
        if value == default:
            continue
        if owner is not kind:
            raise PatchError(
                f"{keyword} is an option of {owner.value} patches, not of a {kind.value} patch; leave it out"
            )
        given[name] = value
    if options is None:
        return spec.options(**given) if spec.options else None
    if spec.options is None or not isinstance(options, spec.options):
        wanted = spec.options.__name__ if spec.options else "no options"
        raise PatchError(f"a {kind.value} patch takes {wanted}, not {type(options).__name__}")
    if given:
        raise PatchError(f"give the {kind.value} options as {type(options).__name__} or as keywords, not both")
    return options


@dataclass(frozen=True)
class Extraction:
    patch: Patch
    warnings: list[str]  # what a user should know the patch leaves out (changed tensors a LoRA cannot carry)


def extraction(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    kind: PatchKind | str,
    storage_options: dict | None = None,
    description: str = "",
    *,
    options: Any = None,
    run: RunOptions | None = None,
    **keywords: Any,
) -> Extraction:
    """`extract_patch`, with the warnings about what the patch leaves out."""
    kind = parse_kind(kind)
    given, keywords = split_run_keywords(keywords)
    if storage_options is not None:
        given["storage_options"] = storage_options
    run = run_options(run, given, "extract_patch")
    chosen = kind_options(kind, options, keywords)
    base_ckpt = Checkpoint.open(base, run.storage_options)
    tuned_ckpt = Checkpoint.open(tuned, run.storage_options)
    check_same_tensors([base_ckpt, tuned_ckpt])
    found = KINDS[kind].extract(base_ckpt, tuned_ckpt, chosen, run.device, run.progress)
    meta = PatchMeta(
        kind=kind,
        targets=found.targets,
        base=fingerprint_base(base_ckpt, found.touched, run.progress),
        lineage=[recorded_location(base), recorded_location(tuned)],
        description=description,
        settings=found.settings,
    )
    return Extraction(Patch(found.tensors, meta), found.warnings)


def extract_patch(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    kind: PatchKind | str,
    storage_options: dict | None = None,
    description: str = "",
    **arguments: Any,
) -> Patch:
    """layernorm: the tuned model's LayerNorm/RMSNorm weights and biases (absolute values, replacing the
    base's), with the classification head when it changed and the changed tensors matching `include` (glob
    patterns); what else changed is named in the warnings; delta: tuned - base for every float tensor that
    changed; lora (`options=LoraOptions(...)`): a truncated SVD of each changed matrix's delta (`rank`, or the
    smallest rank keeping `energy` of it); mask (`options=MaskOptions(...)`): the top `density` share of |delta|
    per tensor or over the whole model (`mask_scope`), with the selected values unless `mask_values` is False.
    The options may also come as those keywords. `run` (a `splice.RunOptions`, or its fields as keywords: `device`,
    `progress`, ...) says how the run runs."""
    return extraction(base, tuned, kind, storage_options, description, **arguments).patch


def extract_patch_to(
    out: str | os.PathLike,
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    kind: PatchKind | str,
    *,
    run: RunOptions | None = None,
    **arguments: Any,
) -> Extraction:
    """`extraction(base, tuned, kind, **arguments)` saved as a patch directory at `out`, which is refused
    (unless the run's `force`) before anything is read."""
    given, arguments = split_run_keywords(arguments)
    run = run_options(run, given, "extract_patch_to")
    ensure_output_free(out, run.force, protected=[base, tuned])
    extracted = extraction(base, tuned, kind, run=run, **arguments)
    extracted.patch.save(out, force=run.force)
    return extracted
