"""Base fingerprints: what a patch records of the base it was made on, and the comparison that refuses
a wrong base with a precise account of what differs."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from math import prod
from typing import Literal

import torch

from splice.adapters.meta import BaseFingerprint, TensorFingerprint
from splice.errors import PatchError
from splice.progress import NoProgress, Progress
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.device import dtype_name
from splice.tensors.safetensors import dtype_itemsize


def tensor_sha256(tensor: torch.Tensor) -> str:
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()  # type: ignore[arg-type]  # numpy: a buffer on 3.12+ only


CONTEXT_SAMPLE_BYTES = 64 * 1024


def sample_sha256(prefix: torch.Tensor, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> str:
    """sha256 of a tensor's shape, dtype and first CONTEXT_SAMPLE_BYTES bytes; `prefix` is the tensor or
    its leading rows (both hash the same)."""
    data = prefix.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)[:CONTEXT_SAMPLE_BYTES]
    summary = hashlib.sha256(f"{list(shape)}\0{dtype_name(dtype)}\0".encode())
    summary.update(memoryview(data.numpy()))  # type: ignore[arg-type]  # numpy: a buffer on 3.12+ only
    return summary.hexdigest()


def _sample_rows(shape: tuple[int, ...], itemsize: int) -> tuple[int, int] | None:
    """Leading rows of a stored tensor that cover CONTEXT_SAMPLE_BYTES (None: read it whole)."""
    if not shape or shape[0] == 0:
        return None
    row_bytes = max(1, itemsize * prod(shape[1:]))
    return (0, min(shape[0], -(-CONTEXT_SAMPLE_BYTES // row_bytes)))


def _read_stored(base: Checkpoint, name: str, sample: bool = False) -> torch.Tensor:
    info = base.tensors[name]
    return base.read(name, rows=_sample_rows(info.shape, dtype_itemsize(info.dtype)) if sample else None)


def l2_norm(tensor: torch.Tensor) -> float:
    """The L2 norm accumulated in fp64 (fp32 accumulation loses digits on large tensors), without an fp64 copy."""
    return float(torch.linalg.vector_norm(tensor.detach(), dtype=torch.float64))


def fingerprint_tensor(
    name: str, tensor: torch.Tensor, dtype: torch.dtype, sha256: str | None = None
) -> TensorFingerprint:
    """A base tensor the patch touches, hashed whole (`dtype`: as stored; `sha256`: its hash, when a caller has
    already computed it, e.g. on a worker thread)."""
    return TensorFingerprint(
        name=name,
        shape=tuple(tensor.shape),
        dtype=dtype_name(dtype),
        sha256=sha256 or tensor_sha256(tensor),
        norm=l2_norm(tensor),
    )


def context_names(base: Checkpoint, touched: Iterable[str]) -> list[str]:
    """The base's float tensors a fingerprint samples: every one the patch does not touch."""
    touched = set(touched)
    return [name for name, info in base.tensors.items() if name not in touched and info.dtype.is_floating_point]


def sample_context(base: Checkpoint, names: Iterable[str], progress: Progress) -> dict[str, str]:
    """name -> sample hash of each named tensor (its leading CONTEXT_SAMPLE_BYTES), read one by one."""
    context = {}
    for name in names:
        info = base.tensors[name]
        context[name] = sample_sha256(_read_stored(base, name, sample=True), info.shape, info.dtype)
        progress.advance(1, min(info.nbytes, CONTEXT_SAMPLE_BYTES))
    return context


def context_bytes(base: Checkpoint, names: Iterable[str]) -> int:
    return sum(min(base.tensors[name].nbytes, CONTEXT_SAMPLE_BYTES) for name in names)


def refuse_missing(base: Checkpoint, names: Iterable[str]) -> None:
    missing = [name for name in names if name not in base.tensors]
    if missing:
        raise PatchError(f"{base.location}: the patch targets {missing[0]}, which this base does not have")


def fingerprint_base(base: Checkpoint, names: Iterable[str], progress: Progress | None = None) -> BaseFingerprint:
    """Fingerprint the named tensors of a base model (hashed whole) and its other float tensors (sampled),
    read one by one through the spine."""
    progress = progress or NoProgress()
    names = list(names)
    refuse_missing(base, names)
    others = context_names(base, names)
    progress.start(
        "fingerprinting the base",
        len(names) + len(others),
        sum(base.tensors[name].nbytes for name in names) + context_bytes(base, others),
    )
    try:
        entries = []
        for name in names:
            info = base.tensors[name]
            entries.append(fingerprint_tensor(name, base.read(name), info.dtype))
            progress.advance(1, info.nbytes)
        context = sample_context(base, others, progress)
    finally:
        progress.finish()
    return BaseFingerprint.of(entries, context)


MismatchReason = Literal["missing", "shape", "dtype", "values", "context"]  # context: another base tensor differs


@dataclass(frozen=True)
class BaseMismatch:
    name: str
    reason: MismatchReason
    detail: str
    own: bool = True  # one of the tensors the patch changes (else one of the base's other tensors)

    def __str__(self) -> str:
        return f"{self.name}: {self.detail}"


StoredTensor = tuple[tuple[int, ...], torch.dtype, Callable[..., torch.Tensor]]
TensorSource = Callable[[str], "StoredTensor | None"]
"""name -> (shape, dtype, read), or None when there is no such tensor. `read()` gives the values;
`read(sample=True)` may stop after the leading bytes a context sample needs."""


def _compare_tensor(entry: TensorFingerprint, source: TensorSource) -> BaseMismatch | None:
    found = source(entry.name)
    if found is None:
        return BaseMismatch(entry.name, "missing", "not in this base")
    shape, dtype, read = found

    def hashed() -> tuple[str, Callable[[], float]]:
        tensor = read()
        return tensor_sha256(tensor), partial(l2_norm, tensor)

    return _compare_entry(entry, tuple(shape), dtype_name(dtype), hashed)


def _compare_entry(
    entry: TensorFingerprint,
    shape: tuple[int, ...],
    dtype: str,
    hashed: Callable[[], tuple[str, Callable[[], float]]],
    recorded: str = "when the patch was made",
) -> BaseMismatch | None:
    """A base tensor (its shape, dtype name, and `hashed()`: its sha256 and what computes its L2 norm, asked for
    only when shape and dtype agree, the norm only when the hash differs) against what `entry` recorded of it
    (`recorded`: how a message says where that record is from)."""
    if tuple(shape) != tuple(entry.shape):
        return BaseMismatch(entry.name, "shape", f"shape {list(shape)}, patch made on {list(entry.shape)}")
    if dtype != entry.dtype:
        return BaseMismatch(entry.name, "dtype", f"{dtype}, patch made on {entry.dtype}")
    sha256, norm_of = hashed()
    if sha256 == entry.sha256:
        return None
    norm = norm_of()
    return BaseMismatch(
        entry.name,
        "values",
        f"values differ: L2 norm {norm:.6g}, {entry.norm:.6g} {recorded}{_norm_change(norm, entry.norm)}",
    )


def _norm_change(norm: float, recorded: float) -> str:
    """By how much the norm moved, as a percentage; a change that rounds to zero says so in words."""
    if not recorded:
        return ""
    change = f"{(norm - recorded) / recorded:+.2%}"
    return " (the same norm, other values)" if change in ("+0.00%", "-0.00%") else f" ({change})"


def _compare_context(name: str, sampled: str, source: TensorSource) -> BaseMismatch | None:
    found = source(name)
    if found is None:
        return BaseMismatch(name, "missing", "not in this base", own=False)
    shape, dtype, read = found
    if sample_sha256(read(sample=True), shape, dtype) != sampled:
        return BaseMismatch(name, "context", f"differs (shape {list(shape)}, {dtype_name(dtype)})", own=False)
    return None


def compare_fingerprint(expected: BaseFingerprint, source: TensorSource) -> list[BaseMismatch]:
    """How the tensors `source` gives differ from the base a patch was made on; empty when it is that base.
    Tensors are read and hashed on a few threads (reads and sha256 release the GIL)."""
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        own = pool.map(lambda entry: _compare_tensor(entry, source), expected.tensors)
        context = pool.map(lambda item: _compare_context(item[0], item[1], source), expected.context.items())
        return [m for m in (*own, *context) if m is not None]


def compare_records(
    expected: BaseFingerprint, other: BaseFingerprint, recorded: str = "in the first record"
) -> list[BaseMismatch]:
    """How the base `other` records differs from the base `expected` records, where both record a tensor the same
    way: hashed whole (tensors both patches touch) or sampled (tensors neither touches). A tensor one record hashes
    whole and the other samples cannot be compared from the records: only a base model can settle it."""
    theirs = {entry.name: entry for entry in other.tensors}
    mismatches = []
    for entry in expected.tensors:
        own = theirs.get(entry.name)
        if own is not None:
            found = _compare_entry(entry, own.shape, own.dtype, partial(_recorded_hash, own), recorded)
            mismatches += [found] if found else []
    mismatches += [
        BaseMismatch(name, "context", "differs (its sampled bytes)", own=False)
        for name, sampled in expected.context.items()
        if name in other.context and other.context[name] != sampled
    ]
    return mismatches


def _recorded_hash(entry: TensorFingerprint) -> tuple[str, Callable[[], float]]:
    return entry.sha256, lambda: entry.norm


def shared_record(records: Sequence[BaseFingerprint], touched: Iterable[str]) -> BaseFingerprint:
    """The fingerprint of one base, made from `records` (compared already) that each fingerprint it in part, for a
    patch that changes the `touched` tensors: each of those as the first record that hashes it whole has it, and
    the tensors every record samples, sampled. A touched tensor no record hashes whole is refused."""
    whole: dict[str, TensorFingerprint] = {}
    for record in records:
        for entry in record.tensors:
            whole.setdefault(entry.name, entry)
    touched = list(touched)
    unrecorded = [name for name in touched if name not in whole]
    if unrecorded:
        raise PatchError(
            f"no base record fingerprints {first_names(unrecorded)}; give the base model to fingerprint it"
        )
    context = {
        name: sampled
        for name, sampled in records[0].context.items()
        if name not in whole and all(name in record.context for record in records[1:])
    }
    return BaseFingerprint.of((whole[name] for name in touched), context)


def compare_base(expected: BaseFingerprint, base: Checkpoint) -> list[BaseMismatch]:
    """How a stored base differs from the base a patch was made on."""

    def stored(name: str) -> StoredTensor | None:
        info = base.tensors.get(name)
        return None if info is None else (info.shape, info.dtype, lambda sample=False: _read_stored(base, name, sample))

    return compare_fingerprint(expected, stored)


def first_names(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def refuse_drift(mismatches: list[BaseMismatch], what: str, kind: str, override: str | None) -> None:
    """One-line refusal naming the first differences, when there are any: the patch's own tensors first,
    then how many of the base's other tensors differ. `override` is suggested only where it would work: a
    base without the tensors the patch changes (or with them in other shapes) cannot take the patch at all."""
    if not mismatches:
        return
    own = [m for m in mismatches if m.own]
    context = [m for m in mismatches if not m.own]
    missing = [m.name for m in own if m.reason == "missing"]
    reshaped = [m for m in own if m.reason == "shape"]
    if missing or reshaped:
        unfit = []
        if missing:
            unfit.append(f"it lacks {len(missing)} of the tensors the patch changes ({first_names(missing)})")
        if reshaped:
            unfit.append(f"{len(reshaped)} of the tensors the patch changes have another shape, e.g. {reshaped[0]}")
        raise PatchError(
            f"{what} is not the base this {kind} patch was made for: {'; '.join(unfit)}; apply it "
            f"to a base that has them"
        )
    parts = [str(m) for m in own[:2]]
    if len(own) > 2:
        parts.append(f"{len(own) - 2} more of the tensors it changes differ")
    if context:
        others = "1 other tensor differs" if len(context) == 1 else f"{len(context)} other tensors differ"
        parts.append(f"{others}, e.g. {context[0].name}")
    remedy = f"pass {override} to apply it anyway" if override else "give the base it was made on"
    raise PatchError(f"{what} is not the base this {kind} patch was made for: {'; '.join(parts)}; {remedy}")
