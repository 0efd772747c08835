"""`splice patch merge`: patches of one kind merged into one patch with a merge method, without a full model.

Every patch is a change to one base; the method runs on the changes, tensor by tensor, over a zero base
(`splice.merge.task_vectors`), so `base + merged patch` is what the method makes of the patched models.

LoRA patches: the change of a matrix is scale_i B_i A_i. A weighted-sum method (linear, task_arithmetic)
merges to sum_i c_i scale_i B_i A_i = [c_1 scale_1 B_1 | ... | c_n scale_n B_n] @ [A_1; ...; A_n]: by default
those concatenated factors are the merged patch, exactly, with rank the sum of the ranks; with `rank` or `energy`
the product is re-factored from the factors (QR of both, SVD of the small core: `product_svd`), never forming
the rows x cols matrix. Every other method acts on the entries of the change, so each matrix's changes are
formed (one matrix at a time), merged, and factored again by a truncated SVD (`truncated_svd`: a full SVD, or a
randomized one for a large matrix kept at a small rank, as extraction does). Each matrix's captured energy (the
share of the merged change's squared Frobenius norm the factors keep) is reported; `energy` picks, per matrix,
the smallest rank that keeps it.

LayerNorm patches hold the values they replace, so their changes are value - base (the base is needed);
delta patches hold changes; mask patches with values are sparse changes (a bare mask prunes, which is no
change to add, and is refused). The result records its inputs (source, content digest, base digest) and the
fingerprint of the base they share; patches made on different bases are refused with the tensors that differ.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from typing_extensions import Unpack

from splice.adapters.fingerprint import (
    compare_base,
    compare_records,
    fingerprint_base,
    refuse_drift,
    shared_record,
    tensor_sha256,
)
from splice.adapters.kinds.lora import check_request
from splice.adapters.kinds.stats import not_a_change
from splice.adapters.meta import BaseFingerprint, PatchKind, PatchMeta
from splice.adapters.patch import Patch
from splice.adapters.port import patch_label
from splice.adapters.sources import PatchSource, load_patch, patch_location
from splice.errors import PatchError
from splice.merge.task_vectors import TaskVectorMerge, task_vector_merge
from splice.options import RunKeywords, RunOptions, run_options
from splice.registry.manifest import TensorEntry, content_digest
from splice.registry.store import Registry, open_registry
from splice.tensors.checkpoint import Checkpoint, recorded_location
from splice.tensors.device import resolve_device
from splice.tensors.safetensors import DTYPE_TO_SAFETENSORS
from splice.tensors.writer import ensure_output_free
from splice.workflows.patch_mergers import MergedTensor
from splice.workflows.patch_mergers import merger as patch_merger
from splice.workflows.port import is_registry_ref


@dataclass(frozen=True)
class MergeInput:
    source: str  # a registry ref (name@version) or where the patch was read from
    digest: str  # its content digest: a registry version's, or the one it would have if pushed
    kind: str
    base_digest: str | None  # the digest of the base record it carries (None: none, e.g. a PEFT adapter)


@dataclass
class PatchMergeReport:
    out: Path
    kind: str
    method: str
    inputs: list[MergeInput]
    base_digest: str | None  # the merged patch's base record (None: its inputs recorded none)
    tensors: list[MergedTensor]
    parameters: int  # values the merged patch holds
    warnings: list[str] = field(default_factory=list)


def merge_patches(
    patches: Sequence[PatchSource],
    out: str | os.PathLike,
    method: str,
    *,
    weights: Sequence[float] | None = None,
    density: float | None = None,
    parameters: Mapping[str, Any] | None = None,
    rank: int | None = None,
    energy: float | None = None,
    seed: int | None = None,
    base: str | os.PathLike | None = None,
    registry: Registry | str | None = None,
    description: str = "",
    run: RunOptions | None = None,
    **run_keywords: Unpack[RunKeywords],
) -> PatchMergeReport:
    """Merge patches of one kind (splice patch directories, PEFT adapters, registry refs) with a merge `method`
    (linear, task_arithmetic, ties, dare_ties, ...) into one patch of that kind at `out`. `weights`: one per
    patch (default 1 each); `density` and `parameters` (lambda, normalize, epsilon, ...): the method's shared
    parameters. LoRA: without `rank` or `energy`, linear and task_arithmetic concatenate the factors (exact,
    rank = the sum of the ranks) and the other methods are refused; `rank` re-factors every matrix to that rank
    (at most), `energy` to the smallest rank keeping that share of the merged change (`rank` then caps it).
    `seed` seeds torch's generator before the first tensor (dare_ties, dare_linear, della). `base`, the model
    the patches were made on: needed for LayerNorm patches; every patch is then checked against it (else their
    records are compared with each other). `run` (or its fields as keywords: device, force, progress,
    storage_options) says how the run runs."""
    run = run_options(run, run_keywords, "merge_patches")
    if not patches:
        raise PatchError("no patches given; give the patches to merge")
    if density is not None:
        if "density" in (parameters or {}):
            raise PatchError("give the density once: as `density` or in `parameters`, not both")
        parameters = {**(parameters or {}), "density": density}
    if rank is not None or energy is not None:
        check_request(rank, energy)
    store = open_registry(registry, run.storage_options) if any(map(is_registry_ref, patches)) else None
    locations = [p for p in map(patch_location, patches) if p is not None and not is_registry_ref(p)]
    protected = [*locations, *(p for p in (base, store.url if store else None) if p is not None)]
    ensure_output_free(out, run.force, protected=protected, what="an input, the base or the registry")
    base_ckpt = Checkpoint.open(base, run.storage_options) if base is not None else None
    inputs = [_load(i, p, store, base_ckpt, run.storage_options) for i, p in enumerate(patches)]
    kind = _one_kind(inputs)
    if kind is PatchKind.layernorm and base_ckpt is None:
        raise PatchError(
            "layernorm patches hold the values they replace, not changes: merging them needs the base they were "
            "made on, to take the changes from: give `base=MODEL_DIR`"
        )
    records = _shared_base(inputs, base_ckpt, kind)
    device = resolve_device(run.device)
    merger = patch_merger(kind, [i.patch for i in inputs], [i.label for i in inputs], base_ckpt, device)
    depth = list(base_ckpt.tensors) if base_ckpt is not None else None
    merge = task_vector_merge(method, len(inputs), merger.names(), weights, parameters, model_names=depth)
    _check_rank(kind, merge, rank, energy)
    if seed is not None:
        torch.manual_seed(seed)
    progress = run.reporter
    progress.start(f"{method} merge of {len(inputs)} {kind.value} patches", len(merger.names()), 0)
    try:
        merged = merger.merge(merge, rank, energy, progress.advance)
    finally:
        progress.finish()
    if not merged.tensors:
        raise PatchError(f"the {method} merge of these patches changes nothing: every merged change is zero")
    touched = [t.name for t in merged.report]
    fingerprint = (
        fingerprint_base(base_ckpt, touched, run.progress)
        if base_ckpt is not None
        else (shared_record(records, touched) if records else None)
    )
    described = [
        MergeInput(i.source, i.digest(), kind.value, i.patch.meta.base.digest if i.patch.meta.base else None)
        for i in inputs
    ]
    record = {"method": method, "weights": list(weights or [1.0] * len(inputs)), "parameters": dict(parameters or {})}
    meta = PatchMeta(
        kind=kind,
        targets=merged.targets,
        base=fingerprint,
        lineage=_lineage(inputs, described, method, base),
        description=description,
        settings={**merged.settings, "merge": {**record, "seed": seed, "inputs": [_as_record(i) for i in described]}},
    )
    patch = Patch(merged.tensors, meta)
    patch.save(out, force=run.force)
    digest = fingerprint.digest if fingerprint else None
    return PatchMergeReport(
        Path(out), kind.value, method, described, digest, merged.report, patch.num_parameters, merged.warnings
    )


def _as_record(described: MergeInput) -> dict[str, str]:
    """How the merged patch's settings name one input."""
    return {"source": described.source, "digest": described.digest, "base": described.base_digest or "not recorded"}


def _lineage(
    inputs: list[_Input], described: list[MergeInput], method: str, base: str | os.PathLike | None
) -> list[str]:
    """The base first (given, or the one every input's lineage starts with, as extracted patches name theirs; where
    `export_peft` looks for it), then one line naming the merge and its inputs with their digests."""
    if base is not None:
        first = [recorded_location(base)]
    else:
        firsts = {item.patch.meta.lineage[0] for item in inputs if len(item.patch.meta.lineage) >= 2}
        complete = all(len(item.patch.meta.lineage) >= 2 for item in inputs)
        first = [firsts.pop()] if complete and len(firsts) == 1 else []
    return [*first, f"{method} merge of " + ", ".join(f"{d.source} ({d.digest})" for d in described)]


# -- inputs ---------------------------------------------------------------------------------------------


class _Hashed(Mapping[str, torch.Tensor]):
    """A patch's tensors, each hashed as it is read (for the patch's content digest without a second read)."""

    def __init__(self, patch: Patch):
        self.tensors, self._shapes = patch.tensors, patch.shapes
        self.entries: dict[str, TensorEntry] = {}  # name -> its sha256, dtype, shape and size, as the registry has them

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self._shapes

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self.tensors[name]
        if name not in self.entries:
            self.entries[name] = TensorEntry(
                digest=tensor_sha256(tensor),
                dtype=DTYPE_TO_SAFETENSORS[tensor.dtype],
                shape=tuple(tensor.shape),
                nbytes=tensor.numel() * tensor.element_size(),
            )
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def read_all(self) -> dict[str, torch.Tensor]:
        return dict(self)


@dataclass
class _Input:
    index: int
    source: str
    patch: Patch
    registry_digest: str | None = None

    @property
    def label(self) -> str:
        return f"patch {self.index + 1} ({self.source})"

    def digest(self) -> str:
        """A registry version's digest, or the content digest the patch would have if pushed (its tensors were
        hashed as they were read; any not read yet are read now)."""
        if self.registry_digest is not None:
            return self.registry_digest
        tensors = self.patch.tensors
        assert isinstance(tensors, _Hashed)
        for name in tensors:  # any not read by the merge is read (and hashed) now
            tensors[name]
        return content_digest(self.patch.meta, {name: tensors.entries[name] for name in tensors})


def _load(
    index: int, patch: PatchSource, store: Registry | None, base: Checkpoint | None, storage_options: dict | None
) -> _Input:
    if store is not None and is_registry_ref(patch):
        version = store.resolve(str(patch))
        return _Input(index, version.ref, store.load(version.ref), version.digest)
    loaded = load_patch(patch, storage_options, base=base)
    return _Input(index, patch_label(patch), Patch(_Hashed(loaded), loaded.meta))


def _one_kind(inputs: list[_Input]) -> PatchKind:
    kind = inputs[0].patch.meta.kind
    if any(item.patch.meta.kind is PatchKind.stats for item in inputs):
        not_a_change()
    for item in inputs[1:]:
        if item.patch.meta.kind is not kind:
            raise PatchError(
                f"{item.label} is a {item.patch.meta.kind.value} patch and {inputs[0].label} a {kind.value} "
                f"patch: merge patches of one kind"
            )
    return kind


def _shared_base(inputs: list[_Input], base: Checkpoint | None, kind: PatchKind) -> list[BaseFingerprint]:
    """The inputs' base records once they agree: each checked against `base` when it is given, else each
    compared with the first (returned, for the merged record); none when no input records its base."""
    if base is not None:
        for item in inputs:
            if item.patch.meta.base is not None:
                try:
                    refuse_drift(compare_base(item.patch.meta.base, base), str(base.location), kind.value, None)
                except PatchError as exc:
                    raise PatchError(f"{item.label}: {exc}") from None
        return []
    records = [item.patch.meta.base for item in inputs]
    missing = [item for item, record in zip(inputs, records) if record is None]
    if len(missing) == len(inputs):
        return []
    if missing:
        raise PatchError(
            f"{missing[0].label} records no base (a PEFT adapter?) and the others do: give `base=MODEL_DIR`, the "
            f"model they were made on, to check them all against it"
        )
    # every pair: two records compare only the tensors both hash whole (or both sample), so agreeing with patch 1
    # says nothing of a tensor patch 1 only samples
    for i, (first, one) in enumerate(zip(inputs, records)):
        for second, other in zip(inputs[i + 1 :], records[i + 1 :]):
            assert one is not None and other is not None
            mismatches = compare_records(one, other, f"on the base of {first.label}")
            if mismatches:
                shown = "; ".join(str(m) for m in mismatches[:2])
                more = f" (and {len(mismatches) - 2} more)" if len(mismatches) > 2 else ""
                raise PatchError(
                    f"{second.label} and {first.label} were made on different bases: {shown}{more}; merge patches "
                    f"made on one base (`splice port` carries a patch onto another base)"
                )
    return [r for r in records if r is not None]


def _check_rank(kind: PatchKind, merge: TaskVectorMerge, rank: int | None, energy: float | None) -> None:
    if kind is not PatchKind.lora:
        if rank is not None or energy is not None:
            raise PatchError(
                f"`rank` and `energy` are for LoRA patches; {kind.value} patches merge whole tensors: leave them out"
            )
        return
    if rank is None and energy is None and not merge.is_weighted_sum:
        raise PatchError(
            f"{merge.method} changes the merged matrices entry by entry, so they are no longer of low rank: "
            f"give `rank=R` (a rank for every matrix) or `energy=E` (the share of each merged change to keep, "
            f"e.g. 0.99)"
        )
