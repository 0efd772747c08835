"""PortLLM: a patch made on an old base carried onto an evolved base, training-free (Khan et al., ICLR 2025).

For every base tensor the patch changes, the new value is `W' + scale * U`, U the change the patch makes on its
own base: a LoRA product, a dense or sparse delta as stored; for a patch that replaces tensors whole (LayerNorm
patches, PEFT's `modules_to_save`) U = stored - W, which needs the old base's values. The ported patch is a
patch of the same kind, re-fingerprinted against the new base; writing a ported model applies that patch, so
`port --out` and `port --as-patch` then `patch apply` give the same bytes. The drift report is measured in one
streamed pass over the patched tensors before anything is written.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from typing_extensions import Unpack

from splice.adapters.apply import apply_patches
from splice.adapters.compose import patch_steps
from splice.adapters.drift import DriftReport, TensorDrift
from splice.adapters.fingerprint import (
    compare_base,
    context_bytes,
    context_names,
    fingerprint_tensor,
    first_names,
    l2_norm,
    refuse_drift,
    sample_context,
    tensor_sha256,
)
from splice.adapters.kinds import KINDS
from splice.adapters.kinds.spec import MappedTensors
from splice.adapters.meta import BaseFingerprint, PatchKind, PatchMeta, TensorFingerprint
from splice.adapters.patch import Patch
from splice.adapters.sources import PatchSource, load_patch, patch_location
from splice.adapters.steps import Effect, Step
from splice.errors import PatchError
from splice.options import RunKeywords, RunOptions, run_options
from splice.progress import Progress
from splice.tensors.checkpoint import Checkpoint, recorded_location
from splice.tensors.device import resolve_device
from splice.tensors.stream import StreamReport, all_finite, read_ahead
from splice.tensors.writer import ensure_output_free


@dataclass
class Ported:
    """A ported patch (in memory; its unchanged tensors still read from the source) and its drift report."""

    patch: Patch
    drift: DriftReport
    stream: StreamReport | None = None  # when a ported model was written (`out`)
    written: Path | None = None  # when the ported patch was written (`as_patch`)


def port_patch(
    patch: PatchSource,
    to: str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    as_patch: str | os.PathLike | None = None,
    old_base: str | os.PathLike | None = None,
    scale: float = 1.0,
    source: str | None = None,
    run: RunOptions | None = None,
    **run_keywords: Unpack[RunKeywords],
) -> Ported:
    """Port `patch` onto the evolved base `to`: measure the drift, build the ported patch, and write the ported
    model to `out` and/or the ported patch to `as_patch` (each with the report's JSON and PNG inside).
    `old_base`: the base the patch was made on, verified against its fingerprint; it is needed for patches that
    replace tensors whole, and gives the drift report the base's change itself (else only norms are known).
    `source` names the patch in the lineage (default: where it was read from). `run` (or its fields as keywords:
    device, shard_size, force, progress, storage_options, ...) says how the run runs."""
    run = run_options(run, run_keywords, "port_patch")
    check_port_outputs(patch, to, old_base, out, as_patch, run.force)
    ported = prepare_port(patch, to, old_base=old_base, scale=scale, source=source, run=run)
    return write_ported(ported, to, out=out, as_patch=as_patch, run=run)


def patch_label(patch: PatchSource) -> str:
    """How a lineage names a patch: where it was read from, as records keep locations."""
    location = patch_location(patch)
    return recorded_location(location) if location is not None else "a patch in memory"


def check_port_outputs(
    patch: PatchSource,
    to: str | os.PathLike,
    old_base: str | os.PathLike | None,
    out: str | os.PathLike | None,
    as_patch: str | os.PathLike | None,
    force: bool,
    also_protected: Sequence[str | os.PathLike] = (),
) -> None:
    """Before any work: each output is free (or `force`) and is none of the inputs (nor `also_protected`, e.g. the
    registry the patch came from), and they are not the same directory."""
    protected = [p for p in (to, old_base, patch_location(patch), *also_protected) if p is not None]
    for target, name in ((out, "out"), (as_patch, "as_patch")):
        if target is not None:
            ensure_output_free(target, force, protected=protected, what="a base or the patch", parameter_name=name)
    if out is not None and as_patch is not None and Path(out).resolve() == Path(as_patch).resolve():
        raise PatchError("`out` and `as_patch` name the same directory; give each its own")


def prepare_port(
    patch: PatchSource,
    to: str | os.PathLike,
    *,
    old_base: str | os.PathLike | None = None,
    scale: float = 1.0,
    source: str | None = None,
    run: RunOptions | None = None,
) -> Ported:
    """The ported patch and its drift report, nothing written: every refusal (another architecture, a missing
    or reshaped tensor, a wrong old base, a bare mask) happens here."""
    scale = _checked_scale(scale)
    run = run or RunOptions()
    device, progress, storage_options = run.device, run.reporter, run.storage_options
    new = Checkpoint.open(to, storage_options)
    old = Checkpoint.open(old_base, storage_options) if old_base is not None else None
    loaded = load_patch(patch, storage_options, base=new)
    steps = patch_steps(loaded)
    _refuse_unportable(loaded, steps, new, old, str(to))
    if old is not None and loaded.meta.base is not None:
        refuse_drift(
            compare_base(loaded.meta.base.model_copy(update={"tensors": []}), old),
            str(old_base),
            loaded.meta.kind.value,
            None,
        )
    measured = _measure(loaded, steps, new, old, scale, device, progress)
    fingerprint = _new_fingerprint(new, measured, progress)
    label = source or patch_label(patch)
    drift = _report(loaded, measured, label, new, fingerprint.digest, old, scale)
    return Ported(_ported_patch(loaded, measured, drift, fingerprint, scale), drift)


def write_ported(
    ported: Ported,
    to: str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    as_patch: str | os.PathLike | None = None,
    run: RunOptions | None = None,
) -> Ported:
    """Write the new base with the ported patch applied (`out`) and/or the ported patch (`as_patch`), each
    published atomically with the drift report's port_report.json and port_report.png inside. The report is
    drawn first: drawn on a thread beside the stream, it slowed the stream 3x (both want the GIL)."""
    if out is None and as_patch is None:
        return ported
    run = run or RunOptions()
    files = ported.drift.files()
    if out is not None:
        ported.stream = apply_patches([ported.patch], to, out, check_bases=False, extra_files=files, run=run)
    if as_patch is not None:
        ported.written = ported.patch.save(as_patch, force=run.force, extra_files=files)
    return ported


def _checked_scale(scale: float) -> float:
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise PatchError(f"`scale` must be a number, not {scale!r}") from None
    if not math.isfinite(scale) or scale == 0:
        raise PatchError(f"`scale` must be a finite number other than 0, not {scale}")
    return scale


def _refuse_unportable(
    patch: Patch, steps: dict[str, Step], new: Checkpoint, old: Checkpoint | None, where: str
) -> None:
    """Before any tensor is read: the new base has every tensor the patch changes, in its shape; a bare mask
    (which prunes, and holds no change) is not ported; replacements need the old base."""
    kind = patch.meta.kind.value
    pruning = [name for name, step in steps.items() if step.effect is Effect.multiply]
    if pruning:
        raise PatchError(
            f"this {kind} patch only prunes ({first_names(pruning)}): it holds no change to carry over; "
            f"apply it to the new base with `splice patch apply`"
        )
    missing = [name for name in steps if name not in new.tensors]
    if missing and len(missing) == len(steps):
        raise PatchError(
            f"{where} has none of the {len(steps)} tensors the {kind} patch changes "
            f"({first_names(missing)}): a patch is ported only onto an evolved version of its own "
            f"architecture"
        )
    if missing:
        raise PatchError(
            f"{where} lacks {len(missing)} of the tensors the {kind} patch changes "
            f"({first_names(missing)}); port it onto a base that has them"
        )
    reshaped = [
        f"{name} {list(new.tensors[name].shape)} (patch: {list(step.shape)})"
        for name, step in steps.items()
        if tuple(new.tensors[name].shape) != step.shape
    ]
    if reshaped:
        raise PatchError(
            f"{where} reshaped {len(reshaped)} of the tensors the {kind} patch changes: "
            f"{first_names(reshaped, 2)}; a patch cannot be ported across a change of shape"
        )
    replaced = [name for name, step in steps.items() if step.effect is Effect.replace]
    if replaced and old is None:
        what = (
            "is a LayerNorm patch: it stores the values it sets"
            if patch.meta.kind is PatchKind.layernorm
            else f"replaces {len(replaced)} tensors whole ({first_names(replaced, 2)})"
        )
        raise PatchError(
            f"this patch {what}, not a change; give the base it was made on (`old_base=OLD_BASE`) so "
            f"its change can be ported"
        )
    if old is not None:
        unlike = [
            name
            for name, step in steps.items()
            if name not in old.tensors or tuple(old.tensors[name].shape) != step.shape
        ]
        if unlike:
            raise PatchError(
                f"{old.location} (`old_base`) lacks or reshaped {len(unlike)} of the tensors the patch "
                f"changes ({first_names(unlike)}): it is not the base the patch was made on"
            )


@dataclass
class _Measured:
    drifts: list[TensorDrift]
    fingerprints: list  # TensorFingerprint of each patched tensor of the new base
    replaced: dict[str, torch.Tensor]  # new stored values of the tensors the patch replaces whole


def _update(step: Step, old_value: torch.Tensor | None, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The change a step makes on its own base, in fp32."""
    if step.effect is Effect.add:
        return step.compute(torch.zeros(shape, dtype=torch.float32, device=device))
    if old_value is None:  # `_refuse_unportable` refuses this before anything is read
        raise PatchError("a patch that replaces tensors whole is ported only with the base it was made on (`old_base`)")
    return step.compute(old_value.clone()) - old_value


def _measure(
    patch: Patch,
    steps: dict[str, Step],
    new: Checkpoint,
    old: Checkpoint | None,
    scale: float,
    device: str,
    progress: Progress,
) -> _Measured:
    """One streamed pass over the patched tensors: the drift figures, the new base's fingerprint entries, the
    ported values of replaced tensors; the old base's own tensors are checked against the patch's fingerprint.
    Hashing runs on worker threads (sha256 releases the GIL) while the figures are computed."""
    names = list(steps)
    recorded = {t.name: t for t in patch.meta.base.tensors} if patch.meta.base else {}
    reads = [((new, name, None),) + (((old, name, None),) if old is not None else ()) for name in names]
    sizes = [new.tensors[n].nbytes + (old.tensors[n].nbytes if old is not None else 0) for n in names]
    progress.start("measuring the base's drift", len(names), sum(sizes))
    try:
        compute = resolve_device(device)
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="splice-port-hash") as hashing:
            measuring = _DriftPass(patch, new, old, scale, compute, hashing, recorded)
            for position, tensors in read_ahead(reads, depth=2):
                name = names[position]
                _measure_one(measuring, name, steps[name], tensors)
                progress.advance(1, sizes[position])
    finally:
        progress.finish()
    return measuring.result


@dataclass
class _DriftPass:
    """What each patched tensor of the measuring pass is measured against, and what the pass has found."""

    patch: Patch
    new: Checkpoint
    old: Checkpoint | None
    scale: float
    compute: torch.device
    hashing: ThreadPoolExecutor
    recorded: dict[str, TensorFingerprint]  # the patch's fingerprint of its own base, by tensor name
    result: _Measured = field(default_factory=lambda: _Measured([], [], {}))


def _measure_one(measuring: _DriftPass, name: str, step: Step, tensors: list[torch.Tensor]) -> None:
    patch, new, old, scale, compute, hashing, result = (
        measuring.patch,
        measuring.new,
        measuring.old,
        measuring.scale,
        measuring.compute,
        measuring.hashing,
        measuring.result,
    )
    recorded = measuring.recorded.get(name)
    stored_new, stored_old = tensors[0], tensors[1] if old is not None else None
    for base, stored in ((new, stored_new), (old, stored_old)):
        if base is not None and stored is not None and stored.is_floating_point() and not all_finite(stored):
            raise PatchError(
                f"{base.location} holds NaN/Inf in {name}, a tensor the patch changes: the port would "
                f"write them; repair that base (or port onto another) first"
            )
    new_hash = hashing.submit(tensor_sha256, stored_new)
    old_hash = hashing.submit(tensor_sha256, stored_old) if stored_old is not None and recorded else None
    value_new = stored_new.to(device=compute, dtype=torch.float32)
    value_old = None if stored_old is None else stored_old.to(device=compute, dtype=torch.float32)
    update = _update(step, value_old, step.shape, compute)
    if old_hash is not None and old is not None and recorded is not None and old_hash.result() != recorded.sha256:
        raise PatchError(
            f"{old.location} (`old_base`) is not the base this patch was made on: {name} differs; "
            f"give the base it was made on"
        )
    entry = fingerprint_tensor(name, stored_new, new.tensors[name].dtype, sha256=new_hash.result())
    result.fingerprints.append(entry)
    result.drifts.append(_tensor_drift(name, entry, recorded, value_new, value_old, update))
    if step.effect is Effect.replace and value_old is not None:  # (a replacement without the old base: refused)
        result.replaced[name] = _replaced_value(patch, name, value_new, value_old, scale, stored_new.dtype)


def _tensor_drift(
    name: str,
    entry: TensorFingerprint,
    recorded: TensorFingerprint | None,
    new: torch.Tensor,
    old: torch.Tensor | None,
    update: torch.Tensor,
) -> TensorDrift:
    """The figures of one tensor, reduced in fp64 from fp32 tensors. ||W|| comes from the patch's fingerprint
    where the old base's bytes were just checked against it."""
    update_norm = l2_norm(update)
    if old is None:
        if recorded is None:  # nothing says what ||W|| was (a PEFT adapter): unknown, not ||W'||
            return TensorDrift(name, None, entry.norm, update_norm, shape=tuple(new.shape))
        return TensorDrift(
            name,
            recorded.norm,
            entry.norm,
            update_norm,
            changed=entry.sha256 != recorded.sha256,
            shape=tuple(new.shape),
        )
    change = new - old
    change_norm = l2_norm(change)
    return TensorDrift(
        name,
        recorded.norm if recorded is not None else l2_norm(old),
        entry.norm,
        update_norm,
        change_norm,
        _dot(change, update),
        change_norm > 0,
        tuple(new.shape),
    )


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """<a, b>: per row in fp32, the rows summed in fp64 (the cosine of nearly orthogonal changes needs the
    digits; an fp64 copy of both would cost three times as much)."""
    if a.dim() < 2:
        return float(torch.dot(a.reshape(-1).double(), b.reshape(-1).double()))
    rows = a.shape[0]
    return float(torch.linalg.vecdot(a.reshape(rows, -1), b.reshape(rows, -1), dim=-1).double().sum())


def _replaced_value(
    patch: Patch, name: str, new: torch.Tensor, old: torch.Tensor, scale: float, dtype: torch.dtype
) -> torch.Tensor:
    """The value a replaced tensor takes on the new base: W' + scale * (stored - W), exactly the stored value
    where the base did not move and scale is 1 (so porting onto the patch's own base equals applying it)."""
    stored = patch.tensors[name]
    if scale == 1 and torch.equal(new, old):
        return stored
    ported = new + scale * (stored.to(device=new.device, dtype=torch.float32) - old)
    return ported.to(device="cpu", dtype=stored.dtype if stored.dtype.is_floating_point else dtype)


def _report(
    patch: Patch,
    measured: _Measured,
    label: str,
    new: Checkpoint,
    new_digest: str,
    old: Checkpoint | None,
    scale: float,
) -> DriftReport:
    notes = []
    if patch.meta.kind is PatchKind.layernorm:
        notes.append(
            "a LayerNorm patch stores absolute values: it was ported as the change it made on its own "
            "base (patch - old base), added to the new base's values"
        )
    elif measured.replaced:
        notes.append(
            f"{len(measured.replaced)} tensors the patch replaces whole were ported as their change on the old base"
        )
    if patch.meta.base is None and old is None:
        notes.append("the patch records no base (a PEFT adapter): give --from OLD_BASE to measure the drift")
    return DriftReport(
        patch=label,
        kind=patch.meta.kind.value,
        new_base=recorded_location(new.location),
        new_digest=new_digest,
        old_base=recorded_location(old.location) if old is not None else None,
        old_digest=patch.meta.base.digest if patch.meta.base else None,
        scale=scale,
        tensors=measured.drifts,
        notes=notes,
    )


def _ported_patch(
    patch: Patch, measured: _Measured, drift: DriftReport, fingerprint: BaseFingerprint, scale: float
) -> Patch:
    """The same kind of patch for the new base (its `fingerprint`): rescaled by the kind, replaced tensors
    recomputed."""
    if scale != 1:
        tensors, settings = KINDS[patch.meta.kind].rescale(patch, scale)
    else:
        tensors, settings = patch.tensors, dict(patch.meta.settings)
    if measured.replaced:
        tensors = MappedTensors(tensors, patch.shapes, lambda name, _: measured.replaced[name], set(measured.replaced))
    lineage = [
        *patch.meta.lineage,
        f"ported from {drift.patch} (base digest {drift.old_digest or 'not recorded'}) "
        f"onto base digest {fingerprint.digest}" + (f", scale {scale:g}" if scale != 1 else ""),
    ]
    meta = PatchMeta(
        kind=patch.meta.kind,
        targets=patch.meta.targets,
        base=fingerprint,
        lineage=lineage,
        description=patch.meta.description,
        tags=patch.meta.tags,
        settings=settings,
    )
    return Patch(tensors, meta)


def _new_fingerprint(new: Checkpoint, measured: _Measured, progress: Progress) -> BaseFingerprint:
    """The new base's fingerprint: the patched tensors' entries from the measuring pass, the others sampled."""
    others = context_names(new, (entry.name for entry in measured.fingerprints))
    progress.start("fingerprinting the new base", len(others), context_bytes(new, others))
    try:
        return BaseFingerprint.of(measured.fingerprints, sample_context(new, others, progress))
    finally:
        progress.finish()
