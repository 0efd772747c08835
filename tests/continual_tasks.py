"""Synthetic class-incremental tasks for the continual pipeline's tests: 8x8 one-channel images, two classes
per task; each task lights up its own quarter of the image (so keys can tell tasks apart), striped across or
down by class (so they are learnable). Deterministic."""

from __future__ import annotations

import torch

TASKS = 3


def _split(task: int, count: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 2 + 2 * task
    images = torch.randn(count, 1, 8, 8, generator=generator) * 0.3
    row, col = divmod(task, 2)
    quarter = images[:, :, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4]  # a view: the task's own quarter
    quarter += 2.0
    quarter[labels % 2 == 0, :, ::2, :] += 1.5  # class 0 of each task: horizontal stripes in its quarter
    quarter[labels % 2 == 1, :, :, ::2] += 1.5  # class 1: vertical stripes
    return {"pixel_values": images, "labels": labels}


def task(index: int) -> dict[str, dict[str, torch.Tensor]]:
    return {"train": _split(index, 24, 100 + index), "test": _split(index, 12, 200 + index)}


def task_0():
    return task(0)


def task_1():
    return task(1)


def task_2():
    return task(2)


def overlapping():
    """A task whose classes are task 0's: refused under class-incremental."""
    return task(0)


def negative_label():
    """Task 1 with one training label -1 (not a class id)."""
    data = task(1)
    data["train"]["labels"][0] = -1
    return data


def three_channels():
    """Task 1 whose test images have three channels (the model takes one): the model cannot take them."""
    data = task(1)
    data["test"]["pixel_values"] = data["test"]["pixel_values"].repeat(1, 3, 1, 1)
    return data


def empty():
    return {
        "train": {"pixel_values": torch.zeros(0, 1, 8, 8), "labels": torch.zeros(0, dtype=torch.long)},
        "test": task(0)["test"],
    }


def unlabelled_batch():
    return {"pixel_values": torch.cat([task(i)["test"]["pixel_values"] for i in range(TASKS)])}


def overflowing():
    """Task 1 with training images so large the model's activations overflow float32: the loss is not finite."""
    data = task(1)
    data["train"]["pixel_values"] = data["train"]["pixel_values"] * 1e38
    return data
