"""Continual learning with task-keyed LayerNorm banks (De Min et al.) on scikit-learn's digits, against baselines.

A class-incremental split of the 8x8 digits into 5 tasks of 2 classes (class order shuffled with seed 0; or, with
--split groups, the 4 tasks {0,3,6} {1,4,7} {2,5} {8,9}), on a
small ViT pretrained here on a disjoint 40% of the digits (all 10 classes; none of those images is in any task's
train or test split), saved with a fresh 10-class head. Methods:

1. keyed LN banks, two-stage (rectify: true), run through `splice.workflows.continual.run.run_pipeline` from a
   pipeline YAML whose data hooks are this file's `task_<i>` functions, into a local registry under --out
2. the same, one-stage (rectify: false)
3. the banks with oracle task ids (the pipeline report's oracle accuracy: routing's upper bound)
4. sequential full fine-tuning (logits masked to the task's classes while training)
5. sequential LN tuning without keys (one set of LN parameters + the head, trained task after task)
6. joint training on every task's training data (all weights; the upper bound)
7. Fisher subsets (ValizadehAslani and Liang): per task the top p% LN entries by diagonal empirical Fisher, trained
   with gradient masking, against a random p% subset (built here from the library's pieces: each slot warm-starts
   from the previous task's, where the pipeline's `fisher:` option starts from the pretrained norms)
8. beyond the list: the two-stage bank with a throwaway head in the LN stage (the reference code's --unbiased);
   and a check that the two-stage bank built here from the library's pieces equals the pipeline's run
9. the two-stage pipeline with `inference: routed-classes` (logits restricted to the routed slot's task's classes),
   with `align:` (SLCA's classifier alignment from per-class feature statistics stored with each task), and both

    python examples/continual_digits.py --out DIR [--quick] [--seed 0] [--split pairs|groups] [--layers 2]

Writes DIR/continual_digits.json (every number), DIR/continual_digits.png, and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
import yaml

from splice.arch.quiet import quiet_transformers
from splice.continual.bank import LayerNormBank
from splice.continual.data import Batch, TaskData, batches
from splice.continual.fisher import fisher_diagonal, subset_masks
from splice.continual.metrics import summarize
from splice.continual.model import classification_head, head_parameters, load_model
from splice.continual.train import (
    Schedule,
    Training,
    evaluate,
    inputs_of,
    masked_logits,
    rectify_head,
    task_key,
    train_slot,
)
from splice.demo.digits import Augmentation
from splice.demo.digits import train as digits_train
from splice.plots import png_bytes
from splice.registry.store import Registry
from splice.workflows.continual.pipeline import FisherSubset
from splice.workflows.continual.run import run_pipeline

SEED_VARIABLE = "CONTINUAL_DIGITS_SEED"  # --seed: read by the data hooks too (the pipeline loads them by path)
SPLIT_VARIABLE = "CONTINUAL_DIGITS_SPLIT"  # --split: likewise
TASKS = 5  # of the default split, `pairs`
CLASSES_PER_TASK = 2
GROUPS = [[0, 3, 6], [1, 4, 7], [2, 5], [8, 9]]  # the `groups` split: 4 tasks, fixed classes (issue 16's)
PRETRAIN_FRACTION = 0.4  # of all 1797 images: the backbone's pretraining set, disjoint from every task's data
TRAIN_FRACTION = 0.7  # of each task's images (the rest is its test set)
FISHER_FRACTIONS = (0.1, 0.3)
JSON_NAME = "continual_digits.json"
PNG_NAME = "continual_digits.png"


@dataclass(frozen=True)
class Config:
    pretrain_steps: int  # backbone pretraining minibatches (AdamW, cosine, batch 64)
    pretrain_lr: float
    epochs: int  # per task, every method (the pipeline's `epochs`, also its rectification epochs)
    lr: float  # LayerNorm parameters (and the head while they train)
    head_lr: float  # the rectification stage
    finetune_lr: float  # full fine-tuning (sequential and joint)
    batch_size: int
    layers: int = 2  # the backbone's transformer layers (--layers)


FULL = Config(pretrain_steps=1500, pretrain_lr=2e-3, epochs=10, lr=1e-2, head_lr=1e-3, finetune_lr=1e-3, batch_size=32)
QUICK = Config(pretrain_steps=150, pretrain_lr=2e-3, epochs=2, lr=1e-2, head_lr=1e-3, finetune_lr=1e-3, batch_size=32)


# ---------------------------------------------------------------------------------------------------------------
# data: the pretraining split and the 5 tasks (also the pipeline's MODULE:FUNCTION hooks)


def study_seed() -> int:
    return int(os.environ.get(SEED_VARIABLE, "0"))


def study_split() -> str:
    return os.environ.get(SPLIT_VARIABLE, "pairs")


def class_order() -> list[int]:
    return torch.randperm(10, generator=torch.Generator().manual_seed(study_seed())).tolist()


def task_count() -> int:
    return TASKS if study_split() == "pairs" else len(GROUPS)


def task_classes(index: int) -> list[int]:
    """Task `index`'s classes: `pairs`, 2 per task in the seeded class order; `groups`, GROUPS[index]."""
    if study_split() == "pairs":
        return class_order()[CLASSES_PER_TASK * index : CLASSES_PER_TASK * (index + 1)]
    return GROUPS[index]


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _digits_of(study_seed())


@functools.cache
def _digits_of(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pretrain x, pretrain y, continual x, continual y): a seeded shuffle of all images cut in two."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = round(PRETRAIN_FRACTION * len(y))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def pretrain_split() -> tuple[torch.Tensor, torch.Tensor]:
    x, y, _, _ = _digits()
    return x, y


def task_data(index: int) -> dict[str, Batch]:
    """Task `index`: the continual images of its classes, split per class 70/30 into train and test."""
    _, _, x, y = _digits()
    classes = task_classes(index)
    train, test = [], []
    for cls in classes:
        members = (y == cls).nonzero().flatten()
        cut = round(TRAIN_FRACTION * len(members))
        train.append(members[:cut])
        test.append(members[cut:])
    split = {}
    for name, parts in (("train", train), ("test", test)):
        index_ = torch.cat(parts).sort().values
        split[name] = {"pixel_values": x[index_].clone(), "labels": y[index_].clone()}
    return split


def task_0() -> dict[str, Batch]:
    return task_data(0)


def task_1() -> dict[str, Batch]:
    return task_data(1)


def task_2() -> dict[str, Batch]:
    return task_data(2)


def task_3() -> dict[str, Batch]:
    return task_data(3)


def task_4() -> dict[str, Batch]:
    return task_data(4)


def task_name(index: int) -> str:
    return "digits-" + "-".join(str(c) for c in task_classes(index))


def all_tasks() -> list[TaskData]:
    tasks = []
    for index in range(task_count()):
        data = task_data(index)
        tasks.append(
            TaskData(
                task_name(index), data["train"], data["test"], sorted(int(c) for c in data["train"]["labels"].unique())
            )
        )
    return tasks


# ---------------------------------------------------------------------------------------------------------------
# the backbone


def backbone_config(layers: int = 2) -> transformers.ViTConfig:
    return transformers.ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=10,
    )


def pretrain_backbone(directory: Path, config: Config) -> dict:
    """A ViT trained on the pretraining split (all 10 classes, 1-pixel shifts and noise), saved with a fresh,
    untrained 10-class head (seed 1) in `directory`."""
    x, y = pretrain_split()
    seed = study_seed()
    torch.manual_seed(seed)
    model = transformers.ViTForImageClassification(backbone_config(config.layers))
    losses = digits_train(
        model,
        (x, y),
        lr=config.pretrain_lr,
        steps=config.pretrain_steps,
        seed=seed,
        augmentation=Augmentation(noise=0.05, shift=1),
    )
    with torch.no_grad():
        train_accuracy = float((model(pixel_values=x).logits.argmax(-1) == y).float().mean())
    torch.manual_seed(seed + 1)
    fresh = transformers.ViTForImageClassification(backbone_config(config.layers))
    fresh.vit.load_state_dict(model.vit.state_dict())
    with quiet_transformers():
        fresh.save_pretrained(directory)
    return {
        "images": len(y),
        "steps": config.pretrain_steps,
        "final_loss": losses[-1],
        "pretrain_accuracy": train_accuracy,
        "parameters": sum(p.numel() for p in fresh.parameters()),
    }


def load_backbone(directory: Path) -> torch.nn.Module:
    with quiet_transformers():
        return load_model(directory)


# ---------------------------------------------------------------------------------------------------------------
# 1-3: the keyed banks through the pipeline

# the pipeline variants: name -> (rectify, inference, align); every option spelled out, whatever the defaults are
ALIGN = {"samples": 256, "epochs": 5, "lr": 1e-2}
PIPELINES = {
    "keyed-two-stage": (True, "all-classes", None),
    "keyed-one-stage": (False, "all-classes", None),
    "keyed-routed-classes": (True, "routed-classes", None),
    "keyed-aligned": (True, "all-classes", ALIGN),
    "keyed-aligned-routed": (True, "routed-classes", ALIGN),
}


def pipeline_file(
    out: Path,
    base: Path,
    name: str,
    rectify: bool,
    config: Config,
    inference: str = "all-classes",
    align: dict | None = None,
) -> Path:
    here = Path(__file__).resolve()
    spec = {
        "base": str(base),
        "name": name,
        "registry": str(out / "registry"),
        "protocol": "class-incremental",
        "tasks": [{"name": task_name(i), "data": f"{here}:task_{i}"} for i in range(task_count())],
        "norms": "all",
        "epochs": config.epochs,
        "lr": config.lr,
        "head_lr": config.head_lr,
        "rectify": rectify,
        "batch_size": config.batch_size,
        "seed": study_seed(),
        "inference": inference,
        "align": align,
    }
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def keyed_rows(out: Path, base: Path, config: Config) -> tuple[dict[str, dict], dict[str, dict]]:
    """The PIPELINES through run_pipeline; their rows (and oracle rows) and their reports."""
    rows, oracles, reports = {}, {}, {}
    for name, (rectify, inference, align) in PIPELINES.items():
        with quiet_transformers():
            report = run_pipeline(
                pipeline_file(out, base, name, rectify, config, inference, align), report_dir=out / name
            )
        reports[name] = asdict(report)
        stored = max(report.parameters_per_task) + report.key_size  # every task stores its whole slot here
        extra = {"statistics_values_per_task": statistics_values(out, name)} if align else {}
        rows[name] = row(
            report.accuracy,
            report.task_id_accuracy[-1],
            stored,
            report.head_parameters,
            source=f"{name}/continual_report.json",
            **extra,
        )
        oracles[f"oracle-{name[6:]}"] = row(
            report.oracle_accuracy,
            1.0,
            stored,
            report.head_parameters,
            source=f"{name}/continual_report.json (oracle_accuracy)",
        )
    return rows | oracles, reports


def statistics_values(out: Path, name: str) -> int:
    """Values of the class statistics (means and covariances) an aligned pipeline's task versions keep, at most."""
    store = Registry.open(out / "registry")
    kept = [store.load(f"{name}@task-{i + 1}").meta.settings["class_statistics"] for i in range(task_count())]
    return max(sum(len(s["mean"]) + len(s["covariance"]) ** 2 for s in statistics.values()) for statistics in kept)


def task_seed(index: int) -> int:
    """Task `index`'s seed, as run_pipeline draws it."""
    return study_seed() * 100_003 + index


def row(matrix: list[list[float]], task_id: float | None, stored: int, head: int, **extra) -> dict:
    summary = summarize(matrix)
    return {
        "final_average_accuracy": summary.final_average_accuracy,
        "forgetting": summary.forgetting,
        "backward_transfer": summary.backward_transfer,
        "average_incremental_accuracy": summary.average_incremental_accuracy,
        "last_task_accuracy": matrix[-1][-1],
        "task_id_accuracy": task_id,
        "parameters_per_task": stored,
        "head_parameters": head,
        "accuracy": matrix,
        **extra,
    }


# ---------------------------------------------------------------------------------------------------------------
# 4-6: baselines without keys


@torch.no_grad()
def accuracies(logits_of: Callable[[Batch], torch.Tensor], seen: Sequence[TaskData], batch_size: int) -> list[float]:
    """Each seen task's test accuracy, predicting over every class seen so far (class-incremental)."""
    every_class = sorted({c for task in seen for c in task.classes})
    result = []
    for task in seen:
        hits = 0
        for batch in batches(task.test, batch_size):
            hits += int((masked_logits(logits_of(batch), every_class).argmax(-1) == batch["labels"]).sum())
        result.append(hits / task.test["labels"].shape[0])
    return result


def fit(
    model: torch.nn.Module,
    parameters: list[torch.nn.Parameter],
    loss_of: Callable[[Batch], torch.Tensor],
    data: Batch,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    """Adam (constant lr, no weight decay, a new optimiser) over `epochs` of shuffled minibatches."""
    optimizer = torch.optim.Adam(parameters, lr=lr)
    model.train()
    for _ in range(epochs):
        for batch in batches(data, batch_size, generator):
            optimizer.zero_grad(set_to_none=True)
            loss_of(batch).backward()
            optimizer.step()
    model.eval()


def sequential_finetune(base: Path, tasks: list[TaskData], config: Config) -> dict:
    model = load_backbone(base)
    parameters = list(model.parameters())
    matrix = []
    for index, task in enumerate(tasks):
        torch.manual_seed(task_seed(index))
        generator = torch.Generator().manual_seed(task_seed(index))

        def loss_of(batch: Batch, classes: list[int] = task.classes) -> torch.Tensor:
            logits = model(pixel_values=batch["pixel_values"]).logits
            return torch.nn.functional.cross_entropy(masked_logits(logits, classes), batch["labels"])

        fit(model, parameters, loss_of, task.train, config.epochs, config.finetune_lr, config.batch_size, generator)
        matrix.append(
            accuracies(lambda b: model(pixel_values=b["pixel_values"]).logits, tasks[: index + 1], config.batch_size)
        )
    total = sum(p.numel() for p in parameters)
    return row(matrix, None, total, 0, note="one model, every weight trained (and stored) again for each task")


def sequential_layernorm(base: Path, tasks: list[TaskData], config: Config) -> dict:
    """One LN slot and the head, trained task after task (the bank's training step, no keys, no new slots)."""
    bank = LayerNormBank(load_backbone(base)).freeze_backbone()
    head_names = classification_head(bank.model)
    head = head_parameters(bank.model, head_names)
    slot = bank.add_task()
    tuned = list(bank.slot_parameters(slot).values())
    schedule = Schedule(config.epochs, config.lr, config.head_lr, config.epochs, config.batch_size)
    matrix = []
    for index, task in enumerate(tasks):
        torch.manual_seed(task_seed(index))
        train_slot(bank, slot, tuned, head, task, Training(schedule, torch.Generator().manual_seed(task_seed(index))))

        def logits_of(batch: Batch) -> torch.Tensor:
            ids = torch.zeros(batch["labels"].shape[0], dtype=torch.long)
            return bank(task_ids=ids, **inputs_of(batch)).logits

        matrix.append(accuracies(logits_of, tasks[: index + 1], config.batch_size))
    stored = sum(p.numel() for p in tuned)
    return row(
        matrix,
        None,
        stored,
        sum(p.numel() for p in head),
        note="one set of LN parameters + head, overwritten by each task",
    )


def joint(base: Path, tasks: list[TaskData], config: Config) -> dict:
    """All weights trained on the union of every task's training data, over all 10 classes."""
    model = load_backbone(base)
    union = {key: torch.cat([task.train[key] for task in tasks]) for key in ("pixel_values", "labels")}
    torch.manual_seed(study_seed())

    def loss_of(batch: Batch) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(pixel_values=batch["pixel_values"]).logits, batch["labels"])

    fit(
        model,
        list(model.parameters()),
        loss_of,
        union,
        config.epochs,
        config.finetune_lr,
        config.batch_size,
        torch.Generator().manual_seed(study_seed()),
    )
    final = accuracies(lambda b: model(pixel_values=b["pixel_values"]).logits, tasks, config.batch_size)
    # one model for every task: its matrix is the final row (forgetting and BWT 0 by construction)
    matrix = [final[: i + 1] for i in range(len(tasks))]
    summary = {
        "final_average_accuracy": sum(final) / len(final),
        "forgetting": 0.0,
        "backward_transfer": 0.0,
        "average_incremental_accuracy": None,
        "last_task_accuracy": final[-1],
        "task_id_accuracy": None,
        "parameters_per_task": sum(p.numel() for p in model.parameters()),
        "head_parameters": 0,
        "accuracy": matrix[-1:],
        "note": "trained once on all tasks' data (not continual)",
    }
    return summary


# ---------------------------------------------------------------------------------------------------------------
# 7: Fisher-selected LN subsets on keyed banks


@dataclass(frozen=True)
class BankVariant:
    """How keyed_bank trains each task's slot: all entries or a p% subset (by Fisher, or at random), and whether
    the LN stage trains a throwaway copy of the head (the reference code's --unbiased fake_head)."""

    fraction: float | None = None  # None: every LN entry trains
    random: bool = False
    throwaway_head: bool = False


def keyed_bank(base: Path, tasks: list[TaskData], config: Config, variant: BankVariant) -> dict:
    """The two-stage keyed bank from the library's pieces (task_key, train_slot, rectify_head, evaluate), seeded as
    run_pipeline seeds it: BankVariant() reproduces the pipeline's two-stage run."""
    bank = LayerNormBank(load_backbone(base)).freeze_backbone()
    head = head_parameters(bank.model, classification_head(bank.model))
    schedule = Schedule(config.epochs, config.lr, config.head_lr, config.epochs, config.batch_size)
    matrix, task_ids, changed, kept = [], [], [], 0
    for index, task in enumerate(tasks):
        torch.manual_seed(task_seed(index))
        slot = bank.add_task(key=task_key(bank, task, schedule, torch.Generator().manual_seed(task_seed(index))))
        named = bank.slot_parameters(slot)
        tuned = list(named.values())
        masks = None
        if variant.fraction is not None:  # the library's Fisher subsets (the pipeline's `fisher:` option)
            chosen = subset_masks(
                fisher_diagonal(bank, slot, named, task),
                FisherSubset(fraction=variant.fraction, random=variant.random),
                torch.Generator().manual_seed(task_seed(index)),
            )
            kept = int(sum(m.sum() for m in chosen.values()))
            masks = {id(named[name]): mask.to(named[name].dtype) for name, mask in chosen.items()}
        before = [p.detach().clone() for p in tuned]
        head_before = [p.detach().clone() for p in head]
        training = Training(schedule, torch.Generator().manual_seed(task_seed(index)))
        train_slot(bank, slot, tuned, head, task, training, masks=masks)
        if variant.throwaway_head:
            with torch.no_grad():
                for parameter, value in zip(head, head_before):
                    parameter.copy_(value)
        rectify_head(bank, head, task, training)
        for parameter in head:
            parameter.requires_grad_(False)
        changed.append(int(sum((p.detach() != b).sum() for p, b in zip(tuned, before))))
        result = evaluate(bank, tasks[: index + 1], "class-incremental", config.batch_size)
        matrix.append(result.accuracy)
        task_ids.append(result.task_id_accuracy)
    entries = sum(p.numel() for p in bank.slot_parameters(0).values())
    kept = kept if variant.fraction is not None else entries
    # a diagnostic: each task with its own slot and only its own classes (what the head's cross-task bias costs)
    within = evaluate(bank, tasks, "task-incremental", config.batch_size).oracle_accuracy
    return row(
        matrix,
        task_ids[-1],
        kept + bank.feature_dim,
        sum(p.numel() for p in head),
        entries_kept=kept,
        entries_changed_per_task=changed,
        ln_entries=entries,
        task_id_per_step=task_ids,
        within_task_oracle_accuracy=within,
    )


# ---------------------------------------------------------------------------------------------------------------
# the study


def run_study(out: Path, config: Config) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "registry", ignore_errors=True)  # this study's own registry: a rerun starts afresh
    started = time.perf_counter()
    seconds = {}
    base = out / "backbone"
    backbone = pretrain_backbone(base, config)
    seconds["pretrain"] = time.perf_counter() - started
    tasks = all_tasks()
    rows, reports = keyed_rows(out, base, config)
    seconds["pipelines"] = time.perf_counter() - started - sum(seconds.values())
    for name, method in (
        ("sequential-finetune", sequential_finetune),
        ("sequential-layernorm", sequential_layernorm),
        ("joint", joint),
    ):
        rows[name] = method(base, tasks, config)
        seconds[name] = time.perf_counter() - started - sum(seconds.values())
    variants = {
        f"{'random' if random else 'fisher'}-{round(100 * fraction)}%": BankVariant(fraction, random)
        for fraction in FISHER_FRACTIONS
        for random in (False, True)
    }
    variants["two-stage-throwaway-head"] = BankVariant(throwaway_head=True)
    for name, variant in variants.items():
        rows[name] = keyed_bank(base, tasks, config, variant)
        seconds[name] = time.perf_counter() - started - sum(seconds.values())
    # the same two-stage bank built here from the library's pieces: equal to the pipeline's run, or a bug
    rebuilt = keyed_bank(base, tasks, config, BankVariant())
    checks = {
        "rebuilt_two_stage_accuracy": rebuilt["accuracy"],
        "within_task_oracle_accuracy": rebuilt["within_task_oracle_accuracy"],
        "rebuilt_equals_pipeline": rebuilt["accuracy"] == rows["keyed-two-stage"]["accuracy"],
    }
    seconds["rebuilt-two-stage"] = time.perf_counter() - started - sum(seconds.values())
    seconds["total"] = time.perf_counter() - started
    return {
        "config": asdict(config),
        "seed": study_seed(),
        "split": study_split(),
        "class_order": class_order(),
        "tasks": [
            {
                "name": t.name,
                "classes": t.classes,
                "train": t.train["labels"].shape[0],
                "test": t.test["labels"].shape[0],
            }
            for t in tasks
        ],
        "backbone": backbone,
        "methods": rows,
        "checks": checks,
        "pipeline_reports": reports,
        "seconds": seconds,
        "torch": torch.__version__,
    }


def table(results: dict) -> str:
    def cell(value, pct: bool = True) -> str:
        if value is None:
            return "-"
        return f"{100 * value:.1f}" if pct else f"{value:,}"

    lines = [
        "| method | final avg acc % | last task % | forgetting (pts) | task-id acc % | params stored per task "
        "| shared head |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["methods"].items():
        lines.append(
            f"| {name} | {cell(r['final_average_accuracy'])} | {cell(r['last_task_accuracy'])} | "
            f"{cell(r['forgetting'])} | "
            f"{cell(r['task_id_accuracy'])} | {cell(r['parameters_per_task'], False)} | "
            f"{cell(r['head_parameters'], False)} |"
        )
    return "\n".join(lines)


def draw(results: dict) -> Callable:
    def _draw(figure) -> None:
        import numpy as np

        bars, heat = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1.4, 1]})
        names = list(results["methods"])
        values = [results["methods"][n]["final_average_accuracy"] for n in names]
        bars.barh(range(len(names)), values, color="tab:blue")
        bars.set_yticks(range(len(names)), names, fontsize="small")
        bars.invert_yaxis()
        bars.set_xlim(0, 1)
        bars.set_xlabel(f"final average accuracy ({task_count()} tasks, all seen classes)")
        for i, v in enumerate(values):
            bars.text(v + 0.01, i, f"{v:.2f}", va="center", fontsize="x-small")
        matrix = results["methods"]["keyed-two-stage"]["accuracy"]
        grid = np.full((len(matrix), len(matrix)), np.nan)
        for i, r in enumerate(matrix):
            grid[i, : len(r)] = r
            for j, v in enumerate(r):
                heat.text(
                    j,
                    i,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize="x-small",
                    color="white" if v < 0.6 else "black",
                )
        image = heat.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        heat.set_xlabel("evaluated on task")
        heat.set_ylabel("after task")
        heat.set_title("keyed bank, two-stage: accuracy matrix", fontsize="medium")
        figure.colorbar(image, ax=heat, shrink=0.8)

    return _draw


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the backbone, registry and reports")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (fewer steps and epochs)")
    parser.add_argument("--seed", type=int, default=0, help="class order, splits and training (default 0)")
    parser.add_argument(
        "--split",
        choices=["pairs", "groups"],
        default="pairs",
        help="pairs: 5 tasks of 2 classes in the seeded order; groups: {0,3,6} {1,4,7} {2,5} {8,9}",
    )
    parser.add_argument("--layers", type=int, default=2, help="the backbone's transformer layers (default 2)")
    args = parser.parse_args(argv)
    variables = {SEED_VARIABLE: str(args.seed), SPLIT_VARIABLE: args.split}
    threads, previous = torch.get_num_threads(), {name: os.environ.get(name) for name in variables}
    torch.set_num_threads(1)
    os.environ.update(variables)
    try:
        config = QUICK if args.quick else FULL
        results = run_study(args.out, dataclasses.replace(config, layers=args.layers))
    finally:
        torch.set_num_threads(threads)
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value
    results["quick"] = args.quick
    (args.out / JSON_NAME).write_text(json.dumps(results, indent=2) + "\n")
    (args.out / PNG_NAME).write_bytes(png_bytes(draw(results), size=(12.0, 5.0)))
    print(table(results))
    print(
        f"backbone: {results['backbone']}; {results['seconds']['total']:.0f} s; wrote {args.out / JSON_NAME}, "
        f"{args.out / PNG_NAME}"
    )
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
