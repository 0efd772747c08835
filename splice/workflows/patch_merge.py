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

import math
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
    first_names,
    refuse_drift,
    shared_record,
    tensor_sha256,
)
from splice.adapters.kinds.lora import (
    SUFFIX_A,
    SUFFIX_B,
    balanced_factors,
    check_request,
    lora_modules,
    module_scale,
    product_svd,
    truncated_svd,
)
from splice.adapters.kinds.mask import MASK_SUFFIX, VALUES_SUFFIX, pack_mask, unpack_mask
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
from splice.workflows.port import is_registry_ref


@dataclass(frozen=True)
class MergedTensor:
    """One base tensor the merged patch changes, and how its change was made."""

    name: str
    how: str  # "concatenated", "qr + core svd", "full svd", "randomized svd" (LoRA); "whole tensor"
    rank: int | None = None  # LoRA: the rank kept
    captured_energy: float | None = None  # LoRA: the share of the merged change's squared Frobenius norm kept


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
        raise PatchError("no patches given; give two or more patches to merge")
    if density is not None:
        if parameters and "density" in (parameters or {}):
            raise PatchError("give the density once: as `density` or in `parameters`, not both")
        parameters = {**(parameters or {}), "density": density}
    if rank is not None or energy is not None:
        check_request(rank, energy)
    store = (
        open_registry(registry, run.storage_options)
        if any(is_registry_ref(p) for p in patches if not isinstance(p, Patch))
        else None
    )
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
    record = _shared_base(inputs, base_ckpt, kind)
    merger = _MERGERS[kind](inputs, base_ckpt, resolve_device(run.device))
    merge = task_vector_merge(method, len(inputs), merger.names(), weights, parameters)
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
        else (shared_record(record, touched) if record else None)
    )
    described = [
        MergeInput(i.source, i.digest(), kind.value, i.patch.meta.base.digest if i.patch.meta.base else None)
        for i in inputs
    ]
    settings = {
        **merged.settings,
        "merge": {
            "method": method,
            "weights": list(weights) if weights is not None else [1.0] * len(inputs),
            "parameters": dict(parameters or {}),
            "seed": seed,
            "inputs": [
                {"source": i.source, "digest": i.digest, "base_digest": i.base_digest or "not recorded"}
                for i in described
            ],
        },
    }
    base_line = [recorded_location(base)] if base is not None else _common_base_line(inputs)
    meta = PatchMeta(
        kind=kind,
        targets=merged.targets,
        base=fingerprint,
        lineage=[*base_line, f"{method} merge of " + ", ".join(f"{i.source} ({i.digest})" for i in described)],
        description=description,
        settings=settings,
    )
    patch = Patch(merged.tensors, meta)
    patch.save(out, force=run.force)
    return PatchMergeReport(
        Path(out),
        kind.value,
        method,
        described,
        fingerprint.digest if fingerprint else None,
        merged.report,
        patch.num_parameters,
        merged.warnings,
    )


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
    if store is not None and not isinstance(patch, Patch) and is_registry_ref(patch):
        version = store.resolve(str(patch))
        return _Input(index, version.ref, store.load(version.ref), version.digest)
    loaded = load_patch(patch, storage_options, base=base)
    return _Input(index, patch_label(patch), Patch(_Hashed(loaded), loaded.meta))


def _one_kind(inputs: list[_Input]) -> PatchKind:
    kind = inputs[0].patch.meta.kind
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
    first = records[0]
    assert first is not None
    for item, record in zip(inputs[1:], records[1:]):
        assert record is not None
        mismatches = compare_records(first, record, "on the base of patch 1")
        if mismatches:
            shown = "; ".join(str(m) for m in mismatches[:2])
            more = f" (and {len(mismatches) - 2} more)" if len(mismatches) > 2 else ""
            raise PatchError(
                f"{item.label} and {inputs[0].label} were made on different bases: {shown}{more}; merge patches "
                f"made on one base (`splice port` carries a patch onto another base)"
            )
    return [r for r in records if r is not None]


def _common_base_line(inputs: list[_Input]) -> list[str]:
    """The base every input's lineage starts with (extracted patches name theirs first), when they agree."""
    firsts = {item.patch.meta.lineage[0] for item in inputs if len(item.patch.meta.lineage) >= 2}
    complete = all(len(item.patch.meta.lineage) >= 2 for item in inputs)
    return [firsts.pop()] if complete and len(firsts) == 1 else []


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


# -- merging, by kind -----------------------------------------------------------------------------------


@dataclass
class _Merged:
    tensors: dict[str, torch.Tensor]
    targets: list[str]
    settings: dict[str, Any]
    report: list[MergedTensor]
    warnings: list[str] = field(default_factory=list)


class _LoraMerger:
    """Per matrix: the inputs' factors, merged by concatenation, by re-factoring the product, or through the
    method on the formed changes and a truncated SVD."""

    def __init__(self, inputs: list[_Input], base: Checkpoint | None, device: torch.device):
        self.inputs, self.base, self.device = inputs, base, device
        self.modules: dict[str, list[tuple[int, float]]] = {}  # module -> (input index, scale) of the inputs with it
        self.shapes: dict[str, tuple[int, int]] = {}
        for item in inputs:
            replaced = item.patch.meta.settings.get("replaced") or []
            if replaced:
                raise PatchError(
                    f"{item.label} replaces whole tensors ({first_names(list(replaced))}: PEFT's modules_to_save or "
                    f"trained biases), which a LoRA merge does not carry; merge it with peft (merge_and_unload), "
                    f"extract a delta patch and merge delta patches"
                )
            shapes = item.patch.shapes
            for module in lora_modules(item.patch):
                scale = module_scale(item.patch, module)
                shape = (shapes[module + SUFFIX_B][0], shapes[module + SUFFIX_A][1])
                known = self.shapes.setdefault(module, shape)
                if known != shape:
                    raise PatchError(
                        f"{item.label} changes {module}.weight as shape {list(shape)}, an earlier patch as "
                        f"{list(known)}: they were not made for one base"
                    )
                self.modules.setdefault(module, []).append((item.index, scale))

    def names(self) -> list[str]:
        return [f"{module}.weight" for module in self.modules]

    def _factors(self, index: int, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = self.inputs[index].patch.tensors
        a = tensors[module + SUFFIX_A].to(device=self.device, dtype=torch.float32)
        b = tensors[module + SUFFIX_B].to(device=self.device, dtype=torch.float32)
        return a, b

    def merge(self, merge: TaskVectorMerge, rank: int | None, energy: float | None, advance: Any) -> _Merged:
        tensors: dict[str, torch.Tensor] = {}
        report: list[MergedTensor] = []
        settings: dict[str, Any] = {
            "rslora": False,
            "rank": {},
            "alpha": {},
            "requested": {"rank": rank, "energy": energy},
            "captured_energy": {},
            "relative_error": {},
            "svd": {},
        }
        zero = []
        for module, present in self.modules.items():
            name = f"{module}.weight"
            found = (
                self._weighted_sum(merge, name, module, present, rank, energy)
                if merge.is_weighted_sum
                else self._entrywise(merge, name, module, present, rank, energy)
            )
            advance(1, 0)
            if found is None:
                zero.append(name)
                continue
            a, b, how, captured = found
            tensors[module + SUFFIX_A], tensors[module + SUFFIX_B] = a, b
            kept = a.shape[0]
            settings["rank"][module], settings["alpha"][module] = kept, float(kept)
            settings["captured_energy"][module] = captured
            settings["relative_error"][module] = math.sqrt(max(1.0 - captured, 0.0))
            settings["svd"][module] = how
            report.append(MergedTensor(name, how, kept, captured))
        warnings = [f"{len(zero)} matrices merge to no change and are left out ({first_names(zero)})"] if zero else []
        return _Merged(tensors, [t.name[: -len(".weight")] for t in report], settings, report, warnings)

    def _weighted_sum(
        self,
        merge: TaskVectorMerge,
        name: str,
        module: str,
        present: list[tuple[int, float]],
        rank: int | None,
        energy: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor, str, float] | None:
        coefficients = merge.coefficients(name)
        a_parts, b_parts = [], []
        for index, scale in present:
            if coefficients[index] != 0:
                a, b = self._factors(index, module)
                a_parts.append(a)
                b_parts.append(b * (coefficients[index] * scale))
        if not a_parts:
            return None
        a, b = torch.cat(a_parts, 0), torch.cat(b_parts, 1)
        if rank is None and energy is None:
            return a.contiguous().cpu(), b.contiguous().cpu(), "concatenated", 1.0
        u, s, vh, total = product_svd(b, a, rank, energy)
        if total == 0:
            return None
        return (*balanced_factors(u, s, vh), "qr + core svd", _captured(s, total))

    def _entrywise(
        self,
        merge: TaskVectorMerge,
        name: str,
        module: str,
        present: list[tuple[int, float]],
        rank: int | None,
        energy: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor, str, float] | None:
        rows, cols = self.shapes[module]
        changes = [torch.zeros(rows, cols, device=self.device) for _ in self.inputs]
        for index, scale in present:
            a, b = self._factors(index, module)
            changes[index].addmm_(b, a, alpha=scale)
        merged = merge.merged(name, changes)
        del changes
        total = float(merged.double().square().sum())
        if total == 0:
            return None
        u, s, vh, method = truncated_svd(merged, rank, energy)
        return (*balanced_factors(u, s, vh), f"{method} svd", _captured(s, total))


def _captured(s: torch.Tensor, total: float) -> float:
    return min(float(s.double().square().sum()) / total, 1.0)


class _WholeMerger:
    """Per base tensor: every input's change as a whole tensor (zeros where an input leaves it alone), merged."""

    def __init__(self, inputs: list[_Input], base: Checkpoint | None, device: torch.device):
        self.inputs, self.base, self.device = inputs, base, device
        self.kind = inputs[0].patch.meta.kind
        self.targets: dict[str, tuple[int, ...]] = {}
        self.present: dict[str, list[int]] = {}
        for item in inputs:
            for name, shape in self._changes_of(item).items():
                known = self.targets.setdefault(name, shape)
                if known != shape:
                    raise PatchError(
                        f"{item.label} changes {name} as shape {list(shape)}, an earlier patch as {list(known)}: "
                        f"they were not made for one base"
                    )
                self.present.setdefault(name, []).append(item.index)
        if self.base is not None:
            for name, shape in self.targets.items():
                info = self.base.tensors.get(name)
                if info is None or tuple(info.shape) != tuple(shape):
                    found = "has no such tensor" if info is None else f"has it as {list(info.shape)}"
                    raise PatchError(
                        f"the patches change {name} as shape {list(shape)}; the base {self.base.location} {found}"
                    )

    def _changes_of(self, item: _Input) -> dict[str, tuple[int, ...]]:
        """The base tensors an input changes, with their shapes."""
        patch = item.patch
        if self.kind is not PatchKind.mask:
            return {name: tuple(shape) for name, shape in patch.shapes.items()}
        listed = patch.meta.settings.get("shapes")
        if not isinstance(listed, dict):
            raise PatchError(
                f"{item.label}: the mask patch's settings have no tensor shapes; it was not written by splice"
            )
        bare = [name for name in listed if name + VALUES_SUFFIX not in patch.shapes]
        if bare:
            raise PatchError(
                f"{item.label} is a bare mask (no values on {first_names(bare)}): it prunes rather than adds a "
                f"change, so it does not merge; merge sparse deltas (extracted with values, --mask-values)"
            )
        return {name: tuple(shape) for name, shape in listed.items()}

    def names(self) -> list[str]:
        return list(self.targets)

    def _change(self, index: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        patch = self.inputs[index].patch
        if self.kind is PatchKind.mask:
            change = torch.zeros(shape, device=self.device).reshape(-1)
            mask = unpack_mask(patch.tensors[name + MASK_SUFFIX].to(self.device), shape).reshape(-1)
            values = patch.tensors[name + VALUES_SUFFIX].to(device=self.device, dtype=torch.float32)
            if values.numel() != int(mask.sum()):
                raise PatchError(
                    f"{self.inputs[index].label}: {name}: the mask selects {int(mask.sum())} entries but the patch "
                    f"holds {values.numel()} values"
                )
            change[mask] = values
            return change.reshape(shape)
        value = patch.tensors[name].to(device=self.device, dtype=torch.float32)
        if self.kind is PatchKind.layernorm:
            assert self.base is not None
            value = value - self._base_value(name)
        return value

    def _base_value(self, name: str) -> torch.Tensor:
        assert self.base is not None
        return self.base.read(name).to(device=self.device, dtype=torch.float32)

    def merge(self, merge: TaskVectorMerge, rank: int | None, energy: float | None, advance: Any) -> _Merged:
        tensors: dict[str, torch.Tensor] = {}
        report: list[MergedTensor] = []
        shapes: dict[str, list[int]] = {}
        kept: dict[str, int] = {}
        for name, shape in self.targets.items():
            changes = [torch.zeros(shape, device=self.device) for _ in self.inputs]
            for index in self.present[name]:
                changes[index] = self._change(index, name, shape)
            merged = merge.merged(name, changes)
            advance(1, 0)
            if self.kind is PatchKind.layernorm:
                tensors[name] = (self._base_value(name) + merged).cpu()
            elif self.kind is PatchKind.delta:
                tensors[name] = merged.cpu()
            else:
                mask = merged.ne(0)
                if not mask.any():
                    continue
                tensors[name + MASK_SUFFIX] = pack_mask(mask).cpu()
                tensors[name + VALUES_SUFFIX] = merged.reshape(-1)[mask.reshape(-1)].cpu()
                shapes[name], kept[name] = list(shape), int(mask.sum())
            report.append(MergedTensor(name, "whole tensor"))
        settings: dict[str, Any] = (
            {"values": True, "shapes": shapes, "kept": kept} if self.kind is PatchKind.mask else {}
        )
        names = [t.name for t in report]
        targets = sorted({n.rpartition(".")[0] for n in names}) if self.kind is PatchKind.layernorm else sorted(names)
        return _Merged(tensors, targets, settings, report)


_MERGERS: dict[PatchKind, Any] = {
    PatchKind.lora: _LoraMerger,
    PatchKind.layernorm: _WholeMerger,
    PatchKind.delta: _WholeMerger,
    PatchKind.mask: _WholeMerger,
}
