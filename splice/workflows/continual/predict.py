"""A continual pipeline's bank back from the registry, and routed predictions with it.

Each task's version is read lazily (its slot's few tensors: one ranged read of its pack, not a download of the
version or of anything else); the head comes from the last task's version.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from splice.adapters.bank import LayerNormBank
from splice.errors import SpliceError, first_line
from splice.registry.store import Registry, open_registry
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.device import resolve_device
from splice.workflows.continual.data import Batch, batches, check_batch
from splice.workflows.continual.model import load_model
from splice.workflows.continual.run import restore_task
from splice.workflows.continual.stored import pretrained_values
from splice.workflows.continual.train import inputs_of, masked_logits, routed_logits


@dataclass
class LoadedBank:
    bank: LayerNormBank
    refs: list[str]  # the version of each task, in task order
    classes: list[list[int]]  # each task's classes
    inference: str = "all-classes"  # the pipeline's: over every task's classes, or the routed task's (routed-classes)


def load_bank(ref: str, base: str | os.PathLike, registry: Registry | str | None = None,
              storage_options: dict | None = None, device: str = "auto") -> LoadedBank:
    """The bank of every task up to the one `ref` names (`name@task-3`, or `name`: the latest task), on `base`."""
    store = open_registry(registry, storage_options)
    last = store.load(ref)
    settings = last.meta.settings
    if "pipeline" not in settings or "task" not in settings:
        raise SpliceError(f"{ref} is not a task of a continual pipeline (no pipeline/task in its settings)")
    name = store.resolve(ref).name
    aliases = store.aliases(name)
    with Checkpoint.open(base, storage_options) as checkpoint:  # the bank's base, or a one-line refusal
        last.check_base(checkpoint)
    bank = LayerNormBank(load_model(base).to(resolve_device(device)))
    pretrained = pretrained_values(base, [*bank.tensor_names, *settings["head"]])
    refs, classes = [], []
    for task in range(int(settings["task"]) + 1):
        alias = aliases.get(f"task-{task}")
        if alias is None:
            raise SpliceError(f"{name} has no alias task-{task}: the bank of {ref} is incomplete")
        patch = store.load(f"{name}@{alias.version}") if task != settings["task"] else last
        if patch.meta.settings.get("pipeline_settings") != settings.get("pipeline_settings"):
            raise SpliceError(f"{name}@task-{task} belongs to another pipeline than {ref}")
        restore_task(bank, patch, pretrained)
        refs.append(f"{name}@{alias.version}")
        classes.append(list(patch.meta.settings["classes"]))
    # restore_task loaded each task's head in turn: the last one, `ref`'s, is the bank's
    return LoadedBank(bank, refs, classes, settings.get("inference", "all-classes"))


@dataclass
class Predictions:
    classes: torch.Tensor  # [N] predicted class ids
    tasks: torch.Tensor  # [N] selected task slots
    accuracy: float | None  # when the batch has labels

    def as_dict(self) -> dict:
        return {"classes": self.classes.tolist(), "tasks": self.tasks.tolist(), "accuracy": self.accuracy}


@torch.no_grad()
def predict(loaded: LoadedBank, batch: Batch, batch_size: int = 64) -> Predictions:
    """Routed predictions (each input's slot chosen by its key) over the classes of every task in the bank, or,
    for a pipeline with `inference: routed-classes`, over the classes of each input's routed task."""
    batch = check_batch(batch, "the data", labels=False)
    every = sorted({c for task in loaded.classes for c in task})
    loaded.bank.model.eval()
    predicted, selected = [], []
    for part in batches(batch, batch_size, device=loaded.bank.keys.device):
        inputs = inputs_of(part)
        try:
            ids = loaded.bank.route(**inputs)
            logits = loaded.bank(task_ids=ids, **inputs).logits
        except (ValueError, RuntimeError, TypeError) as exc:
            raise SpliceError(f"the model cannot take these inputs ({first_line(exc)})") from None
        if loaded.inference == "routed-classes":
            logits = routed_logits(logits, ids, loaded.classes)
        else:
            logits = masked_logits(logits, every)
        predicted.append(logits.argmax(-1))
        selected.append(ids)
    classes, tasks = torch.cat(predicted), torch.cat(selected)
    labels = batch.get("labels")
    return Predictions(classes, tasks, None if labels is None else float((classes == labels).double().mean()))
