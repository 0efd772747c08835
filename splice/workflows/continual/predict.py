"""A continual pipeline's bank back from the registry, and routed predictions with it.

Each task's version is read lazily (its slot's few tensors: one ranged read of its pack, not a download of the
version or of anything else); the head comes from the last task's version.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from typing_extensions import Unpack

from splice.continual.bank import LayerNormBank
from splice.continual.data import Batch, batches, check_batch
from splice.continual.model import load_model
from splice.continual.train import inputs_of, masked_logits, model_inputs, routed_logits
from splice.errors import SpliceError
from splice.hooks import hook_file, load_callable
from splice.options import RunKeywords, RunOptions, run_options
from splice.progress import NoProgress, Progress
from splice.registry.refs import parse_ref
from splice.registry.store import Registry, open_registry
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.device import resolve_device
from splice.tensors.writer import ensure_output_file_free, write_output_file
from splice.workflows.continual.aliases import alias_of, check_aliased_task, index_named, uses_legacy_aliases
from splice.workflows.continual.run import restore_task
from splice.workflows.continual.stored import pretrained_values


@dataclass
class LoadedBank:
    bank: LayerNormBank
    refs: list[str]  # the version of each task, in task order
    classes: list[list[int]]  # each task's classes
    aliases: list[str] | None = None  # each task's alias (task-1 .., or task-0 .. in an older registry)
    inference: str = "all-classes"  # the pipeline's: over every task's classes, or the routed task's (routed-classes)


def load_bank(
    ref: str,
    base: str | os.PathLike,
    registry: Registry | str | None = None,
    storage_options: dict | None = None,
    device: str = "auto",
    progress: Progress | None = None,
) -> LoadedBank:
    """The bank of every task up to the one `ref` names (`name@task-3`: tasks 1 to 3, or `name`: the latest task),
    on `base`. Each earlier task's alias must point at that task's version."""
    store = open_registry(registry, storage_options)
    progress = progress or NoProgress()
    last = store.load(ref)
    settings = last.meta.settings
    if "pipeline" not in settings or "task" not in settings:
        raise SpliceError(f"{ref} is not a task of a continual pipeline (no pipeline/task in its settings)")
    resolved = store.resolve(ref)
    name, aliases = resolved.name, store.aliases(resolved.name)
    legacy = uses_legacy_aliases(aliases)
    named = parse_ref(ref).alias
    index = index_named(named, legacy)
    if named is not None and index is not None:  # name@task-3 must be task 3, not a task its alias was moved onto
        check_aliased_task(store, name, named, resolved.version, settings, index)
    progress.start("checking and loading the base model", 1, 0, unit="models")
    with Checkpoint.open(base, storage_options) as checkpoint:  # the bank's base, or a one-line refusal
        last.check_base(checkpoint)
    bank = LayerNormBank(load_model(base, resolve_device(device)))
    pretrained = pretrained_values(base, [*bank.tensor_names, *settings["head"]])
    progress.advance(1, 0)
    progress.finish()
    count = int(settings["task"]) + 1
    progress.start(f"loading the slots of {name}", count, 0, unit="tasks")
    refs, classes, names = [], [], []
    for task in range(count):
        alias_name = alias_of(task, legacy)
        alias = aliases.get(alias_name)
        if alias is None:
            raise SpliceError(f"{name} has no alias {alias_name}: the bank of {ref} is incomplete")
        patch = store.load(f"{name}@{alias.version}") if task != settings["task"] else last
        if patch.meta.settings.get("pipeline_settings") != settings.get("pipeline_settings"):
            raise SpliceError(f"{name}@{alias_name} belongs to another pipeline than {ref}")
        if task != settings["task"]:
            check_aliased_task(store, name, alias_name, alias.version, patch.meta.settings, task)
        restore_task(bank, patch, pretrained)
        refs.append(f"{name}@{alias.version if task != settings['task'] else resolved.version}")
        classes.append(list(patch.meta.settings["classes"]))
        names.append(alias_name)
        progress.advance(1, 0)
    progress.finish()
    # restore_task loaded each task's head in turn: the last one, `ref`'s, is the bank's
    return LoadedBank(bank, refs, classes, names, settings.get("inference", "all-classes"))


@dataclass
class Predictions:
    classes: torch.Tensor  # [N] predicted class ids
    tasks: torch.Tensor  # [N] selected task slots
    accuracy: float | None  # when the batch has labels

    def as_dict(self) -> dict:
        return {"classes": self.classes.tolist(), "tasks": self.tasks.tolist(), "accuracy": self.accuracy}


@torch.no_grad()
def predict(loaded: LoadedBank, batch: Batch, batch_size: int = 64, progress: Progress | None = None) -> Predictions:
    """Routed predictions (each input's slot chosen by its key) over the classes of every task in the bank, or,
    for a pipeline with `inference: routed-classes`, over the classes of each input's routed task."""
    batch = check_batch(batch, "the data", labels=False)
    every = sorted({c for task in loaded.classes for c in task})
    loaded.bank.model.eval()
    progress = progress or NoProgress()
    progress.start("routing and predicting", next(iter(batch.values())).shape[0], 0, unit="inputs")
    predicted, selected = [], []
    for part in batches(batch, batch_size, device=loaded.bank.keys.device):
        inputs = inputs_of(part)
        with model_inputs("the data"):
            ids = loaded.bank.route(**inputs)
            logits = loaded.bank(task_ids=ids, **inputs).logits
        if loaded.inference == "routed-classes":
            logits = routed_logits(logits, ids, loaded.classes)
        else:
            logits = masked_logits(logits, every)
        predicted.append(logits.argmax(-1))
        selected.append(ids)
        progress.advance(ids.shape[0], 0)
    progress.finish()
    classes, tasks = torch.cat(predicted), torch.cat(selected)
    labels = batch.get("labels")
    return Predictions(classes, tasks, None if labels is None else float((classes == labels).double().mean()))


def predict_into(
    ref: str,
    base: str | os.PathLike,
    data: str,
    out: str | os.PathLike | None = None,
    *,
    registry: Registry | str | None = None,
    run: RunOptions | None = None,
    **run_keywords: Unpack[RunKeywords],
) -> tuple[LoadedBank, Predictions]:
    """`splice continual predict`: the bank of `ref` on `base`, routed predictions for the batch the `data` hook
    (MODULE:FUNCTION) returns, and with `out` those predictions as JSON. `out` follows the output rule, checked
    before any work: never the base, the registry or the hook's own file, `force` to replace, published whole.
    `run` (or its fields as keywords: device, force, progress, storage_options) says how it runs."""
    run = run_options(run, run_keywords, "predict_into")
    force, storage_options, device, progress = run.force, run.storage_options, run.device, run.progress
    store = open_registry(registry, storage_options)
    hook = load_callable(data, option="`data`")
    protected = [p for p in (base, store.url, hook_file(hook)) if p is not None]
    if out is not None:
        ensure_output_file_free(out, force, protected, what="an input or the registry")
    loaded = load_bank(ref, base, store, storage_options, device=device, progress=progress)
    result = predict(loaded, hook(), progress=progress)
    if out is not None:
        data_bytes = (json.dumps({"bank": loaded.refs, **result.as_dict()}, indent=2) + "\n").encode()
        write_output_file(out, data_bytes, force, protected, what="an input or the registry")
    return loaded, result
