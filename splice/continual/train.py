"""One task of a continual pipeline on a LayerNormBank: its key, its LayerNorm slot, the classifier rectification,
and the evaluation of every task seen so far (De Min et al., two-stage variant)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from splice.continual.bank import LayerNormBank, eval_mode
from splice.continual.data import Batch, TaskData, batches
from splice.errors import SpliceError, first_line
from splice.progress import NoProgress, Progress

GradMasks = dict[int, torch.Tensor]  # id(parameter) -> 0/1 mask of the entries that train


@dataclass(frozen=True)
class Schedule:
    epochs: int
    lr: float
    head_lr: float
    rectify_epochs: int
    batch_size: int


@dataclass(frozen=True)
class Training:
    """What every training stage of one task shares: its schedule, its random generator (minibatch order), where
    progress goes and the label its progress lines start with."""

    schedule: Schedule
    generator: torch.Generator
    progress: Progress = field(default_factory=NoProgress)
    label: str = ""


def inputs_of(batch: Batch) -> Batch:
    return {key: value for key, value in batch.items() if key != "labels"}


@contextmanager
def model_inputs(where: str) -> Iterator[None]:
    """What a model raises on inputs it cannot take, as one line naming where the inputs came from."""
    try:
        yield
    except (ValueError, RuntimeError, TypeError, KeyError, IndexError) as exc:
        raise SpliceError(f"{where}: the model cannot take these inputs ({first_line(exc)})") from None


@torch.no_grad()
def dry_run(bank: LayerNormBank, tasks: Sequence[TaskData], batch_size: int) -> None:
    """One batch of every task's training and test inputs through the model (routing features and logits) before
    anything is trained, so inputs it cannot take, or on which it computes inf or nan, are refused now rather than
    after earlier tasks were pushed."""
    for task in tasks:
        for split, batch in (("train", task.train), ("test", task.test)):
            inputs = inputs_of(next(batches(batch, batch_size, device=bank.keys.device)))
            where = f"task {task.name} {split}"
            with model_inputs(where), eval_mode(bank.model):
                outputs = {"routing features": bank.features(**inputs), "logits": bank.model(**inputs).logits}
            for what, values in outputs.items():
                if not bool(torch.isfinite(values).all()):
                    raise SpliceError(
                        f"{where}: the model's {what} on these inputs are not finite (inf or nan); "
                        "check the inputs' values and scale"
                    )


def masked_logits(logits: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Logits of every class outside `classes` set to -inf."""
    allowed = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    allowed[list(classes)] = True
    return logits.masked_fill(~allowed, float("-inf"))


def routed_logits(logits: torch.Tensor, ids: torch.Tensor, task_classes: Sequence[Sequence[int]]) -> torch.Tensor:
    """Each sample's logits outside the classes of its routed task (`ids`: one slot per sample) set to -inf."""
    allowed = torch.zeros(len(task_classes), logits.shape[-1], dtype=torch.bool, device=logits.device)
    for task, classes in enumerate(task_classes):
        allowed[task, list(classes)] = True
    return logits.masked_fill(~allowed[ids.to(logits.device)], float("-inf"))


@torch.no_grad()
def task_features(bank: LayerNormBank, data: TaskData, batch_size: int) -> torch.Tensor:
    """The frozen model's routing features of the task's training inputs."""
    return torch.cat([bank.features(**inputs_of(b)) for b in batches(data.train, batch_size, device=bank.keys.device)])


def task_key(
    bank: LayerNormBank,
    data: TaskData,
    schedule: Schedule,
    generator: torch.Generator,
    trained: bool = False,
    epochs: int = 5,
    lr: float = 1e-2,
) -> torch.Tensor:
    """The key in closed form (the normalised mean of the normalised features: the optimum of -mean cos(f, k)), or
    trained as the reference code does: Adam on -mean cos(f, k) over minibatches, from a random start orthogonal
    to the keys already in the bank."""
    features = task_features(bank, data, schedule.batch_size)
    if not trained:
        return bank.closed_form_key(features)
    start = torch.randn(features.shape[1], generator=generator).to(features.device)
    for other in bank.keys[bank.has_key]:
        start -= (start @ other) * other  # keys are unit vectors
    key = torch.nn.Parameter(start / start.norm())
    optimizer = torch.optim.Adam([key], lr=lr)
    for _ in range(epochs):
        for index in torch.randperm(features.shape[0], generator=generator).split(schedule.batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss = -torch.nn.functional.cosine_similarity(features[index], key[None, :], dim=-1).mean()
            loss.backward()
            optimizer.step()
    return key.detach()


def _epochs(
    parameters: list[torch.nn.Parameter],
    loss_of: Callable[[Batch], torch.Tensor],
    data: TaskData,
    training: Training,
    lr: float,
    epochs: int,
    stage: str,
    masks: GradMasks | None = None,
) -> float:
    """Adam (a new optimiser, constant lr) over `epochs` of shuffled minibatches; the last epoch's mean loss."""
    optimizer = torch.optim.Adam(parameters, lr=lr, weight_decay=0.0)
    count = next(iter(data.train.values())).shape[0]
    progress, mean = training.progress, float("nan")
    for epoch in range(epochs):
        loss_so_far = "" if epoch == 0 else f" (loss {mean:.4f})"
        progress.start(f"{training.label} {stage} epoch {epoch + 1}/{epochs}{loss_so_far}", count, 0, unit="samples")
        total, seen = 0.0, 0
        try:
            for batch in batches(
                data.train, training.schedule.batch_size, training.generator, device=parameters[0].device
            ):
                optimizer.zero_grad(set_to_none=True)
                loss = loss_of(batch)
                loss.backward()
                for parameter in parameters:
                    if masks and parameter.grad is not None and id(parameter) in masks:
                        parameter.grad.mul_(masks[id(parameter)])
                optimizer.step()
                size = batch["labels"].shape[0]
                total, seen = total + float(loss.detach()) * size, seen + size
                progress.advance(size, 0)
        finally:
            progress.finish()
        mean = total / seen
    return mean


def train_slot(
    bank: LayerNormBank,
    slot: int,
    tuned: list[torch.nn.Parameter],
    head: list[torch.nn.Parameter],
    data: TaskData,
    training: Training,
    masks: GradMasks | None = None,
) -> float:
    """The slot's tuned gamma/beta (`tuned`: all of them or the pipeline's choice) and the head, trained with the
    oracle slot and logits masked to the task's classes."""
    parameters = [*tuned, *head]
    for parameter in parameters:
        parameter.requires_grad_(True)

    def loss_of(batch: Batch) -> torch.Tensor:
        ids = torch.full((batch["labels"].shape[0],), slot, dtype=torch.long)
        logits = bank(task_ids=ids, **inputs_of(batch)).logits
        return torch.nn.functional.cross_entropy(masked_logits(logits, data.classes), batch["labels"])

    bank.model.train()
    try:
        schedule = training.schedule
        return _epochs(parameters, loss_of, data, training, schedule.lr, schedule.epochs, "LayerNorm", masks)
    finally:
        bank.model.eval()
        for parameter in tuned:
            parameter.requires_grad_(False)


def rectify_head(bank: LayerNormBank, head: list[torch.nn.Parameter], data: TaskData, training: Training) -> float:
    """Second stage: only the head trains, on features made with the inference-time selection (so it learns to
    live with mis-selected slots); logits masked to the task's classes."""

    def loss_of(batch: Batch) -> torch.Tensor:
        inputs = inputs_of(batch)
        with torch.no_grad():
            ids = bank.route(**inputs)
        logits = bank(task_ids=ids, **inputs).logits
        return torch.nn.functional.cross_entropy(masked_logits(logits, data.classes), batch["labels"])

    for parameter in head:
        parameter.requires_grad_(True)
    schedule = training.schedule
    return _epochs(head, loss_of, data, training, schedule.head_lr, schedule.rectify_epochs, "head")


def align_head(
    head_module: torch.nn.Module,
    head: list[torch.nn.Parameter],
    features: torch.Tensor,
    labels: torch.Tensor,
    lr: float,
    epochs: int,
    training: Training,
) -> float:
    """Classifier alignment: only the head trains, on `features` (drawn from every seen class's statistics) with
    logits over every class among `labels`."""
    classes = sorted(int(c) for c in labels.unique())
    data = TaskData("alignment", {"features": features, "labels": labels}, {}, classes)

    def loss_of(batch: Batch) -> torch.Tensor:
        logits = head_module(batch["features"].to(head[0].dtype))
        return torch.nn.functional.cross_entropy(masked_logits(logits, classes), batch["labels"])

    for parameter in head:
        parameter.requires_grad_(True)
    return _epochs(head, loss_of, data, training, lr, epochs, "alignment")


@dataclass(frozen=True)
class Evaluation:
    accuracy: list[float]  # per seen task, routed by the keys
    oracle_accuracy: list[float]  # per seen task, with its own slot
    task_id_accuracy: float  # share of all seen tasks' test inputs routed to their own slot


@torch.no_grad()
def evaluate(
    bank: LayerNormBank,
    seen: list[TaskData],
    protocol: str,
    batch_size: int,
    progress: Progress | None = None,
    label: str = "",
    inference: str = "all-classes",
) -> Evaluation:
    """Accuracy on every seen task's test set: class-incremental over all classes seen so far (`routed-classes`:
    over the classes of each input's slot's task), task-incremental over the task's own classes; with routed
    slots and with oracle slots."""
    bank.model.eval()
    every_class = sorted({c for task in seen for c in task.classes})
    task_classes = [task.classes for task in seen] if inference == "routed-classes" else None
    routed, oracle, right, total = [], [], 0, 0
    progress = progress or NoProgress()
    progress.start(
        f"{label} evaluating {len(seen)} task(s)", sum(t.test["labels"].shape[0] for t in seen), 0, unit="samples"
    )
    for index, task in enumerate(seen):
        classes = every_class if protocol == "class-incremental" else task.classes
        hits = oracle_hits = 0
        for batch in batches(task.test, batch_size, device=bank.keys.device):
            inputs, labels = inputs_of(batch), batch["labels"]
            ids = bank.route(**inputs)
            own = torch.full_like(ids, index)
            hits += _correct(bank, inputs, labels, ids, classes, task_classes)
            oracle_hits += _correct(bank, inputs, labels, own, classes, task_classes)
            right, total = right + int((ids == index).sum()), total + labels.shape[0]
            progress.advance(labels.shape[0], 0)
        count = task.test["labels"].shape[0]
        routed.append(hits / count)
        oracle.append(oracle_hits / count)
    progress.finish()
    return Evaluation(routed, oracle, right / total)


def _correct(
    bank: LayerNormBank,
    inputs: Batch,
    labels: torch.Tensor,
    slots: torch.Tensor,
    classes: list[int],
    task_classes: list[list[int]] | None,
) -> int:
    """How many inputs the bank classifies right with `slots`: over `classes`, or (`task_classes` given: the
    routed-classes inference) over the classes of each input's slot's task."""
    logits = bank(task_ids=slots, **inputs).logits
    logits = routed_logits(logits, slots, task_classes) if task_classes is not None else masked_logits(logits, classes)
    return int((logits.argmax(-1) == labels).sum())
