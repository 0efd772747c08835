"""Localize-and-Stitch (He et al., 2024): each fine-tune's change kept on its task's region only, the regions stitched
into one model on the stream. With tau_i = theta_i - theta_pre and gamma_i task i's region (a boolean mask per
tensor; a tensor the region does not cover: all zeros),

    count = sum_i gamma_i,    merged = theta_pre + sum_i gamma_i * tau_i / max(count, 1)

so an entry one region covers takes that task's change, an entry several regions cover the mean of their changes (the
paper's stitching divides each mask by the number of masks covering the entry), an entry no region covers keeps the
pretrained value. The method has no parameters and no model weights.

Each task's region is a `TaskRegion` that the caller opened (the workflows layer: a mask patch checked against the
base): its masks held bit-packed in memory (one bit per entry) and unpacked one tensor at a time in the kernel, into
the indices of the entries they select, so the rule is computed on the covered entries only and every other entry is
the base's as stored. A sparse delta's values are read on the stream beside their tensor and must equal the model's
own change on the mask (in fp32, as extraction computes it), else the patch was taken from another fine-tune. A
fine-tune is read only for the tensors its region covers; a tensor no region covers is the base's, copied as stored.
The kernel counts what the report gives: each region's size and the entries only it covers, the pairwise overlaps
(Jaccard over all tensors together) and which tensors the regions fall in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from math import prod

import torch

from splice.errors import RecipeError
from splice.sparsify import mask_indices
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.stream import Kernel, StreamItem

METHOD = "localize_stitch"


@dataclass(frozen=True)
class TaskRegion:
    """One task's region as the stitch reads it. `masks`: each tensor the region covers -> its bits packed eight to
    a byte (`splice.sparsify.pack_mask`), held in memory; `shapes`: each one's shape. `values`: for a sparse delta,
    where each tensor's change on the mask is stored (tensor -> (checkpoint, stored name): the selected entries in
    index order), read on the stream and checked; none for a bare mask. `label` names it in messages. `carried`: the
    tensors the region takes whole though they are no part of what was localized (a learned region's classification
    head): stitched like the rest, but left out of the overlaps and shares the report gives, and counted apart."""

    label: str
    masks: Mapping[str, torch.Tensor]
    shapes: Mapping[str, tuple[int, ...]]
    values: Mapping[str, tuple[Checkpoint, str]] = field(default_factory=dict)
    carried: frozenset[str] = frozenset()


@dataclass(frozen=True)
class TaskShare:
    """One task's region: its size and the entries no other region covers (kept as the task's own change), and the
    entries of the tensors it carries whole (not counted in the others)."""

    model: str
    mask: str
    entries: int
    unshared: int
    carried: int = 0

    @property
    def unshared_share(self) -> float | None:
        """The share of the region no other region covers (None: an empty region)."""
        return self.unshared / self.entries if self.entries else None


@dataclass(frozen=True)
class RegionOverlap:
    """Two tasks' regions over all tensors together: the entries both cover, and their Jaccard index."""

    first: str
    second: str
    shared: int
    union: int

    @property
    def jaccard(self) -> float | None:
        """|A and B| / |A or B| (None: both regions empty)."""
        return self.shared / self.union if self.union else None


@dataclass(frozen=True)
class TensorRegions:
    """Where the regions fall in one tensor: each task's entries in it (in the recipe's order), and how many of its
    entries two or more regions cover."""

    name: str
    entries: tuple[int, ...]
    shared: int


@dataclass(frozen=True)
class StitchReport:
    """What a Localize-and-Stitch merge stitched: each task's region, every pair's overlap, the entries some region
    covers and those two or more cover (averaged), out of the model's `parameters` float entries, and the tensors the
    regions fall in (in storage order)."""

    method: str
    parameters: int
    tasks: tuple[TaskShare, ...]
    overlaps: tuple[RegionOverlap, ...]
    covered: int
    shared: int
    tensors: tuple[TensorRegions, ...]


class _Tally:
    """The counts the kernel adds up as it stitches, tensor by tensor."""

    def __init__(self, tasks: int):
        self.entries = [0] * tasks
        self.unshared = [0] * tasks
        self.carried = [0] * tasks
        self.pairs = {pair: 0 for pair in combinations(range(tasks), 2)}
        self.covered = 0
        self.shared = 0
        self.tensors: dict[str, TensorRegions] = {}

    def add(
        self, name: str, tasks: Sequence[int], selected: Sequence[torch.Tensor], alone: Sequence[int], covered: int
    ) -> None:
        """One tensor's regions: each task's selected entries (sorted indices), how many of them no other region
        covers, and how many entries some region covers."""
        entries = [0] * len(self.entries)
        for task, where, unshared in zip(tasks, selected, alone):
            entries[task] = where.numel()
            self.entries[task] += where.numel()
            self.unshared[task] += unshared
        for (i, first), (j, second) in combinations(zip(tasks, selected), 2):
            self.pairs[(i, j)] += int(torch.isin(first, second, assume_unique=True).sum())
        shared = covered - sum(alone)  # an entry one region covers is that region's alone
        self.covered += covered
        self.shared += shared
        self.tensors[name] = TensorRegions(name, tuple(entries), shared)


@dataclass(frozen=True)
class _Layout:
    """Which regions cover one tensor (their task indices, in order) and which of them give values to check."""

    tasks: tuple[int, ...]
    valued: frozenset[int]


@dataclass(frozen=True)
class StitchPlan:
    plan: list[StreamItem]
    kernel: Kernel
    models: tuple[str, ...]
    regions: tuple[TaskRegion, ...]
    parameters: int
    order: tuple[str, ...]  # the output tensors in plan order
    tally: _Tally

    def report(self) -> StitchReport:
        """The merge's report, once the kernel has run over the plan."""
        tally = self.tally
        tasks = tuple(
            TaskShare(model, region.label, entries, unshared, carried)
            for model, region, entries, unshared, carried in zip(
                self.models, self.regions, tally.entries, tally.unshared, tally.carried
            )
        )
        overlaps = tuple(
            RegionOverlap(self.models[i], self.models[j], shared, tally.entries[i] + tally.entries[j] - shared)
            for (i, j), shared in tally.pairs.items()
        )
        tensors = tuple(tally.tensors[name] for name in self.order if name in tally.tensors)
        return StitchReport(METHOD, self.parameters, tasks, overlaps, tally.covered, tally.shared, tensors)


def plan_stitch(
    plan: Sequence[StreamItem],
    base_index: int,
    merged: Sequence[int],
    regions: Sequence[TaskRegion],
    models: Sequence[str],
) -> StitchPlan:
    """The stitch of `plan` (output tensors from the same-name inputs, every float tensor's sources all the inputs in
    order): `regions[k]` is the region of input `merged[k]` (named `models[k]`), `base_index` the pretrained model.
    Each tensor's sources become the base, then the fine-tunes whose regions cover it, then their stored values; a
    tensor no region covers is the base's alone. Every region is checked against the model's tensors (each covered
    tensor a float tensor of that shape, its packed mask of the right size) before any tensor is read."""
    floats = {item.output.name: item for item in plan if item.output.dtype.is_floating_point}
    for region in regions:
        _check_region(region, floats)
    items, layouts, verbatim = [], {}, []
    for item in plan:
        name = item.output.name
        if name not in floats:
            items.append(item)
            continue
        tasks = tuple(k for k, region in enumerate(regions) if name in region.masks)
        base = item.sources[base_index]
        if not tasks:
            items.append(StreamItem(item.output, (base,)))
            if base[0].tensors[name].dtype == item.output.dtype:
                verbatim.append(name)
            continue
        valued = tuple(k for k in tasks if name in regions[k].values)
        sources = (base, *(item.sources[merged[k]] for k in tasks), *(regions[k].values[name] for k in valued))
        items.append(StreamItem(item.output, sources))
        layouts[name] = _Layout(tasks, frozenset(valued))
    tally = _Tally(len(regions))
    kernel = _kernel(layouts, regions, models, tally, frozenset(verbatim))
    parameters = sum(prod(item.output.shape) for item in floats.values())
    order = tuple(item.output.name for item in plan)
    return StitchPlan(items, kernel, tuple(models), tuple(regions), parameters, order, tally)


def _check_region(region: TaskRegion, floats: Mapping[str, StreamItem]) -> None:
    for name, packed in region.masks.items():
        shape = tuple(region.shapes.get(name, ()))
        item = floats.get(name)
        if item is None:
            raise RecipeError(
                f"{METHOD}: {region.label} covers {name}, which is not a float tensor of the models; was the mask "
                "made on another model?"
            )
        if shape != tuple(item.output.shape):
            raise RecipeError(
                f"{METHOD}: {region.label} covers {name} as {list(shape)}, but the models' {name} is "
                f"{list(item.output.shape)}; was the mask made on another model?"
            )
        if packed.dtype != torch.uint8 or packed.numel() != -(-prod(shape) // 8):
            raise RecipeError(
                f"{METHOD}: {region.label}: the packed mask of {name} holds {packed.numel()} "
                f"{packed.dtype} entries, not the {-(-prod(shape) // 8)} bytes of a {list(shape)} mask"
            )


def _kernel(
    layouts: Mapping[str, _Layout],
    regions: Sequence[TaskRegion],
    models: Sequence[str],
    tally: _Tally,
    verbatim: frozenset[str],
) -> Kernel:
    def stitch(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        layout = layouts.get(name)
        base = tensors[0]
        if layout is None:  # no region covers it: the pretrained tensor
            return base
        before = base.reshape(-1)
        values = iter(tensors[1 + len(layout.tasks) :])
        selected, changes = [], []
        for task, tuned in zip(layout.tasks, tensors[1:]):
            where = mask_indices(regions[task].masks[name].to(base.device), tuple(base.shape))
            after = tuned.reshape(-1)[where]
            change = after - before[where]
            if task in layout.valued:
                _check_values(name, regions[task].label, models[task], after, before[where], change, next(values))
            selected.append(where)
            changes.append(change)
        # the rule on the entries some region covers, tasks summed in order; every other entry is the base's
        covered, places, count = _cover(selected)
        total = torch.zeros(covered.numel(), dtype=base.dtype, device=base.device)
        for at, change in zip(places, changes):
            total[at] += change
        _count(tally, name, layout.tasks, selected, regions)
        stitched = before.clone()
        stitched[covered] = before[covered] + total / count
        return stitched.reshape(base.shape)

    return Kernel(stitch, passes_through=verbatim)


def _cover(selected: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """The entries some region covers (sorted indices), where each region's entries sit among them, and how many
    regions cover each."""
    covered = torch.unique(torch.cat(list(selected)))
    places = [torch.searchsorted(covered, where) for where in selected]
    count = torch.zeros(covered.numel(), dtype=torch.int32, device=covered.device)
    for at in places:
        count[at] += 1
    return covered, places, count


def _count(
    tally: _Tally, name: str, tasks: Sequence[int], selected: Sequence[torch.Tensor], regions: Sequence[TaskRegion]
) -> None:
    """One tensor's regions into the report: a region carrying the tensor whole counts apart, the others' overlaps
    and shares among themselves."""
    counted = [(task, where) for task, where in zip(tasks, selected) if name not in regions[task].carried]
    for task, where in zip(tasks, selected):
        if name in regions[task].carried:
            tally.carried[task] += where.numel()
    if not counted:
        return
    covered, places, count = _cover([where for _, where in counted])
    alone = [int(count[at].eq(1).sum()) for at in places]
    tally.add(name, [task for task, _ in counted], [where for _, where in counted], alone, covered.numel())


def _check_values(
    name: str,
    label: str,
    model: str,
    after: torch.Tensor,
    before: torch.Tensor,
    change: torch.Tensor,
    values: torch.Tensor,
) -> None:
    """A sparse delta's values must be the model's change on its mask (`after` - `before` there), computed as
    extraction computes it (the fp32 difference of the two read in fp32): exactly equal, or the patch came from
    another fine-tune."""
    if change.dtype != torch.float32:
        change = after.float() - before.float()
    if values.numel() != change.numel():
        raise RecipeError(
            f"{METHOD}: {label}: the mask of {name} selects {change.numel()} entries but the patch holds "
            f"{values.numel()} values; the patch is damaged: extract it again"
        )
    differ = int(change.ne(values.reshape(-1).float()).sum())
    if differ:
        raise RecipeError(
            f"{METHOD}: {label}: its values for {name} are not {model}'s change (they differ at {differ} of "
            f"{change.numel()} entries); was it extracted from another fine-tune? extract it from {model}, or give "
            "a bare mask (a mask patch without values)"
        )
