"""`splice stats collect`: a model's statistics on the user's data (input Gram matrices for RegMean, the diagonal
Fisher for Fisher merging), collected in one pass through the live model and kept as a statistics artifact: a patch
directory of kind `stats`, fingerprinted against the model, written with the output rule or pushed to the registry."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import torch
from typing_extensions import Unpack

from splice.adapters.fingerprint import compare_base, fingerprint_base
from splice.adapters.kinds.stats import COLLECT
from splice.adapters.meta import PatchKind, PatchMeta, Statistic, StatsSettings
from splice.adapters.patch import Patch, StoredTensors
from splice.errors import SpliceError
from splice.hooks import hook_name, load_callable
from splice.merge.fusion.activations import DataSource, load_inputs
from splice.merge.stats.collect import Labels, Loss, check_labels, collect_fisher, collect_grams, live_model
from splice.merge.stats.datamerge import StoredStats
from splice.options import RunKeywords, RunOptions, run_options
from splice.progress import Progress
from splice.registry.manifest import PushStats, VersionManifest
from splice.registry.store import Registry, open_registry
from splice.tensors.checkpoint import Checkpoint, recorded_location
from splice.tensors.device import resolve_device
from splice.tensors.digest import checkpoint_digest
from splice.tensors.safetensors import SAFETENSORS_DTYPES, TensorInfo
from splice.tensors.views import MappedCheckpoint
from splice.tensors.writer import ensure_output_free
from splice.workflows.port import is_registry_ref

STATISTICS: tuple[Statistic, ...] = get_args(Statistic)


@dataclass
class StatsOutcome:
    """What `collect_stats` collected, where it went, and how long the pass through the model took."""

    patch: Patch
    seconds: float
    out: Path | None = None
    pushed: VersionManifest | None = None
    push_stats: PushStats | None = None
    nbytes: int = 0  # of the stored tensors


def collect_stats(
    model: str | os.PathLike,
    data: DataSource,
    *,
    kind: Statistic,
    out: str | os.PathLike | None = None,
    push: str | None = None,
    alias: str | None = None,
    message: str = "",
    registry: Registry | str | None = None,
    samples: int | None = None,
    loss: str | Loss | None = None,
    labels: Labels = "sample",
    seed: int = 0,
    run: RunOptions | None = None,
    **run_keywords: Unpack[RunKeywords],
) -> StatsOutcome:
    """Collect `kind` statistics of the model stored at `model` on the inputs `data` gives (a batch, a function
    returning one, or 'MODULE:FUNCTION'; at most `samples` of them) and write them to `out` and/or push them as
    the next version of `push`. Everything is checked before the model is loaded.

    gram: X^T X of the inputs of every Linear (and GPT-2 Conv1D) layer, padding excluded, accumulated and stored in
      fp64; layers fed the same input share one matrix.
    fisher: the diagonal Fisher of every float parameter over per-example gradients; `labels="sample"` (default)
      draws each example's label from the model's own prediction (the Fisher proper, no labelled data needed),
      `labels="batch"` uses the batch's `labels`; `loss` (a function (outputs, labels) -> scalar, or
      MODULE:FUNCTION naming one) replaces the cross-entropy.
    `run` (or its fields as keywords: device, force, storage_options, ...) says how it runs."""
    run = run_options(run, run_keywords, "stats collect")
    if kind not in STATISTICS:
        raise SpliceError(f"unknown statistic `kind={kind!r}`: use gram (for regmean) or fisher (for fisher merges)")
    if out is None and push is None:
        raise SpliceError("say where the statistics go: `out=DIR` (a statistics directory) or `push=NAME` (a registry)")
    if samples is not None and samples < 1:
        raise SpliceError(f"`samples` must be at least 1, got {samples}")
    if kind == "gram" and (loss is not None or labels != "sample"):
        raise SpliceError("`loss` and `labels` are for `kind='fisher'`; Gram matrices need only the inputs")
    store = open_registry(registry, run.storage_options) if push is not None else None
    if store is not None and push is not None:
        store.check_push(push, alias)
    if out is not None:
        protected = [model, *([store.url] if store else [])]
        ensure_output_free(out, run.force, protected=protected, what="the model or the registry")
    loss_function = _loss(loss)
    device = resolve_device(run.device)
    checkpoint = Checkpoint.open(model, run.storage_options)
    inputs = load_inputs(data, samples, str(model))
    if kind == "fisher":
        check_labels(labels, inputs)
    started = time.perf_counter()
    network = live_model(checkpoint, device)
    if kind == "gram":
        tensors, settings = _grams(network, inputs, device, run.progress)
    else:
        tensors, settings = _fishers(network, inputs, loss_function, labels, seed, device, run.progress)
    seconds = time.perf_counter() - started
    del network
    described = data if isinstance(data, str) else hook_name(data, "`data`") if callable(data) else "a given batch"
    settings = StatsSettings(**settings, data=described, model_digest=checkpoint_digest(checkpoint)).model_dump(
        mode="json", exclude_defaults=True
    )
    targets = sorted(_belongs_to(tensors, settings))
    meta = PatchMeta(
        kind=PatchKind.stats,
        targets=targets,
        base=fingerprint_base(checkpoint, targets, run.progress),
        lineage=[f"{kind} statistics of {recorded_location(model)}"],
        description=f"{kind} statistics of {recorded_location(model)} on {described}",
        settings=settings,
    )
    patch = Patch(tensors, meta)
    outcome = StatsOutcome(patch, seconds, nbytes=sum(t.nbytes for t in tensors.values()))
    if out is not None:
        outcome.out = patch.save(out, force=run.force)
    if store is not None and push is not None:
        pushed = store.push(push, patch, alias=alias, message=message or meta.description)
        outcome.pushed, outcome.push_stats = pushed.manifest, pushed.stats
    return outcome


def _loss(loss: str | Loss | None) -> Loss | None:
    return load_callable(loss, option="`loss`") if isinstance(loss, str) else loss


def _grams(
    network: torch.nn.Module, inputs: Any, device: torch.device, progress: Progress | None
) -> tuple[dict[str, torch.Tensor], dict]:
    grams = collect_grams(network, inputs, device=device, progress=progress)
    shared = {weight: key for weight, key in grams.keys.items() if weight != key}
    settings = {
        "statistic": "gram",
        "samples": grams.samples,
        "tokens": grams.tokens,
        "shared": shared,
        "transposed": sorted(grams.transposed),
    }
    return {key: gram.cpu() for key, gram in grams.grams.items()}, settings


def _fishers(
    network: torch.nn.Module,
    inputs: Any,
    loss: Loss | None,
    labels: Labels,
    seed: int,
    device: torch.device,
    progress: Progress | None,
) -> tuple[dict[str, torch.Tensor], dict]:
    fisher = collect_fisher(network, inputs, loss=loss, labels=labels, seed=seed, device=device, progress=progress)
    settings = {"statistic": "fisher", "samples": fisher.samples, "labels": fisher.labels}
    return {name: diagonal.cpu() for name, diagonal in fisher.diagonals.items()}, settings


def _belongs_to(tensors: dict[str, torch.Tensor], settings: dict) -> set[str]:
    """The model tensors the statistics are of: every layer weight a Gram matrix serves, or every parameter."""
    return {*tensors, *settings.get("shared", {})}


def stored_patch(reference: str, storage_options: dict | None = None) -> tuple[Patch, Checkpoint, str]:
    """The patch a recipe names beside a model (a `stats:` or a `mask:`: a patch directory or URL, or a registry ref:
    name, name@3, name@prod; in `SPLICE_REGISTRY`, else the default registry), its tensors as a checkpoint the stream
    reads, and how messages name it."""
    if is_registry_ref(reference):
        store = open_registry(None, storage_options)
        version = store.resolve(reference)
        patch = store.load(version.ref)
        infos = {
            name: TensorInfo(name, SAFETENSORS_DTYPES[entry.dtype], tuple(entry.shape), version.ref)
            for name, entry in version.tensors.items()
        }
        return patch, MappedCheckpoint(f"{store.url} {version.ref}", patch.tensors, infos), version.ref
    patch = Patch.load(reference, storage_options)
    assert isinstance(patch.tensors, StoredTensors)
    return patch, patch.tensors.stored, reference


def open_statistics(
    reference: str,
    model: Checkpoint,
    statistic: str,
    storage_options: dict | None = None,
) -> StoredStats:
    """The statistics a recipe's `stats:` names (a statistics directory or URL, or a registry ref: name, name@3,
    name@prod; in `SPLICE_REGISTRY`, else the default registry), refused unless they are `statistic` statistics
    collected on `model` (checked by fingerprint)."""
    patch, stored, label = stored_patch(reference, storage_options)
    if patch.meta.kind is not PatchKind.stats:
        raise SpliceError(f"stats: {label} is a {patch.meta.kind.value} patch, not statistics; {COLLECT}")
    settings = StatsSettings.model_validate(patch.meta.settings)
    if settings.statistic != statistic:
        raise SpliceError(
            f"stats: {label} holds {settings.statistic} statistics; this merge needs {statistic} "
            f"(`splice stats collect ... --kind {statistic}`)"
        )
    if patch.meta.base is None:
        raise SpliceError(f"stats: {label} has no record of the model it was collected on; {COLLECT}")
    unchanged = settings.model_digest != "" and settings.model_digest == checkpoint_digest(model)
    differences = [] if unchanged else compare_base(patch.meta.base, model)
    if differences:
        more = f" and {len(differences) - 2} more differences" if len(differences) > 2 else ""
        raise SpliceError(
            f"stats: {label} were collected on another model than {model.location} "
            f"({'; '.join(map(str, differences[:2]))}{more}); collect statistics on this model"
        )
    return StoredStats(stored, statistic, label, settings.shared, frozenset(settings.transposed))


def statistics_locations(references: Sequence[str], storage_options: dict | None = None) -> list[str]:
    """What the `stats:` (and `mask:`) references read, which an output must not overlap: each directory, and the
    registry that holds the registry refs (`SPLICE_REGISTRY`, else the default one)."""
    directories = [reference for reference in references if not is_registry_ref(reference)]
    if len(directories) == len(references):
        return directories
    return [*directories, open_registry(None, storage_options).url]


def statistics_digest(reference: str, storage_options: dict | None = None) -> str:
    """What identifies the statistics a `stats:` (or the mask patch a `mask:`) names, for a model card and a stage's
    key: a registry version's content digest, or a directory's files as `splice.tensors.digest` describes them."""
    if is_registry_ref(reference):
        return open_registry(None, storage_options).resolve(reference).digest
    patch = Patch.load(reference, storage_options)
    assert isinstance(patch.tensors, StoredTensors)
    return checkpoint_digest(patch.tensors.stored)
