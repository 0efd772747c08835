"""Skill localization (Panigrahi et al., ICML 2023) and Localize-and-Stitch (He et al., 2024) on the tiny ViTs and
digit domains of `datamerge_digits.py`: how much of a fine-tune a learned sparse region keeps, how calibrated the
graft is, how much the regions of different tasks overlap, and how stitching them merges next to averaging, task
arithmetic and TIES.

Protocol (per seed; seeds 0, 1, 2 by default):
- Data, pretrained model and tasks are `datamerge_digits.py`'s, through its own functions: the same seeded splits,
  the same pretraining (600 steps on clean digits), all 5 of its domain tasks (occlude-top, -bottom, -left, -right,
  blur: the 10-way digit task with 3 rows or columns erased, or blurred). All 5 because each is cheap here and they
  differ in what the pretrained model already gets right (22-59%), which is what decides how much a tiny graft can
  add; the merge comparison then has datamerge_digits' own task set, and its fine-tunes are bit for bit its
  fine-tunes (same seeds).
- Two fine-tuning regimes per task, every weight trained from the pretrained model (AdamW, cosine, batch 64):
  "full", datamerge_digits' fine-tune (all 647 training images, lr 3e-4, 200 steps); "few-shot", closer to the
  paper's setting (few-shot prompt-based fine-tuning of RoBERTa at a small learning rate): 10 images per class (the
  first 10 of each class in the task's training split), lr 1e-4, 100 steps.
- Per task, head setting and density (1e-4, 1e-3, 1e-2 of the entries of the layers' tensors, as the paper counts
  them, and 1e-1 beyond the paper's range to see where the graft recovers): `splice.localize` (20 steps, lr 30, no
  L1, the library's defaults; seed = the study's seed) on the data hook below ({"train": the fine-tune's training
  images, "test": the task's 269 test images}, labelled), stored as a mask patch. Its scores: test accuracy and ECE
  of the fine-tune, the learned graft, the magnitude graft (the top entries of |theta_ft - theta_pre| in the same
  number) and the pretrained model; and the share of the fine-tune's accuracy each graft keeps.
- Head: both settings, every density. "fine-tuned" (splice's default) carries the fine-tune's changed 10-way head
  whole (650 entries, 1% of the model: 90x the region at 1e-4); "pretrained" keeps the pretrained head, which here
  is already a digit classifier, as the paper's masked-LM head is for its prompt's label words: the paper's grafts
  carry no head, so its >95%-from-0.01% claim is about this setting. "head only" (the pretrained model with the
  fine-tune's head, no region) is the floor of the first setting.
- Overlap: the pairwise Jaccard index of the tasks' learned regions (the layers' entries, the carried head left
  out), read from the stored patches' masks; beside it the same for the magnitude regions of the same sizes, each
  task's learned region against its own magnitude region (where the learning starts), and what two random regions
  of that density share by chance, density / (2 - density).
- Merges of the 5 fine-tunes of each regime (`splice.merge`): averaging; task arithmetic and TIES (density 0.2)
  with lambda picked on the val images as datamerge_digits does; Localize-and-Stitch (`merge_method:
  localize_stitch`, each model's `mask:` its learned patch) for every density and head setting, where this splice
  has the method. Test accuracy on each task; "normalized": the merge's average over the fine-tunes' own-task
  average.

    python examples/localize_digits.py --report DIR [--seeds 0 1 2] [--workdir DIR] [--quick] [--force]

Writes DIR/localize_digits.json (every number, per seed and summarised) and DIR/localize_digits.png (accuracy against
density per task, ECE, overlaps, merges) under the output rule (existing report files are refused unless --force),
and prints the tables. Models and patches go to --workdir (default: a temporary directory, removed at the end).
Results: examples/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import datamerge_digits as datamerge
import torch
from safetensors.torch import load_file

import splice
from splice.arch.layers import layer_index, layer_module
from splice.demo import digits
from splice.merge.recipe import parse_recipe
from splice.plots import png_bytes
from splice.sparsify import top_k_over, unpack_mask
from splice.tensors.writer import write_report_files
from splice.workflows.localize import CANDIDATES, SCORED, calibration
from splice.workflows.placement import mask_placement

JSON_NAME = "localize_digits.json"
PNG_NAME = "localize_digits.png"
SHOTS_VARIABLE = "LOCALIZE_DIGITS_SHOTS"  # the data hooks read the regime's shots from here (splice loads them by path)
HERE = Path(__file__).resolve()
TASKS = datamerge.TASKS
HEADS = ("fine-tuned", "pretrained")
STITCH = "localize_stitch"
BASELINES = ("averaging", "task arithmetic", "TIES")
GRAFTS = ("learned_graft", "magnitude_graft")


@dataclass(frozen=True)
class Regime:
    """How every task is fine-tuned: on `shots` images per class of its training split (0: all of them)."""

    name: str
    shots: int
    lr: float
    steps: int


@dataclass(frozen=True)
class Settings:
    training: datamerge.Settings  # pretraining, batch size, the merges' lambda grids and TIES' density
    regimes: tuple[Regime, ...]
    densities: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
    heads: tuple[str, ...] = HEADS
    steps: int = 20  # splice.localize's defaults
    lr: float = 30.0
    l1: float = 0.0
    candidates: float | None = CANDIDATES


FULL = Settings(
    datamerge.FULL,
    (
        Regime("full", 0, datamerge.FULL.finetune_lr, datamerge.FULL.finetune_steps),
        Regime("few-shot", 10, 1e-4, 100),
    ),
)
QUICK = Settings(
    datamerge.QUICK,
    (
        Regime("full", 0, datamerge.QUICK.finetune_lr, datamerge.QUICK.finetune_steps),
        Regime("few-shot", 10, 3e-4, 20),
    ),
    densities=(1e-3, 1e-2),
    steps=3,
)


# ---------------------------------------------------------------------------------------------------------------
# data: a regime's training images, and the localization's data hooks


def train_split(task: str, seed: int, shots: int) -> digits.Split:
    """Task `task`'s training images: all of them (`shots` 0), or the first `shots` of each class."""
    split = datamerge.task_split(task, "train", seed)
    if not shots:
        return split
    chosen = torch.cat([torch.nonzero(split.y == label).flatten()[:shots] for label in range(digits.NUM_LABELS)])
    chosen = chosen.sort().values
    return digits.Split(split.x[chosen], split.y[chosen])


def task_data(task: str) -> dict[str, dict[str, torch.Tensor]]:
    """{"train": the fine-tune's training images, "test": the task's test images}, labelled; the seed and the
    regime's shots from the environment (`hook_environment`)."""
    seed, shots = datamerge.study_seed(), int(os.environ.get(SHOTS_VARIABLE, "0"))
    train, test = train_split(task, seed, shots), datamerge.task_split(task, "test", seed)
    return {
        "train": {"pixel_values": train.x, "labels": train.y},
        "test": {"pixel_values": test.x, "labels": test.y},
    }


def data_occlude_top() -> dict[str, dict[str, torch.Tensor]]:
    return task_data("occlude-top")


def data_occlude_bottom() -> dict[str, dict[str, torch.Tensor]]:
    return task_data("occlude-bottom")


def data_occlude_left() -> dict[str, dict[str, torch.Tensor]]:
    return task_data("occlude-left")


def data_occlude_right() -> dict[str, dict[str, torch.Tensor]]:
    return task_data("occlude-right")


def data_blur() -> dict[str, dict[str, torch.Tensor]]:
    return task_data("blur")


def data_hook(task: str) -> str:
    """The `--data` reference to task `task`'s hook, FILE.py:FUNCTION (what the patch records)."""
    return f"{HERE}:data_{task.replace('-', '_')}"


@contextmanager
def hook_environment(seed: int, shots: int) -> Iterator[None]:
    """The seed and the regime's shots where the data hooks read them (each set back as it was afterwards)."""
    with datamerge.seed_variable(seed):
        previous = os.environ.get(SHOTS_VARIABLE)
        os.environ[SHOTS_VARIABLE] = str(shots)
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(SHOTS_VARIABLE, None)
            else:
                os.environ[SHOTS_VARIABLE] = previous


def key(density: float) -> str:
    return f"{density:g}"


# ---------------------------------------------------------------------------------------------------------------
# one localization, the head-only floor, the overlaps


def localized(pretrained: Path, tuned: Path, task: str, density: float, head: str, out: Path, settings: Settings):
    """`splice.localize` of fine-tune `tuned` on task `task`'s hook, saved at `out`; its scores and how it ran."""
    outcome = splice.localize(
        pretrained,
        tuned,
        data_hook(task),
        density=density,
        steps=settings.steps,
        lr=settings.lr,
        l1=settings.l1,
        candidates=settings.candidates,
        seed=datamerge.study_seed(),
        head=head,
        out=out,
        device="cpu",
    )
    scores = {name: asdict(outcome.scores[name]) for name in SCORED}
    tuned_accuracy, pretrained_accuracy = scores["fine_tuned"]["accuracy"], scores["pretrained"]["accuracy"]
    gain = tuned_accuracy - pretrained_accuracy
    return {
        "scores": scores,
        "kept": {graft: scores[graft]["accuracy"] / tuned_accuracy for graft in GRAFTS},
        "gain_kept": {
            graft: (scores[graft]["accuracy"] - pretrained_accuracy) / gain if gain else None for graft in GRAFTS
        },
        "selected": outcome.selected,
        "eligible": outcome.eligible,
        "parameters": outcome.parameters,
        "carried": outcome.carried,
        "losses": outcome.losses,
        "best_step": outcome.best_step,
        "seconds": outcome.seconds,
        "patch": str(outcome.out),
        "placement": placement(Path(outcome.out)),
    }


def head_only(
    template: torch.nn.Module, pretrained: Path, tuned: Path, carried: Sequence[str], task: str, seed: int
) -> dict[str, float]:
    """Accuracy and ECE on task `task`'s test images of the pretrained model with the fine-tune's `carried` head."""
    state = load_file(pretrained / "model.safetensors")
    fine_tuned = load_file(tuned / "model.safetensors")
    state.update({name: fine_tuned[name] for name in carried})
    return scored(digits.load_state(template, state), task, seed)


def scored(model: torch.nn.Module, task: str, seed: int) -> dict[str, float]:
    x, y = datamerge.task_split(task, "test", seed)
    with torch.no_grad():
        return asdict(calibration(model(pixel_values=x).logits, y))


def placement(patch: Path) -> dict[str, dict[str, int]]:
    """Where a stored region lies (`splice inspect`'s counts): its entries per layer and per module type inside the
    layers (the carried head, outside them, left out)."""
    where = mask_placement(splice.Patch.load(patch))
    rows = [row for row in where.rows if row.layer is not None]
    return {
        "layers": {row.name: row.total.selected for row in rows},
        "modules": {
            module: sum(row.cells[module].selected for row in rows if module in row.cells) for module in where.modules
        },
    }


def eligible_placement(pretrained: Path) -> dict[str, dict[str, int]]:
    """The layers' entries (where a region may lie) per layer and per module type: a region spread evenly over them
    would lie in these proportions."""
    counts: dict[str, dict[str, int]] = {"layers": {}, "modules": {}}
    for name, value in load_file(pretrained / "model.safetensors").items():
        index = layer_index(name)
        if index is not None:
            for where, label in (("layers", str(index)), ("modules", layer_module(name) or name)):
                counts[where][label] = counts[where].get(label, 0) + value.numel()
    return counts


def region(patch: Path) -> dict[str, torch.Tensor]:
    """The learned region a stored localized patch holds: its masks, the carried head left out."""
    stored = splice.Patch.load(patch)
    settings = stored.meta.settings
    carried = set(settings["localized"]["carried"])
    return {
        name: unpack_mask(stored.tensors[name + ".mask"], tuple(shape))
        for name, shape in settings["shapes"].items()
        if name not in carried
    }


def magnitude_region(pretrained: Path, tuned: Path, size: int) -> dict[str, torch.Tensor]:
    """The top `size` entries of |theta_ft - theta_pre| over the layers' changed tensors (where a region may lie)."""
    pre, ft = load_file(pretrained / "model.safetensors"), load_file(tuned / "model.safetensors")
    changes = {
        name: (ft[name].float() - value.float()).abs()
        for name, value in pre.items()
        if layer_index(name) is not None and not torch.equal(value, ft[name])
    }
    return top_k_over(changes, size)


def jaccard(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    """|A and B| / |A or B| of two regions over all their tensors."""
    names = set(first) | set(second)
    shared = sum(int((first[n] & second[n]).sum()) for n in names if n in first and n in second)
    union = sum(int(first[n].sum()) for n in first) + sum(int(second[n].sum()) for n in second) - shared
    return shared / union


def overlaps(regions: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Every pair's Jaccard ("A|B"), and their mean."""
    pairs = {f"{a}|{b}": jaccard(regions[a], regions[b]) for a, b in combinations(TASKS, 2)}
    return {"pairs": pairs, "mean": datamerge.mean(list(pairs.values()))}


# ---------------------------------------------------------------------------------------------------------------
# merges


def stitch_available() -> bool:
    """Whether this splice has Localize-and-Stitch (a method splice does not know is left out, never approximated)."""
    from splice.merge.methods import SPLICE_METHODS, method_names

    return STITCH in {*method_names(), *SPLICE_METHODS}


def stitch_recipe(pretrained: Path, tuned: dict[str, Path], patches: dict[str, str]) -> dict[str, Any]:
    return {
        "merge_method": STITCH,
        "base_model": str(pretrained),
        "models": [{"model": str(tuned[task]), "mask": patches[task]} for task in TASKS],
    }


def merged(recipe: dict[str, Any], out: Path, seed: int) -> dict[str, Any]:
    """`recipe` merged into `out` and reloaded by transformers: its test accuracy per task, and the merge's time."""
    mark = time.perf_counter()
    splice.merge(parse_recipe(recipe), out, device="cpu")
    seconds = time.perf_counter() - mark
    return {
        "test": datamerge.accuracies(digits.load_model(out), "test", seed),
        "seconds": seconds,
        "directory": str(out),
    }


def merges(
    workdir: Path,
    pretrained: Path,
    tuned: dict[str, Path],
    patches: dict[str, dict[str, dict[str, str]]],
    seed: int,
    settings: Settings,
) -> dict[str, dict[str, Any]]:
    """Averaging, task arithmetic and TIES (lambda picked on val, as datamerge_digits does) of the fine-tunes
    `tuned`, and Localize-and-Stitch of their regions `patches` ({head: {density: {task: patch}}}) if available."""
    training = settings.training
    template = digits.load_model(pretrained)
    results: dict[str, dict[str, Any]] = {}
    for method in BASELINES:
        values: dict[str, Any] = {}
        if method != "averaging":
            lambdas = training.task_arithmetic_lambdas if method == "task arithmetic" else training.ties_lambdas
            extra = {"density": training.ties_density} if method == "TIES" else {}
            make = functools.partial(datamerge.lambda_recipe, method, pretrained, tuned, extra)
            values["lambda"], values["val_by_lambda"] = datamerge.pick_lambda(lambdas, make, template, seed)
            values.update(extra)
        recipe = datamerge.recipe_for(method, pretrained, tuned, {}, **values)
        results[method] = {**values, **merged(recipe, workdir / f"merged-{method.replace(' ', '-')}", seed)}
    if stitch_available():
        for head, by_density in patches.items():
            for density, regions in by_density.items():
                out = workdir / f"merged-stitch-{density}-head-{head}"
                results[stitch_name(density, head)] = merged(stitch_recipe(pretrained, tuned, regions), out, seed)
    return results


def stitch_name(density: str, head: str) -> str:
    return f"Localize-and-Stitch {density} (head {head})"


# ---------------------------------------------------------------------------------------------------------------
# one regime of one seed, and one seed


def run_regime(workdir: Path, pretrained: Path, seed: int, regime: Regime, settings: Settings) -> dict[str, Any]:
    started = time.perf_counter()
    workdir.mkdir(parents=True)
    training = dataclasses.replace(settings.training, finetune_lr=regime.lr)
    tuned: dict[str, Path] = {}
    tuning: dict[str, Any] = {}
    localizations: dict[str, dict[str, dict[str, Any]]] = {head: {} for head in settings.heads}
    with hook_environment(seed, regime.shots):
        for index, task in enumerate(TASKS):  # datamerge_digits' fine-tune seeds: its fine-tunes, in the full regime
            tuned[task] = workdir / f"fine-tuned-{task}"
            data = train_split(task, seed, regime.shots)
            tuning[task] = datamerge.fine_tune(
                pretrained, data, tuned[task], 1000 * seed + index + 1, regime.steps, training
            )
        tuning_seconds = time.perf_counter() - started
        for head in settings.heads:
            for density in settings.densities:
                localizations[head][key(density)] = {
                    task: localized(
                        pretrained,
                        tuned[task],
                        task,
                        density,
                        head,
                        workdir / f"region-{task}-{key(density)}-{head}",
                        settings,
                    )
                    for task in TASKS
                }
    localizing_seconds = time.perf_counter() - started - tuning_seconds
    any_run = next(iter(next(iter(localizations.values())).values()))
    references = {
        name: {task: any_run[task]["scores"][scored_as] for task in TASKS}
        for name, scored_as in (("fine-tuned", "fine_tuned"), ("pretrained", "pretrained"))
    }
    if "fine-tuned" in localizations:
        template = digits.load_model(pretrained)
        carried = {task: any_run[task]["carried"] for task in TASKS}
        references["head only"] = {
            task: head_only(template, pretrained, tuned[task], carried[task], task, seed) for task in TASKS
        }
    overlap = {
        head: {density: region_overlaps(pretrained, tuned, by_task) for density, by_task in by_density.items()}
        for head, by_density in localizations.items()
    }
    patches = {
        head: {density: {task: record["patch"] for task, record in by_task.items()} for density, by_task in d.items()}
        for head, d in localizations.items()
    }
    merging = merges(workdir, pretrained, tuned, patches, seed, settings)
    return {
        "regime": asdict(regime),
        "fine-tuning": tuning,
        "references": references,
        "localizations": localizations,
        "overlap": overlap,
        "merges": merging,
        "seconds": {
            "fine-tune": tuning_seconds,
            "localize": localizing_seconds,
            "total": time.perf_counter() - started,
        },
    }


def region_overlaps(pretrained: Path, tuned: dict[str, Path], by_task: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The tasks' learned regions (read from their stored patches) and magnitude regions of the same sizes: pairwise
    Jaccard, each learned region against its own magnitude region, and the chance level."""
    learned = {task: region(Path(record["patch"])) for task, record in by_task.items()}
    magnitude = {task: magnitude_region(pretrained, tuned[task], by_task[task]["selected"]) for task in TASKS}
    density = by_task[TASKS[0]]["selected"] / by_task[TASKS[0]]["eligible"]
    return {
        "learned": overlaps(learned),
        "magnitude": overlaps(magnitude),
        "learned_vs_magnitude": {task: jaccard(learned[task], magnitude[task]) for task in TASKS},
        "chance": density / (2 - density),  # E|A and B| / E|A or B| of two random regions of this density
    }


def run_seed(workdir: Path, seed: int, settings: Settings) -> dict[str, Any]:
    started = time.perf_counter()
    workdir.mkdir(parents=True)
    pretrained = workdir / "pretrained"
    pretraining = datamerge.pretrain(pretrained, seed, settings.training)
    regimes = {
        regime.name: run_regime(workdir / regime.name, pretrained, seed, regime, settings)
        for regime in settings.regimes
    }
    return {
        "seed": seed,
        "pretraining": pretraining,
        "eligible_placement": eligible_placement(pretrained),
        "regimes": regimes,
        "seconds": time.perf_counter() - started,
    }


# ---------------------------------------------------------------------------------------------------------------
# over seeds


def numbers(record: dict[str, Any]) -> dict[str, float]:
    """One localization's numbers by name: each model's accuracy and ECE, each graft's kept share, the best step."""
    values = {f"{model}_{what}": record["scores"][model][what] for model in SCORED for what in ("accuracy", "ece")}
    values.update({f"{graft}_kept": record["kept"][graft] for graft in GRAFTS})
    values["best_step"] = record["best_step"]
    return values


def with_average(per_task: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """{task: {name: value}} and its "average" over the tasks, name by name; for grafts, the average's share of the
    fine-tune's gain over the pretrained model, (graft - pretrained) / (fine-tune - pretrained)."""
    names = per_task[TASKS[0]]
    average = {name: datamerge.mean([per_task[t][name] for t in TASKS]) for name in names}
    if "fine_tuned_accuracy" in average:
        pretrained, gain = (
            average["pretrained_accuracy"],
            average["fine_tuned_accuracy"] - average["pretrained_accuracy"],
        )
        average.update({f"{graft}_gain_kept": (average[f"{graft}_accuracy"] - pretrained) / gain for graft in GRAFTS})
    return {**per_task, "average": average}


def over_seeds(tables: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """Tables of the same shape ({row: {name: value}}), one per seed -> {row: {name: mean, std, per seed}}."""
    return {
        row: {name: datamerge.spread([t[row][name] for t in tables]) for name in tables[0][row]} for row in tables[0]
    }


def shares(placements: list[dict[str, dict[str, int]]]) -> dict[str, dict[str, float]]:
    """Placements (entries per layer and per module type) pooled: each label's share of all their entries."""
    pooled: dict[str, dict[str, float]] = {}
    for where in ("layers", "modules"):
        counts: dict[str, int] = {}
        for one in placements:
            for label, count in one[where].items():
                counts[label] = counts.get(label, 0) + count
        total = sum(counts.values())
        pooled[where] = {label: count / total for label, count in sorted(counts.items())}
    return pooled


def summarise_regime(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over the seeds of one regime: per head, density and task (and the average over tasks) each
    model's accuracy and ECE and each graft's kept share; the references; the overlaps; the merges."""
    first = runs[0]
    grafting: dict[str, Any] = {}
    for head, by_density in first["localizations"].items():
        grafting[head] = {}
        for density, by_task in by_density.items():
            tables = [with_average({t: numbers(r["localizations"][head][density][t]) for t in TASKS}) for r in runs]
            grafting[head][density] = {
                "selected": by_task[TASKS[0]]["selected"],
                "eligible": by_task[TASKS[0]]["eligible"],
                "parameters": by_task[TASKS[0]]["parameters"],
                "tasks": over_seeds(tables),
                "placement": shares([r["localizations"][head][density][t]["placement"] for r in runs for t in TASKS]),
            }
    references = {
        name: over_seeds([with_average(run["references"][name]) for run in runs]) for name in first["references"]
    }
    overlap: dict[str, Any] = {}
    for head, by_density in first["overlap"].items():
        overlap[head] = {}
        for density, one in by_density.items():
            per_seed = [run["overlap"][head][density] for run in runs]
            overlap[head][density] = {
                "learned": datamerge.spread([o["learned"]["mean"] for o in per_seed]),
                "magnitude": datamerge.spread([o["magnitude"]["mean"] for o in per_seed]),
                "learned_vs_magnitude": datamerge.spread(
                    [datamerge.mean(list(o["learned_vs_magnitude"].values())) for o in per_seed]
                ),
                "chance": one["chance"],
                "learned_pairs": {
                    pair: datamerge.spread([o["learned"]["pairs"][pair] for o in per_seed])
                    for pair in one["learned"]["pairs"]
                },
            }
    own = [run["references"]["fine-tuned"] for run in runs]
    merging: dict[str, Any] = {}
    for method in first["merges"]:
        tests = [run["merges"][method]["test"] for run in runs]
        averages = [datamerge.mean([t[task] for task in TASKS]) for t in tests]
        merging[method] = {task: datamerge.spread([t[task] for t in tests]) for task in TASKS}
        merging[method]["average"] = datamerge.spread(averages)
        merging[method]["normalized"] = datamerge.spread(
            [a / datamerge.mean([o[task]["accuracy"] for task in TASKS]) for a, o in zip(averages, own)]
        )
    return {"grafting": grafting, "references": references, "overlap": overlap, "merges": merging}


def run_study(
    report: Path,
    seeds: Sequence[int],
    settings: Settings,
    *,
    workdir: Path | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """The study over `seeds`; the report's JSON and PNG written into `report` (existing ones refused unless
    `force`); models and patches in `workdir` (refused if it exists, unless `force`: then replaced), else in a
    temporary directory removed at the end."""
    protected = [workdir] if workdir is not None else []
    started = time.perf_counter()
    with datamerge.study_workspace(report, workdir, force, [JSON_NAME, PNG_NAME], "splice-localize-digits-") as where:
        runs = [run_seed(where / f"seed-{seed}", seed, settings) for seed in seeds]
    results = {
        "settings": asdict(settings),
        "tasks": list(TASKS),
        "seeds": list(seeds),
        "stitch": stitch_available(),
        "eligible_placement": shares([runs[0]["eligible_placement"]]),
        "summary": {
            regime.name: summarise_regime([run["regimes"][regime.name] for run in runs]) for regime in settings.regimes
        },
        "runs": runs,
        "seconds": time.perf_counter() - started,
        "versions": datamerge.versions(),
    }
    write_report_files(
        report,
        {
            JSON_NAME: (json.dumps(results, indent=2) + "\n").encode(),
            PNG_NAME: png_bytes(draw(results), size=(22.0, 8.5 * len(settings.regimes)), layout="constrained"),
        },
        force,
        protected,
    )
    return results


# ---------------------------------------------------------------------------------------------------------------
# the tables and the figure


def cell(value: dict[str, Any], scale: float = 100, places: int = 1) -> str:
    return f"{scale * value['mean']:.{places}f} ± {scale * value['std']:.{places}f}"


def describe(regime: dict[str, Any]) -> str:
    images = f"{regime['shots']} images per class" if regime["shots"] else "all 647 training images"
    return (
        f"regime `{regime['name']}`: every weight fine-tuned on {images}, lr {regime['lr']:g}, {regime['steps']} steps"
    )


def regime_tables(results: dict[str, Any], name: str) -> list[str]:
    summary = results["summary"][name]
    regime = next(r for r in results["settings"]["regimes"] if r["name"] == name)
    references = summary["references"]
    lines = [f"### {describe(regime)}", ""]
    lines.append(
        "references (test accuracy % / ECE %, average over tasks): "
        + "; ".join(
            f"{ref} {cell(values['average']['accuracy'])} / {cell(values['average']['ece'])}"
            for ref, values in references.items()
        )
    )
    lines += [
        "",
        "| head | density | region entries | learned graft | magnitude graft | learned kept | magnitude kept "
        "| learned gain kept | magnitude gain kept | learned ECE | magnitude ECE | best step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for head, by_density in summary["grafting"].items():
        for density, graft in by_density.items():
            row = graft["tasks"]["average"]
            lines.append(
                f"| {head} | {density} | {graft['selected']} of {graft['eligible']} "
                f"| {cell(row['learned_graft_accuracy'])} | {cell(row['magnitude_graft_accuracy'])} "
                f"| {cell(row['learned_graft_kept'])} | {cell(row['magnitude_graft_kept'])} "
                f"| {cell(row['learned_graft_gain_kept'])} | {cell(row['magnitude_graft_gain_kept'])} "
                f"| {cell(row['learned_graft_ece'])} | {cell(row['magnitude_graft_ece'])} "
                f"| {cell(row['best_step'], 1)} |"
            )
    for head, by_density in summary["grafting"].items():
        densities = list(by_density)
        lines += [
            "",
            f"per task, head {head}: test accuracy % (learned graft / magnitude graft at each density)",
            "",
            "| task | fine-tune | pretrained | "
            + ("head only | " if head == "fine-tuned" else "")
            + " | ".join(f"learned {d}" for d in densities)
            + " | "
            + " | ".join(f"magnitude {d}" for d in densities)
            + " |",
            "|---|" + "---:|" * (2 + (head == "fine-tuned") + 2 * len(densities)),
        ]
        for task in [*TASKS, "average"]:
            floor = f"{cell(references['head only'][task]['accuracy'])} | " if head == "fine-tuned" else ""
            lines.append(
                f"| {task} | {cell(references['fine-tuned'][task]['accuracy'])} "
                f"| {cell(references['pretrained'][task]['accuracy'])} | {floor}"
                + " | ".join(cell(by_density[d]["tasks"][task]["learned_graft_accuracy"]) for d in densities)
                + " | "
                + " | ".join(cell(by_density[d]["tasks"][task]["magnitude_graft_accuracy"]) for d in densities)
                + " |"
            )
    lines += [
        "",
        "overlap of the regions between tasks (Jaccard, mean over the 10 task pairs; the layers' entries):",
        "",
        "| head | density | learned regions | magnitude regions | learned vs own magnitude region | chance |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for head, by_density in summary["overlap"].items():
        for density, overlap in by_density.items():
            lines.append(
                f"| {head} | {density} | {cell(overlap['learned'], 1, 3)} | {cell(overlap['magnitude'], 1, 3)} "
                f"| {cell(overlap['learned_vs_magnitude'], 1, 3)} | {overlap['chance']:.4f} |"
            )
    eligible = results["eligible_placement"]
    layers, modules = list(eligible["layers"]), list(eligible["modules"])
    lines += [
        "",
        "where the learned regions lie: share % of their entries per layer and module type (pooled over tasks and "
        "seeds; the first row: the layers' entries themselves)",
        "",
        "| head | density | " + " | ".join(f"layer {layer}" for layer in layers) + " | " + " | ".join(modules) + " |",
        "|---|---:|" + "---:|" * (len(layers) + len(modules)),
        "| (all entries) | | "
        + " | ".join(
            f"{100 * eligible[w][label]:.1f}"
            for w, labels in (("layers", layers), ("modules", modules))
            for label in labels
        )
        + " |",
    ]
    for head, by_density in summary["grafting"].items():
        for density, graft in by_density.items():
            where = graft["placement"]
            lines.append(
                f"| {head} | {density} | "
                + " | ".join(
                    f"{100 * where[w].get(label, 0.0):.1f}"
                    for w, labels in (("layers", layers), ("modules", modules))
                    for label in labels
                )
                + " |"
            )
    lines += ["", "merges: test accuracy %", ""]
    lines += [
        "| merge | " + " | ".join(TASKS) + " | average | normalized |",
        "|---|" + "---:|" * (len(TASKS) + 2),
    ]
    own = references["fine-tuned"]
    lines.append(
        "| fine-tuned (own task) | " + " | ".join(cell(own[t]["accuracy"]) for t in [*TASKS, "average"]) + " | |"
    )
    pre = references["pretrained"]
    lines.append("| pretrained | " + " | ".join(cell(pre[t]["accuracy"]) for t in [*TASKS, "average"]) + " | |")
    for method, row in summary["merges"].items():
        lines.append(
            f"| {method} | " + " | ".join(cell(row[t]) for t in [*TASKS, "average"]) + f" | {cell(row['normalized'])} |"
        )
    return lines


def table(results: dict[str, Any]) -> str:
    lines = [f"seeds {results['seeds']}, mean ± std over seeds; ECE in %"]
    for name in results["summary"]:
        lines += ["", *regime_tables(results, name)]
    if not results["stitch"]:
        lines += ["", f"not run: Localize-and-Stitch (this splice has no merge method `{STITCH}`)"]
    lines.append(f"\nwall time: {results['seconds']:.0f} s")
    return "\n".join(lines)


def draw(results: dict[str, Any]) -> Callable[[Any], None]:
    def _draw(figure: Any) -> None:
        import numpy as np

        summary = results["summary"]
        rows = figure.subfigures(len(summary), 1, squeeze=False)[:, 0]
        styles = {"fine-tuned": "-", "pretrained": "--"}
        for subfigure, (name, regime) in zip(rows, summary.items()):
            subfigure.suptitle(f"regime {name}: mean over seeds {results['seeds']}", fontsize="medium")
            axes = subfigure.subplots(2, 5)
            references = regime["references"]
            for axis, task in zip(axes[0], [*TASKS]):
                accuracy_lines(axis, regime, task, styles)
            accuracy_lines(axes[1][0], regime, "average", styles)
            ece = axes[1][1]
            for head, by_density in regime["grafting"].items():
                densities = [float(d) for d in by_density]
                for graft, color in (("learned_graft", "tab:blue"), ("magnitude_graft", "tab:orange")):
                    means = [by_density[d]["tasks"]["average"][f"{graft}_ece"]["mean"] for d in by_density]
                    ece.plot(densities, means, styles[head], color=color, marker="o", label=f"{graft} (head {head})")
            for ref, color in (("fine-tuned", "tab:green"), ("pretrained", "tab:gray"), ("head only", "tab:purple")):
                if ref in references:
                    ece.axhline(references[ref]["average"]["ece"]["mean"], color=color, ls=":", label=ref)
            ece.set_xscale("log")
            ece.set_title("ECE, average over tasks", fontsize="small")

            jaccards = axes[1][2]
            for head, by_density in regime["overlap"].items():
                densities = [float(d) for d in by_density]
                for kind, color in (("learned", "tab:blue"), ("magnitude", "tab:orange")):
                    means = [by_density[d][kind]["mean"] for d in by_density]
                    jaccards.plot(
                        densities, means, styles[head], color=color, marker="o", label=f"{kind} (head {head})"
                    )
                jaccards.plot(densities, [by_density[d]["chance"] for d in by_density], ":", color="tab:gray")
            jaccards.set_xscale("log")
            jaccards.set_yscale("log")
            jaccards.set_title("Jaccard between tasks' regions (dotted: chance)", fontsize="small")
            jaccards.legend(fontsize="xx-small")

            matrix = axes[1][3]
            head = next(iter(regime["overlap"]))
            density = key(1e-2) if key(1e-2) in regime["overlap"][head] else list(regime["overlap"][head])[-1]
            pairs = regime["overlap"][head][density]["learned_pairs"]
            grid = np.full((len(TASKS), len(TASKS)), np.nan)
            for i, j in combinations(range(len(TASKS)), 2):
                grid[i, j] = grid[j, i] = pairs[f"{TASKS[i]}|{TASKS[j]}"]["mean"]
            matrix.imshow(grid, cmap="viridis", vmin=0, vmax=max(0.05, float(np.nanmax(grid))))
            for i in range(len(TASKS)):
                for j in range(len(TASKS)):
                    if i != j:
                        matrix.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize="xx-small", color="w")
            matrix.set_xticks(range(len(TASKS)), TASKS, rotation=30, ha="right", fontsize="x-small")
            matrix.set_yticks(range(len(TASKS)), TASKS, fontsize="x-small")
            matrix.set_title(f"Jaccard of learned regions, density {density}, head {head}", fontsize="small")

            bars = axes[1][4]
            names = ["fine-tuned (own task)", "pretrained", *regime["merges"]]
            means = [references["fine-tuned"]["average"]["accuracy"]["mean"]]
            means += [references["pretrained"]["average"]["accuracy"]["mean"]]
            means += [row["average"]["mean"] for row in regime["merges"].values()]
            colors = ["tab:green", "tab:gray", *["tab:blue" if m in BASELINES else "tab:red" for m in regime["merges"]]]
            bars.barh(range(len(names)), means, color=colors)
            bars.set_yticks(range(len(names)), names, fontsize="xx-small")
            bars.invert_yaxis()
            bars.set_xlim(0, 1)
            bars.set_title("merges: average test accuracy", fontsize="small")
            for i, value in enumerate(means):
                bars.text(value + 0.01, i, f"{100 * value:.1f}", va="center", fontsize="xx-small")

    return _draw


def accuracy_lines(axis: Any, regime: dict[str, Any], task: str, styles: dict[str, str]) -> None:
    """Test accuracy of the learned and magnitude grafts against density (one line per head), and the references."""
    references = regime["references"]
    for head, by_density in regime["grafting"].items():
        densities = [float(d) for d in by_density]
        for graft, color in (("learned_graft", "tab:blue"), ("magnitude_graft", "tab:orange")):
            means = [by_density[d]["tasks"][task][f"{graft}_accuracy"]["mean"] for d in by_density]
            axis.plot(densities, means, styles[head], color=color, marker="o", label=f"{graft} (head {head})")
    for ref, color in (("fine-tuned", "tab:green"), ("pretrained", "tab:gray"), ("head only", "tab:purple")):
        if ref in references:
            axis.axhline(references[ref][task]["accuracy"]["mean"], color=color, ls=":", label=ref)
    axis.set_xscale("log")
    axis.set_ylim(0, 1)
    axis.set_title(f"{task}: test accuracy", fontsize="small")
    axis.set_xlabel("density (of the layers' entries)", fontsize="x-small")
    if task == "average":
        axis.legend(fontsize="xx-small")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, required=True, help="directory for the JSON and PNG report")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default 0 1 2")
    parser.add_argument("--workdir", type=Path, help="keep the models and patches here (default: temporary)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run: fewer steps and densities")
    parser.add_argument("--force", action="store_true", help="replace existing report files (and --workdir)")
    args = parser.parse_args(argv)
    results = run_study(args.report, args.seeds, QUICK if args.quick else FULL, workdir=args.workdir, force=args.force)
    print(table(results))
    print(f"wrote {args.report / JSON_NAME}, {args.report / PNG_NAME}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
