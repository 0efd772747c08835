"""How `merge_patches` merges each kind: per base tensor, every patch's change, the method over them, and what the
merged patch stores (LoRA factors, or whole tensors). See `splice.workflows.patch_merge` for the math."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from splice.adapters.fingerprint import first_names
from splice.adapters.kinds.lora import (
    SUFFIX_A,
    SUFFIX_B,
    balanced_factors,
    lora_modules,
    module_scale,
    product_svd,
    truncated_svd,
)
from splice.adapters.kinds.mask import MASK_SUFFIX, VALUES_SUFFIX, pack_mask, unpack_mask
from splice.adapters.meta import PatchKind
from splice.adapters.patch import Patch
from splice.errors import PatchError
from splice.merge.task_vectors import TaskVectorMerge
from splice.tensors.checkpoint import Checkpoint

Advance = Callable[[int, int], None]  # progress: (items, bytes) done


@dataclass(frozen=True)
class MergedTensor:
    """One base tensor the merged patch changes, and how its change was made."""

    name: str
    how: str  # "concatenated", "qr + core svd", "full svd", "randomized svd" (LoRA); "whole tensor"
    rank: int | None = None  # LoRA: the rank kept
    captured_energy: float | None = None  # LoRA: the share of the merged change's squared Frobenius norm kept


@dataclass
class Merged:
    """What a merger made: the merged patch's tensors, targets and kind settings, and a line per tensor."""

    tensors: dict[str, torch.Tensor]
    targets: list[str]
    settings: dict[str, Any]
    report: list[MergedTensor]
    warnings: list[str] = field(default_factory=list)


class Merger(Protocol):
    def names(self) -> list[str]:
        """The base tensors the patches change, in the order they are merged."""
        ...

    def merge(self, merge: TaskVectorMerge, rank: int | None, energy: float | None, advance: Advance) -> Merged: ...


def merger(
    kind: PatchKind, patches: list[Patch], labels: list[str], base: Checkpoint | None, device: torch.device
) -> Merger:
    """The merger of `kind` for `patches` (named by `labels` in messages), its inputs checked: shapes agree."""
    if kind is PatchKind.lora:
        return LoraMerger(patches, labels, device)
    return WholeMerger(kind, patches, labels, base, device)


class LoraMerger:
    """Per matrix: the inputs' factors, merged by concatenation, by re-factoring the product, or through the
    method on the formed changes and a truncated SVD."""

    def __init__(self, patches: list[Patch], labels: list[str], device: torch.device):
        self.patches, self.device = patches, device
        self.modules: dict[str, list[tuple[int, float]]] = {}  # module -> (input index, scale) of the inputs with it
        self.shapes: dict[str, tuple[int, int]] = {}
        for index, (patch, label) in enumerate(zip(patches, labels)):
            replaced = patch.meta.settings.get("replaced") or []
            if replaced:
                raise PatchError(
                    f"{label} replaces whole tensors ({first_names(list(replaced))}: PEFT's modules_to_save or "
                    f"trained biases), which a LoRA merge does not carry; merge it with peft (merge_and_unload), "
                    f"extract a delta patch and merge delta patches"
                )
            shapes = patch.shapes
            for module in lora_modules(patch):
                scale = module_scale(patch, module)
                shape = (shapes[module + SUFFIX_B][0], shapes[module + SUFFIX_A][1])
                known = self.shapes.setdefault(module, shape)
                if known != shape:
                    raise PatchError(
                        f"{label} changes {module}.weight as shape {list(shape)}, an earlier patch as "
                        f"{list(known)}: they were not made for one base"
                    )
                self.modules.setdefault(module, []).append((index, scale))

    def names(self) -> list[str]:
        return [f"{module}.weight" for module in self.modules]

    def _factors(self, index: int, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = self.patches[index].tensors
        a = tensors[module + SUFFIX_A].to(device=self.device, dtype=torch.float32)
        b = tensors[module + SUFFIX_B].to(device=self.device, dtype=torch.float32)
        return a, b

    def merge(self, merge: TaskVectorMerge, rank: int | None, energy: float | None, advance: Advance) -> Merged:
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
        return Merged(tensors, [t.name[: -len(".weight")] for t in report], settings, report, warnings)

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
        changes = [torch.zeros(rows, cols, device=self.device) for _ in self.patches]
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


class WholeMerger:
    """Per base tensor: every input's change as a whole tensor (zeros where an input leaves it alone), merged."""

    def __init__(
        self, kind: PatchKind, patches: list[Patch], labels: list[str], base: Checkpoint | None, device: torch.device
    ):
        self.kind, self.patches, self.labels, self.base, self.device = kind, patches, labels, base, device
        self.targets: dict[str, tuple[int, ...]] = {}
        self.present: dict[str, list[int]] = {}
        for index, (patch, label) in enumerate(zip(patches, labels)):
            for name, shape in self._changes_of(patch, label).items():
                known = self.targets.setdefault(name, shape)
                if known != shape:
                    raise PatchError(
                        f"{label} changes {name} as shape {list(shape)}, an earlier patch as {list(known)}: "
                        f"they were not made for one base"
                    )
                self.present.setdefault(name, []).append(index)
        if self.base is not None:
            for name, shape in self.targets.items():
                info = self.base.tensors.get(name)
                if info is None or tuple(info.shape) != tuple(shape):
                    found = "has no such tensor" if info is None else f"has it as {list(info.shape)}"
                    raise PatchError(
                        f"the patches change {name} as shape {list(shape)}; the base {self.base.location} {found}"
                    )

    def _changes_of(self, patch: Patch, label: str) -> dict[str, tuple[int, ...]]:
        """The base tensors a patch changes, with their shapes."""
        if self.kind is not PatchKind.mask:
            return {name: tuple(shape) for name, shape in patch.shapes.items()}
        listed = patch.meta.settings.get("shapes")
        if not isinstance(listed, dict):
            raise PatchError(f"{label}: the mask patch's settings have no tensor shapes; it was not written by splice")
        bare = [name for name in listed if name + VALUES_SUFFIX not in patch.shapes]
        if bare:
            raise PatchError(
                f"{label} is a bare mask (no values on {first_names(bare)}): it prunes rather than adds a "
                f"change, so it does not merge; merge sparse deltas (extracted with `mask_values=True`)"
            )
        return {name: tuple(shape) for name, shape in listed.items()}

    def names(self) -> list[str]:
        return list(self.targets)

    def _change(self, index: int, name: str, shape: tuple[int, ...], base: torch.Tensor | None) -> torch.Tensor:
        """Patch `index`'s change of `name` (`base`: the base's value, for a layernorm patch's replacement)."""
        patch = self.patches[index]
        if self.kind is PatchKind.mask:
            change = torch.zeros(shape, device=self.device).reshape(-1)
            mask = unpack_mask(patch.tensors[name + MASK_SUFFIX].to(self.device), shape).reshape(-1)
            values = patch.tensors[name + VALUES_SUFFIX].to(device=self.device, dtype=torch.float32)
            if values.numel() != int(mask.sum()):
                raise PatchError(
                    f"{self.labels[index]}: {name}: the mask selects {int(mask.sum())} entries but the patch "
                    f"holds {values.numel()} values"
                )
            change[mask] = values
            return change.reshape(shape)
        value = patch.tensors[name].to(device=self.device, dtype=torch.float32)
        return value if base is None else value - base

    def merge(self, merge: TaskVectorMerge, rank: int | None, energy: float | None, advance: Advance) -> Merged:
        tensors: dict[str, torch.Tensor] = {}
        report: list[MergedTensor] = []
        shapes: dict[str, list[int]] = {}
        kept: dict[str, int] = {}
        for name, shape in self.targets.items():
            base = None
            if self.kind is PatchKind.layernorm:
                assert self.base is not None  # merge_patches refuses layernorm patches without a base
                base = self.base.read(name).to(device=self.device, dtype=torch.float32)
            changes = [torch.zeros(shape, device=self.device) for _ in self.patches]
            for index in self.present[name]:
                changes[index] = self._change(index, name, shape, base)
            merged = merge.merged(name, changes)
            advance(1, 0)
            if base is not None:
                tensors[name] = (base + merged).cpu()
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
        return Merged(tensors, targets, settings, report)
