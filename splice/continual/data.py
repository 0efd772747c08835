"""The tasks' data, loaded through the pipeline's `MODULE:FUNCTION` hooks and checked before any training."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from splice.errors import SpliceError
from splice.hooks import load_callable

Batch = dict[str, torch.Tensor]


@dataclass
class TaskData:
    name: str
    train: Batch
    test: Batch
    classes: list[int]  # the class ids in the task's training labels, sorted


def check_batch(batch: object, where: str, labels: bool = True) -> Batch:
    """A dict of tensors sharing their first dimension (and int64 `labels`, when required), non-empty."""
    if not isinstance(batch, Mapping) or not batch:
        raise SpliceError(f"{where}: expected a dict of tensors (model inputs and labels), got {type(batch).__name__}")
    if labels and "labels" not in batch:
        raise SpliceError(f"{where}: no 'labels' (int64 class ids)")
    checked = {}
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            raise SpliceError(f"{where}: {key} is not a tensor with the samples on dimension 0")
        checked[str(key)] = value
    sizes = {key: value.shape[0] for key, value in checked.items()}
    if len(set(sizes.values())) != 1:
        raise SpliceError(f"{where}: inputs disagree on the number of samples ({sizes})")
    if not next(iter(sizes.values())):
        raise SpliceError(f"{where}: no samples")
    if labels and (checked["labels"].dtype != torch.int64 or checked["labels"].dim() != 1):
        raise SpliceError(f"{where}: labels must be a 1-D int64 tensor of class ids")
    return checked


def load_task(name: str, hook: str) -> TaskData:
    return check_task_data(load_callable(hook, option=f"task {name}: data")(), name, f"task {name} ({hook})")


def check_task_data(data: object, name: str, where: str) -> TaskData:
    """What a task's data function returned: {'train': batch, 'test': batch}, labelled, the test's classes among the
    training's."""
    if not isinstance(data, Mapping) or not {"train", "test"} <= set(data):
        raise SpliceError(f"{where}: the data function must return {{'train': batch, 'test': batch}}")
    train, test = check_batch(data["train"], f"{where} train"), check_batch(data["test"], f"{where} test")
    classes = sorted(int(c) for c in train["labels"].unique())
    unseen = sorted(set(int(c) for c in test["labels"].unique()) - set(classes))
    if unseen:
        raise SpliceError(f"{where}: the test labels have classes the training labels lack ({unseen[:5]})")
    return TaskData(name, train, test, classes)


def check_labels_fit(task: TaskData, num_labels: int, where: str) -> None:
    """Every class of `task` is a class id of the model's head of `num_labels` (the test's are among the
    training's)."""
    outside = [c for c in task.classes if not 0 <= c < num_labels]
    if outside:
        raise SpliceError(
            f"{where}: label {outside[0]} does not fit the model's head of "
            f"{num_labels} labels (labels are class ids 0..{num_labels - 1})"
        )


def check_protocol(tasks: list[TaskData], protocol: str, num_labels: int) -> None:
    """Class-incremental tasks have disjoint classes; every class fits the model's head."""
    for task in tasks:
        check_labels_fit(task, num_labels, f"task {task.name}")
    if protocol != "class-incremental":
        return
    owner: dict[int, str] = {}
    for task in tasks:
        for cls in task.classes:
            if cls in owner:
                raise SpliceError(
                    f"tasks {owner[cls]} and {task.name} both have class {cls}; class-incremental "
                    f"tasks have disjoint classes (or set protocol: task-incremental)"
                )
            owner[cls] = task.name


def batches(
    batch: Batch, size: int, generator: torch.Generator | None = None, device: torch.device | None = None
) -> Iterator[Batch]:
    """Minibatches of `size`, shuffled by `generator` (in order without one), on `device` (the model's)."""
    count = next(iter(batch.values())).shape[0]
    order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
    for start in range(0, count, size):
        index = order[start : start + size]
        yield {key: value[index].to(device) if device is not None else value[index] for key, value in batch.items()}
