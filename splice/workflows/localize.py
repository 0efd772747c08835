"""`splice patch extract --kind mask --localize`: a fine-tune's skill region learned on a live model (Panigrahi et
al., ICML 2023) and kept as an ordinary mask patch (a sparse delta) that every command reads.

The pretrained model is built live once; the grafted model's loss is `torch.func.functional_call` of it with the
eligible tensors replaced by theta_pre + gamma * (theta_ft - theta_pre), over the task's training batch in chunks.
Eligible: the float tensors inside the model's layers that the fine-tune changed (embeddings and head are fixed, as
the paper's scripts fix them). A classification fine-tune's head is new to the task: every graft carries the
fine-tune's changed head whole (as the layernorm kind does), unless `head="pretrained"`. The patch records, on the
data's test split, the accuracy and calibration error (ECE) of the fine-tune, the learned graft, the magnitude graft
of the same size and the pretrained model.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch.func import functional_call
from typing_extensions import Unpack

from splice.adapters.deltas import deltas, left_out_warnings
from splice.adapters.fingerprint import fingerprint_base
from splice.adapters.kinds.mask import ModelTopK, sparse_entry
from splice.adapters.localize import (
    STEP,
    STEPS,
    Candidates,
    GraftLoss,
    LearnedMask,
    check_learning,
    graft_on,
    learn_graft_mask,
)
from splice.adapters.meta import PatchKind, PatchMeta
from splice.adapters.patch import Patch
from splice.arch.heads import stored_head
from splice.arch.layers import layer_index
from splice.arch.names import stored_to_module_names
from splice.continual.data import Batch, TaskData, batches, check_labels_fit, check_task_data
from splice.continual.train import inputs_of, model_inputs
from splice.errors import PatchError, SpliceError
from splice.hooks import hook_name, load_callable
from splice.merge.stats.collect import live_model
from splice.options import RunKeywords, RunOptions, run_options
from splice.sparsify import top_k_over
from splice.tensors.checkpoint import Checkpoint, recorded_location
from splice.tensors.device import resolve_device
from splice.tensors.stream import check_same_tensors
from splice.tensors.writer import ensure_output_free

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CANDIDATES = 100.0  # the candidate entries, in multiples of the region's size
CHUNK = 32  # examples per forward pass (a fine-tune's usual batch: its activations bound the peak)
ECE_BINS = 15
HEADS = ("fine-tuned", "pretrained")
Head = Literal["fine-tuned", "pretrained"]
TaskSource = str | Callable[[], object] | Mapping[str, object]
"""'MODULE:FUNCTION' (or a function) returning {'train': batch, 'test': batch}, or that dict itself."""
ModelSource = str | os.PathLike | Checkpoint
"""A model directory or URL, or a checkpoint already opened (a recipe's reference, an adapter applied on the fly)."""


@dataclass(frozen=True)
class Scores:
    """A model's accuracy on the test split, and its expected calibration error (ECE_BINS equal-width bins)."""

    accuracy: float
    ece: float


SCORED = ("fine_tuned", "learned_graft", "magnitude_graft", "pretrained")


@dataclass
class Localization:
    """The localized patch, how each model scored, and how the region was learned."""

    patch: Patch
    scores: dict[str, Scores]  # SCORED -> scores on the test split
    losses: list[float]  # the rounded graft's training loss at the start (magnitude mask) and after each step
    best_step: int
    eligible: int  # entries the region could lie in
    selected: int  # entries in the region
    parameters: int  # of the whole model
    carried: list[str]  # head tensors every graft takes whole
    seconds: float
    warnings: list[str]
    out: Path | None = None


def localize(
    base: ModelSource,
    tuned: ModelSource,
    data: TaskSource,
    *,
    density: float,
    steps: int = STEPS,
    lr: float = STEP,
    l1: float = 0.0,
    seed: int = 0,
    candidates: float | None = CANDIDATES,
    head: Head = "fine-tuned",
    description: str = "",
    out: str | os.PathLike | None = None,
    run: RunOptions | None = None,
    **run_keywords: Unpack[RunKeywords],
) -> Localization:
    """Learn the region of `density` of the eligible entries whose graft onto `base` keeps what `tuned` learned on
    `data`'s training split (each model a directory or URL, or a checkpoint already opened), score it on the test
    split, and return it as a mask patch (saved at `out`, under the output rule, when given). `steps`, `lr` and `l1`
    drive the learning (splice.adapters.localize); it runs among the `candidates` x (the region's size) eligible
    entries the fine-tune changed most (None or 0: among all of them), which bounds its memory. `head` says whether
    grafts carry the fine-tune's changed classification head ("fine-tuned") or keep the pretrained one. `run` (or
    its fields as keywords: device, force, progress, ...) says how it runs."""
    run = run_options(run, run_keywords, "localize")
    _check_settings(density, steps, lr, l1, candidates, head)
    candidates = candidates or None  # 0: every changed entry, as None
    if out is not None:
        ensure_output_free(out, run.force, protected=[_location(base), _location(tuned)])
    base_ckpt = _opened(base, run.storage_options)
    tuned_ckpt = _opened(tuned, run.storage_options)
    check_same_tensors([base_ckpt, tuned_ckpt])
    task, where = _task(data)
    device = resolve_device(run.device)
    started = time.perf_counter()
    model = live_model(base_ckpt, device)
    model.requires_grad_(False)
    check_labels_fit(task, cast("PreTrainedModel", model).config.num_labels or 0, where)
    names = stored_to_module_names(model)
    live = dict(model.state_dict(keep_vars=True))
    pretrained = {stored: live[module].detach() for stored, module in names.items()}
    found = _changes(base_ckpt, tuned_ckpt, set(pretrained), density, candidates, head, device, run)
    train, test = _on(task.train, device), _on(task.test, device)
    fixed = {name: pretrained[name] + delta for name, delta in found.carried.items()}
    eligible = {name: pretrained[name] for name in found.candidates}
    scores = {"pretrained": _scored(model, names, {}, test)}  # first: the test split checked before any learning
    loss = grafted_loss(model, names, train, fixed)
    learned = learn_graft_mask(eligible, found.candidates, loss, density=density, steps=steps, lr=lr, l1=l1, seed=seed)
    magnitude = top_k_over({name: c.change.abs() for name, c in found.candidates.items()}, learned.selected)
    scores |= {
        "learned_graft": _scored(
            model, names, {**fixed, **graft_on(eligible, found.candidates, learned.on_candidates)}, test
        ),
        "magnitude_graft": _scored(model, names, {**fixed, **graft_on(eligible, found.candidates, magnitude)}, test),
        "fine_tuned": _scored(model, names, _tuned_values(tuned_ckpt, found.changed, device), test),
    }
    seconds = time.perf_counter() - started
    how = {"density": density, "steps": steps, "lr": lr, "l1": l1, "seed": seed, "candidates": candidates, "head": head}
    patch = _patch(base_ckpt, tuned_ckpt, data, learned, found, scores, how, description, run)
    warnings = left_out_warnings(
        found.left_out,
        "localized patch",
        "since grafts change only the layers' tensors (and the head, unless `head='pretrained'`)",
        "the scores of the fine-tune include them, the grafts' do not",
    )
    outcome = Localization(
        patch,
        {name: scores[name] for name in SCORED},
        learned.losses,
        learned.best_step,
        found.eligible,
        learned.selected,
        sum(info.numel for info in base_ckpt.tensors.values()),
        sorted(found.carried),
        seconds,
        warnings,
    )
    if out is not None:
        outcome.out = patch.save(out, force=run.force)
    return outcome


@dataclass
class _Found:
    """What the fine-tune changed, sorted for localizing: the eligible tensors' changes on their candidate entries,
    the head's changes carried whole, the other changed tensors left out (name -> why), and how many entries the
    changed eligible tensors hold."""

    candidates: dict[str, Candidates]
    carried: dict[str, torch.Tensor]
    left_out: dict[str, str]
    eligible: int

    @property
    def changed(self) -> list[str]:
        return [*self.candidates, *self.carried, *self.left_out]


def _changes(
    base: Checkpoint,
    tuned: Checkpoint,
    live: set[str],
    density: float,
    candidates: float | None,
    head: Head,
    device: torch.device,
    run: RunOptions,
) -> _Found:
    """Reads the fine-tune's change tensor by tensor; with a bounded candidate set, once before to find the
    model-wide threshold of the candidates' |change| (splice.adapters.kinds.mask.ModelTopK)."""
    heads = set(stored_head(tuned))

    def is_eligible(name: str) -> bool:
        return name not in heads and layer_index(name) is not None and name in live

    entries = sum(info.numel for name, info in base.tensors.items() if is_eligible(name))
    wanted = None if candidates is None else math.ceil(candidates * density * entries)
    top = (
        ModelTopK.find(base, tuned, wanted, device, run.progress, is_eligible) if wanted and wanted < entries else None
    )
    found = _Found({}, {}, {}, 0)
    for name, delta in deltas(base, tuned, device, run.progress):
        if name in heads:
            if head == "fine-tuned":
                found.carried[name] = delta
            else:
                found.left_out[name] = "head"
        elif is_eligible(name):
            found.candidates[name] = (
                Candidates.every(delta) if top is None else Candidates.where(delta, top.select(delta))
            )
            found.eligible += delta.numel()
        else:
            found.left_out[name] = "outside the layers"
    if not found.candidates:
        raise PatchError(f"{tuned.location} changed nothing inside the model's layers: there is no region to find")
    return found


def _opened(model: ModelSource, storage_options: dict | None) -> Checkpoint:
    return model if isinstance(model, Checkpoint) else Checkpoint.open(model, storage_options)


def _location(model: ModelSource) -> str | os.PathLike:
    return model.location if isinstance(model, Checkpoint) else model


def _check_settings(density: float, steps: int, lr: float, l1: float, candidates: float | None, head: str) -> None:
    check_learning(density, steps, lr, l1)
    if candidates is not None and not (candidates >= 1 or candidates == 0):
        raise PatchError(
            f"`candidates` must be >= 1 (times the region's size), or 0 for every changed entry, got {candidates:g}"
        )
    if head not in HEADS:
        raise PatchError(f"`head` must be one of {', '.join(HEADS)}, not {head!r}")


def _task(data: TaskSource) -> tuple[TaskData, str]:
    """The task's data, checked, and how messages name where it came from."""
    where = hook_name(data, "`data`") if not isinstance(data, Mapping) else "`data`"
    if isinstance(data, str):
        data = load_callable(data, option="`data`")
    return check_task_data(data() if callable(data) else data, "localize", where), where


def _on(batch: Batch, device: torch.device) -> Batch:
    return {key: value.to(device) for key, value in batch.items()}


def grafted_loss(
    model: torch.nn.Module, names: Mapping[str, str], batch: Batch, fixed: Mapping[str, torch.Tensor]
) -> GraftLoss:
    """The model's own loss on `batch` (with its `labels`), the mean over its examples, in one part per CHUNK of
    them, with the given stored tensors and the `fixed` ones (the carried head) in place of the pretrained ones."""
    count = len(batch["labels"])

    def loss(parameters: dict[str, torch.Tensor]) -> Iterator[torch.Tensor]:
        replaced = {names[name]: tensor for name, tensor in {**fixed, **parameters}.items()}
        for part in batches(batch, CHUNK):
            with model_inputs("`data`"):
                mean = functional_call(model, replaced, kwargs=part).loss
            yield mean * (len(part["labels"]) / count)

    return loss


def logits_of(
    model: torch.nn.Module, names: Mapping[str, str], replaced: Mapping[str, torch.Tensor], batch: Batch
) -> torch.Tensor:
    """The model's logits [examples, classes] on `batch`'s inputs, with the `replaced` stored tensors."""
    live = {names[name]: tensor for name, tensor in replaced.items()}
    with torch.no_grad(), model_inputs("`data`"):
        logits = torch.cat(
            [functional_call(model, live, kwargs=inputs_of(part)).logits for part in batches(batch, CHUNK)]
        )
    if logits.dim() != 2:
        raise SpliceError(
            f"localizing scores each example's class: {type(model).__name__} gives logits of shape "
            f"{list(logits.shape)}, not [examples, classes] (use a sequence or image classification model)"
        )
    return logits


def calibration(logits: torch.Tensor, labels: torch.Tensor) -> Scores:
    """Accuracy, and the expected calibration error: over ECE_BINS equal-width bins of the top class's probability,
    the examples' share in the bin times |mean confidence - accuracy| in it, summed."""
    confidence, predicted = logits.float().softmax(-1).max(-1)
    correct = predicted.eq(labels.to(predicted.device)).float()
    bins = torch.clamp((confidence * ECE_BINS).ceil().long() - 1, 0, ECE_BINS - 1)
    ece = 0.0
    for index in bins.unique():
        inside = bins.eq(index)
        ece += float(inside.float().mean()) * abs(float(confidence[inside].mean() - correct[inside].mean()))
    return Scores(float(correct.mean()), ece)


def _scored(
    model: torch.nn.Module, names: Mapping[str, str], replaced: Mapping[str, torch.Tensor], batch: Batch
) -> Scores:
    return calibration(logits_of(model, names, replaced, batch), batch["labels"])


def _tuned_values(tuned: Checkpoint, names: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """The fine-tune's own values of the tensors it changed (the fine-tune is scored whole)."""
    return {name: tuned.read(name).to(device=device, dtype=torch.float32) for name in names}


def _patch(
    base: Checkpoint,
    tuned: Checkpoint,
    data: TaskSource,
    learned: LearnedMask,
    found: _Found,
    scores: Mapping[str, Scores],
    how: dict[str, Any],
    description: str,
    run: RunOptions,
) -> Patch:
    """The region (and the carried head, whole) as a mask patch: mask bits and the change's values on them."""
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    kept: dict[str, int] = {}
    for name, candidates in found.candidates.items():
        selected = learned.on_candidates[name]
        if selected.any():
            tensors.update(sparse_entry(name, learned.masks[name], candidates.change[selected]))
            shapes[name], kept[name] = list(candidates.shape), int(selected.sum())
    for name, delta in found.carried.items():
        tensors.update(sparse_entry(name, torch.ones_like(delta, dtype=torch.bool), delta.reshape(-1)))
        shapes[name], kept[name] = list(delta.shape), delta.numel()
    described = data if isinstance(data, str) else hook_name(data, "`data`") if callable(data) else "a given batch"
    settings: dict[str, Any] = {
        "density": how["density"],
        "scope": "model",
        "values": True,
        "shapes": shapes,
        "kept": kept,
        "localized": {
            **how,
            "data": described,
            "eligible": found.eligible,
            "selected": learned.selected,
            "carried": sorted(found.carried),
            "losses": learned.losses,
            "best_step": learned.best_step,
        },
    }
    metrics = {f"{model}_{what}": getattr(scores[model], what) for model in SCORED for what in ("accuracy", "ece")}
    touched = sorted(shapes)
    meta = PatchMeta(
        kind=PatchKind.mask,
        targets=touched,
        base=fingerprint_base(base, touched, run.progress),
        lineage=[recorded_location(base.location), recorded_location(tuned.location)],
        metrics=metrics,
        description=description or f"skill region of {recorded_location(tuned.location)} localized on {described}",
        settings=settings,
    )
    return Patch(tensors, meta)
