"""PortLLM: a patch made on an old base carried onto an evolved base, training-free (Khan et al., ICLR 2025).

For every base tensor the patch changes, the new value is `W' + scale * U`, U the change the patch makes on its
own base: a LoRA product, a dense or sparse delta as stored; for a patch that replaces tensors whole (LayerNorm
patches, PEFT's `modules_to_save`) U = stored - W, which needs the old base's values. The ported patch is a
patch of the same kind, re-fingerprinted against the new base; writing a ported model applies that patch, so
`port --out` and `port --as-patch` then `patch apply` give the same bytes.

`port_patch` reads each base once: with `out`, the drift report is measured while the ported model streams into its
staged output (the old base's tensors read beside the new base's), and the report's files join that output before it
is published, so a refusal found on the way (a wrong old base, NaN/Inf in a base) publishes nothing. The report's PNG
is drawn by a child process that imports matplotlib while the model streams (`splice.plots.FigureProcess`).
`prepare_port` is the measuring pass alone (nothing written), for callers that write elsewhere (deploy, sweeps).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from typing_extensions import Unpack

from splice.adapters.apply import apply_patches
from splice.adapters.compose import base_steps, patch_steps, patched_value
from splice.adapters.drift import DriftReport, TensorDrift
from splice.adapters.fingerprint import (
    compare_base,
    context_bytes,
    context_names,
    fingerprint_tensor,
    first_names,
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
from splice.plots import FigureProcess
from splice.progress import Progress
from splice.tensors.checkpoint import Checkpoint, recorded_location
from splice.tensors.device import compute_dtype_for, resolve_device
from splice.tensors.stream import (
    COMPUTE_SLICE,
    Kernel,
    OutputExtras,
    Precision,
    StreamItem,
    StreamReport,
    all_finite,
    read_ahead,
    run_stream,
)
from splice.tensors.writer import OutputTensor, ensure_output_free


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
    return run_port(patch, to, out=out, as_patch=as_patch, old_base=old_base, scale=scale, source=source, run=run)


def run_port(
    patch: PatchSource,
    to: str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    as_patch: str | os.PathLike | None = None,
    old_base: str | os.PathLike | None = None,
    scale: float = 1.0,
    source: str | None = None,
    run: RunOptions | None = None,
    draw_report: bool = False,
    vet: Callable[[Ported], Ported] | None = None,
) -> Ported:
    """`port_patch` once its outputs are checked: each base read once. With `out`, the drift is measured while the
    ported model streams into its staged output, and `vet` (e.g. scoring the ported patch: it may refuse) and the
    report's files come before it is published; then the ported patch goes to `as_patch`. Without `out`, one
    measuring pass, `vet`, then `as_patch`. The report's files are drawn (its PNG by a child process started now)
    when an output takes them or `draw_report` says a caller will save them."""
    run = run or RunOptions()
    inputs = _opened(patch, to, old_base, scale, source, run.storage_options)
    drawn = out is not None or as_patch is not None or draw_report
    with FigureProcess(preload=[DriftReport.__module__]) if drawn else nullcontext() as figures:
        context = _context(inputs.new, inputs.steps, run.reporter)
        if out is not None:
            ported = _port_streaming(inputs, context, out, run, figures, vet)
        else:
            ported = _ported(inputs, _measure(inputs, run.device, run.reporter), context)
            ported = vet(ported) if vet is not None else ported
            if drawn:
                ported.drift.files(figures)
    if as_patch is not None:
        ported.written = ported.patch.save(as_patch, force=run.force, extra_files=ported.drift.files())
    return ported


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
    run = run or RunOptions()
    inputs = _opened(patch, to, old_base, scale, source, run.storage_options)
    context = _context(inputs.new, inputs.steps, run.reporter)
    return _ported(inputs, _measure(inputs, run.device, run.reporter), context)


@dataclass(frozen=True)
class _PortInputs:
    """A port's inputs, opened, with every refusal made that needs no tensor's values."""

    patch: Patch  # as loaded
    steps: dict[str, Step]  # base tensor name -> what the patch does to it, in the patch's order
    new: Checkpoint
    old: Checkpoint | None
    scale: float
    label: str  # how the lineage and the report name the patch


def _opened(
    patch: PatchSource,
    to: str | os.PathLike,
    old_base: str | os.PathLike | None,
    scale: float,
    source: str | None,
    storage_options: dict | None,
) -> _PortInputs:
    scale = _checked_scale(scale)
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
    return _PortInputs(loaded, steps, new, old, scale, source or patch_label(patch))


_AS_STORED = Precision(exact=False)  # the port's kernel hashes the stored bytes, then converts as the stream would


def _port_streaming(
    inputs: _PortInputs,
    context: dict[str, str],
    out: str | os.PathLike,
    run: RunOptions,
    figures: FigureProcess | None,
    vet: Callable[[Ported], Ported] | None,
) -> Ported:
    """The ported model written to `out` in one pass: each patched tensor of the new base (with the old base's
    beside it) is measured, then patched exactly as `apply_patches` of the ported patch patches it; the other
    tensors are copied as stored. Once every tensor is written into the staged output, the report's files join it
    and it is published."""
    new, old, steps = inputs.new, inputs.old, inputs.steps
    files: dict[str, bytes] = {}
    finished: list[Ported] = []
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="splice-port-hash") as hashing:
        measuring = _DriftPass(inputs, None, hashing)
        replaced = {name for name, step in steps.items() if step.effect is Effect.replace}
        provisional = _ported_contents(inputs.patch, measuring.result.replaced, replaced, inputs.scale)
        plan = base_steps([Patch(provisional.tensors, provisional.meta)], new)

        # The stream runs this kernel on one thread, a tensor at a time (it is neither elementwise nor prepared):
        # `measuring` keeps its figures and reused memory from call to call.
        def ported_value(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
            value = _measure_one(measuring, name, tensors)  # first: the step may patch its value in place
            working = compute_dtype_for(tensors[0].dtype)  # fp32, as `apply_patches` patches it (fp64 stays fp64)
            return patched_value(value if value.dtype == working else tensors[0].to(dtype=working), plan[name])

        def before_publishing() -> None:
            ported = _ported(inputs, measuring.result.in_order(list(steps)), context)
            ported = vet(ported) if vet is not None else ported
            files.update(ported.drift.files(figures))
            finished.append(ported)

        items = [
            StreamItem(
                OutputTensor(name, info.dtype, info.shape),
                ((new, name), (old, name)) if old is not None and name in steps else ((new, name),),
            )
            for name, info in new.tensors.items()
        ]
        untouched = frozenset(name for name in new.tensors if name not in steps)
        stream = run_stream(
            items,
            Kernel(ported_value, passes_through=untouched, precision=_AS_STORED),
            out,
            side_files_from=new,
            run=run,
            extras=OutputExtras(files=files),
            description="porting",
            then=before_publishing,
        )
    [ported] = finished
    ported.stream = stream
    return ported


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
    fingerprints: list[TensorFingerprint]  # of each patched tensor of the new base
    replaced: dict[str, torch.Tensor]  # new stored values of the tensors the patch replaces whole

    def in_order(self, names: Sequence[str]) -> _Measured:
        """The figures in the order of `names` (a stream measures them in the base's storage order)."""
        position = {name: index for index, name in enumerate(names)}
        return _Measured(
            sorted(self.drifts, key=lambda drift: position[drift.name]),
            sorted(self.fingerprints, key=lambda entry: position[entry.name]),
            self.replaced,
        )


def _update(
    step: Step,
    old_value: torch.Tensor | None,
    shape: tuple[int, ...],
    device: torch.device,
    zeros: Callable[[tuple[int, ...], torch.device], torch.Tensor],
) -> torch.Tensor:
    """The change a step makes on its own base, in fp32 (an added change on `zeros(shape, device)`: fp32 zeros)."""
    if step.effect is Effect.add:
        return step.compute(zeros(shape, device))
    if old_value is None:  # `_refuse_unportable` refuses this before anything is read
        raise PatchError("a patch that replaces tensors whole is ported only with the base it was made on (`old_base`)")
    return step.compute(old_value.clone()) - old_value


def _measure(inputs: _PortInputs, device: str, progress: Progress) -> _Measured:
    """One streamed pass over the patched tensors, nothing written: the drift figures, the new base's fingerprint
    entries, the ported values of replaced tensors (what `_port_streaming` measures while it writes)."""
    new, old, names = inputs.new, inputs.old, list(inputs.steps)
    reads = [((new, name, None),) + (((old, name, None),) if old is not None else ()) for name in names]
    sizes = [new.tensors[n].nbytes + (old.tensors[n].nbytes if old is not None else 0) for n in names]
    progress.start("measuring the base's drift", len(names), sum(sizes))
    try:
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="splice-port-hash") as hashing:
            measuring = _DriftPass(inputs, resolve_device(device), hashing)
            for position, tensors in read_ahead(reads, depth=2):
                _measure_one(measuring, names[position], tensors)
                progress.advance(1, sizes[position])
    finally:
        progress.finish()
    return measuring.result


@dataclass
class _DriftPass:
    """What each patched tensor is measured against, and what has been found so far."""

    inputs: _PortInputs
    compute: torch.device | None  # None: where the tensors arrive (a stream has put them on its device already)
    hashing: ThreadPoolExecutor  # sha256 releases the GIL: hashes run on its threads while the figures are computed
    result: _Measured = field(default_factory=lambda: _Measured([], [], {}))
    recorded: dict[str, TensorFingerprint] = field(init=False)  # the patch's fingerprint of its own base, by name

    # fp32 memory reused from tensor to tensor ("new", "old": converted values, "update": U), grown to the largest: a
    # fresh tensor of more than 32 MB is a fresh mapping, whose page faults cost as much as converting into it
    scratch: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        base = self.inputs.patch.meta.base
        self.recorded = {t.name: t for t in base.tensors} if base else {}

    def _reused(self, use: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        size = math.prod(shape)
        memory = self.scratch.get(use)
        if memory is None or memory.numel() < size or memory.device != device:
            memory = self.scratch[use] = torch.empty(size, dtype=torch.float32, device=device)
        return memory[:size].view(shape)

    def zeros(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """fp32 zeros of `shape` (valid until the next call)."""
        return self._reused("update", shape, device).zero_()

    def fp32(self, use: str, stored: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`stored`'s values in fp32 on `device`: the tensor itself where it is fp32 there, else converted into reused
        memory (valid until the next call for the same `use`)."""
        if stored.dtype == torch.float32 and stored.device == device:
            return stored
        return self._reused(use, tuple(stored.shape), device).copy_(stored)


def _measure_one(measuring: _DriftPass, name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Measure one patched tensor: `tensors` are the new base's stored tensor and, with `old_base`, the old base's;
    both are left as they are. Their hashes run on the worker threads while the figures are computed here (the
    norms too: an fp64-accumulated norm on a worker thread grew peak RSS by ~40%); the old base's bytes are checked
    against the patch's fingerprint. Returns the new base's values in fp32 (the stored tensor itself if it is fp32,
    else memory the next call reuses), which the caller may then patch in place."""
    inputs, compute, hashing, result = measuring.inputs, measuring.compute, measuring.hashing, measuring.result
    new, old, step = inputs.new, inputs.old, inputs.steps[name]
    recorded = measuring.recorded.get(name)
    stored_new, stored_old = tensors[0], tensors[1] if old is not None else None
    # (on a GPU the stream hands them over on the device: copied back here, on this thread's stream, to be hashed)
    new_hash = hashing.submit(tensor_sha256, stored_new.to("cpu"))
    old_hash = hashing.submit(tensor_sha256, stored_old.to("cpu")) if stored_old is not None and recorded else None
    device = compute or stored_new.device
    value_new = measuring.fp32("new", stored_new, device)
    value_old = None if stored_old is None else measuring.fp32("old", stored_old, device)
    for base, value in ((new, value_new), (old, value_old)):  # fp32 holds NaN/Inf where the stored dtype did
        if base is not None and value is not None and not all_finite(value):  # (fp32 sums: ~17x bf16's)
            raise PatchError(
                f"{base.location} holds NaN/Inf in {name}, a tensor the patch changes: the port would "
                f"write them; repair that base (or port onto another) first"
            )
    sums = _drift_sums(step, value_new, value_old, recorded is None, measuring.zeros)
    if old_hash is not None and old is not None and recorded is not None and old_hash.result() != recorded.sha256:
        raise PatchError(
            f"{old.location} (`old_base`) is not the base this patch was made on: {name} differs; "
            f"give the base it was made on"
        )
    entry = fingerprint_tensor(name, stored_new, new.tensors[name].dtype, new_hash.result(), sums.new_norm)
    result.fingerprints.append(entry)
    result.drifts.append(_tensor_drift(name, entry, recorded, sums))
    if step.effect is Effect.replace and value_old is not None:  # (a replacement without the old base: refused)
        result.replaced[name] = _replaced_value(
            inputs.patch, name, value_new, value_old, inputs.scale, stored_new.dtype
        )
    return value_new


@dataclass(frozen=True)
class _DriftSums:
    """One patched tensor's figures: U the patch's update on its own base, W and W' the old and new base's values."""

    new_norm: float  # ||W'||
    update_norm: float  # ||U||
    change_norm: float | None = None  # ||W' - W|| (None: the old base was not read)
    dot: float | None = None  # <W' - W, U>
    old_norm: float | None = None  # ||W||, where asked (no record of it)
    shape: tuple[int, ...] = ()


def _drift_sums(
    step: Step,
    new: torch.Tensor,
    old: torch.Tensor | None,
    want_old_norm: bool,
    zeros: Callable[[tuple[int, ...], torch.device], torch.Tensor],
) -> _DriftSums:
    """||W'||, ||U||, and with the old base ||W' - W||, <W' - W, U> (and ||W|| where `want_old_norm`): U formed whole
    in fp32 as the step computes it (from `zeros(shape, device)`), W' - W a block of rows at a time in fp32, every
    sum accumulated in fp64 over blocks that stay in the CPU's cache (an fp64-accumulated norm of the whole tensor,
    `l2_norm`, costs ~10x as much, an fp64 copy twice its memory). `new`, `old`: fp32 values, left as they are."""
    update = _update(step, old, step.shape, new.device, zeros)
    squares = {"new": 0.0, "update": 0.0, "change": 0.0, "dot": 0.0, "old": 0.0}
    for rows in _row_blocks(new):
        latest = _rows(new, rows).reshape(-1).double()
        part = _rows(update, rows).reshape(-1).double()
        squares["new"] += float(torch.dot(latest, latest))
        squares["update"] += float(torch.dot(part, part))
        if old is not None:
            old_rows = _rows(old, rows)
            change = (_rows(new, rows) - old_rows).reshape(-1).double()
            squares["change"] += float(torch.dot(change, change))
            squares["dot"] += float(torch.dot(change, part))
            if want_old_norm:
                former = old_rows.reshape(-1).double()
                squares["old"] += float(torch.dot(former, former))
    root = {key: math.sqrt(value) for key, value in squares.items() if key != "dot"}
    if old is None:
        return _DriftSums(root["new"], root["update"], shape=tuple(new.shape))
    return _DriftSums(
        root["new"],
        root["update"],
        root["change"],
        squares["dot"],
        root["old"] if want_old_norm else None,
        tuple(new.shape),
    )


def _row_blocks(value: torch.Tensor) -> list[tuple[int, int] | None]:
    """Blocks of about COMPUTE_SLICE elements along dim 0 (one block, None, for a scalar)."""
    if value.dim() == 0 or value.shape[0] == 0:
        return [None]
    size = max(1, COMPUTE_SLICE // max(1, value[0].numel()))
    return [(start, min(start + size, value.shape[0])) for start in range(0, value.shape[0], size)]


def _rows(value: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
    return value if rows is None else value[rows[0] : rows[1]]


def _tensor_drift(
    name: str, entry: TensorFingerprint, recorded: TensorFingerprint | None, sums: _DriftSums
) -> TensorDrift:
    """The figures of one tensor. ||W|| comes from the patch's fingerprint where the old base's bytes were just
    checked against it."""
    if sums.change_norm is None:
        if recorded is None:  # nothing says what ||W|| was (a PEFT adapter): unknown, not ||W'||
            return TensorDrift(name, None, entry.norm, sums.update_norm, shape=sums.shape)
        return TensorDrift(
            name,
            recorded.norm,
            entry.norm,
            sums.update_norm,
            changed=entry.sha256 != recorded.sha256,
            shape=sums.shape,
        )
    return TensorDrift(
        name,
        recorded.norm if recorded is not None else sums.old_norm,
        entry.norm,
        sums.update_norm,
        sums.change_norm,
        sums.dot,
        sums.change_norm > 0,
        sums.shape,
    )


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


@dataclass(frozen=True)
class _PortedContents:
    """The ported patch's tensors (rescaled by the kind, replaced ones looked up when read) under the patch's
    manifest with the rescaled settings: what its steps read, before the new base's fingerprint is known."""

    tensors: Mapping[str, torch.Tensor]
    meta: PatchMeta


def _ported_contents(
    patch: Patch, replaced: Mapping[str, torch.Tensor], names: set[str], scale: float
) -> _PortedContents:
    """`replaced`: the ported values of the tensors `names` the patch replaces whole (filled as they are measured)."""
    if scale != 1:
        tensors, settings = KINDS[patch.meta.kind].rescale(patch, scale)
    else:
        tensors, settings = patch.tensors, dict(patch.meta.settings)
    if names:
        tensors = MappedTensors(tensors, patch.shapes, lambda name, _: replaced[name], names)
    return _PortedContents(tensors, patch.meta.model_copy(update={"settings": settings}))


def _ported(inputs: _PortInputs, measured: _Measured, context: dict[str, str]) -> Ported:
    """The ported patch and its drift report, from what was measured and the new base's sampled context."""
    fingerprint = BaseFingerprint.of(measured.fingerprints, context)
    patch, scale = inputs.patch, inputs.scale
    drift = _report(patch, measured, inputs.label, inputs.new, fingerprint.digest, inputs.old, scale)
    contents = _ported_contents(patch, measured.replaced, set(measured.replaced), scale)
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
        settings=contents.meta.settings,
    )
    return Ported(Patch(contents.tensors, meta), drift)


def _context(new: Checkpoint, touched: Iterable[str], progress: Progress) -> dict[str, str]:
    """The new base's fingerprint context: its float tensors the patch does not touch, sampled."""
    others = context_names(new, touched)
    progress.start("fingerprinting the new base", len(others), context_bytes(new, others))
    try:
        return sample_context(new, others, progress)
    finally:
        progress.finish()
