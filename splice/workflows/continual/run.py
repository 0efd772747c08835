"""`splice continual run PIPELINE.yaml [--resume]`: per task a key and a LayerNorm slot, every seen task evaluated,
the task pushed to the registry (slot, key, head, metrics) as a new version with alias `task-<i>` (1-based: task-1
is the first task, as the progress counts them; see splice.workflows.continual.aliases for older registries).

A task counts as done when its version reached the registry; it is evaluated before it is pushed, so each version
carries its row of the accuracy matrix and a rerun with `--resume` rebuilds the bank, the head and the matrix from
the registry and continues with the next task. Every task seeds its own random generators from the pipeline's
seed and its index, so a resumed run ends with the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from splice.adapters.patch import Patch
from splice.continual import align
from splice.continual.bank import LayerNormBank
from splice.continual.data import TaskData, check_protocol, load_task
from splice.continual.fisher import fisher_diagonal, subset_masks
from splice.continual.model import (
    classification_head,
    head_parameters,
    head_state_of,
    load_head,
    load_model,
)
from splice.continual.train import (
    Schedule,
    Training,
    align_head,
    dry_run,
    evaluate,
    rectify_head,
    task_key,
    train_slot,
)
from splice.errors import Interrupted, SpliceError
from splice.progress import NoProgress, Progress
from splice.registry.manifest import VersionManifest
from splice.registry.store import Registry
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.device import resolve_device
from splice.tensors.writer import check_report_dir
from splice.workflows.continual.aliases import alias_of, check_aliased_task, uses_legacy_aliases
from splice.workflows.continual.pipeline import ClassifierAlignment, Pipeline, load_pipeline, task_seed
from splice.workflows.continual.report import REPORT_FILES, ContinualReport
from splice.workflows.continual.state import RunState
from splice.workflows.continual.stored import Values, pretrained_values, stored_entries, task_patch, task_values


@dataclass(frozen=True)
class _Run:
    """What every task of one run works with."""

    pipeline: Pipeline
    store: Registry
    bank: LayerNormBank
    head_names: list[str]  # stored names of the classification head's tensors
    tuned: list[str]  # stored names of the norm tensors the pipeline tunes
    pretrained: Values  # the base's values of both
    tasks: list[TaskData]
    state: RunState
    progress: Progress


def run_pipeline(
    pipeline: Pipeline | str | os.PathLike,
    *,
    resume: bool = False,
    registry: Registry | str | None = None,
    report_dir: str | os.PathLike | None = None,
    progress: Progress | None = None,
    storage_options: dict | None = None,
    force: bool = False,
) -> ContinualReport:
    """Run (or resume) a continual pipeline; returns its report (also written to `report_dir` as JSON + PNGs;
    files of an earlier report there are refused before any work unless `force`).
    Bad pipelines (unknown keys, a task without data, overlapping classes under class-incremental, inputs the model
    cannot take, a registry holding another pipeline under the name) are refused before any training. Ctrl-C once
    tasks are in the registry raises Interrupted (a KeyboardInterrupt) saying which."""
    pipeline = pipeline if isinstance(pipeline, Pipeline) else load_pipeline(pipeline)
    progress = progress or NoProgress()
    location = registry if isinstance(registry, Registry) else registry or pipeline.registry  # the call's, the file's
    if report_dir is not None:
        where = location.url if isinstance(location, Registry) else location
        check_report_dir(report_dir, [p for p in (pipeline.base, where) if p], REPORT_FILES, force)
    tasks = [load_task(spec.name, spec.data) for spec in pipeline.tasks]
    bank, head_names = _bank(pipeline)
    check_protocol(tasks, pipeline.protocol, bank.model.config.num_labels or 0)
    tuned = tuned_norms(bank, pipeline.norms)
    dry_run(bank, tasks, pipeline.batch_size)
    if pipeline.align is not None:
        align.check_alignable(bank, head_names, tasks[0])
    pretrained = pretrained_values(pipeline.base, [*bank.tensor_names, *head_names])
    # the registry is created (when nothing is there yet) only once the pipeline has passed every check
    store = location if isinstance(location, Registry) else Registry.init(location, storage_options)
    done, legacy = _finished_tasks(store, pipeline, resume)
    state = RunState(kept=len(done), legacy_aliases=legacy)
    run = _Run(pipeline, store, bank, head_names, tuned, pretrained, tasks, state, progress)
    try:
        if done:
            progress.start(f"restoring {len(done)} task(s) from the registry", len(done), 0, unit="tasks")
            for ref in done:
                _restore(store, ref, pipeline.base, bank, pretrained, state)
                progress.advance(1, 0)
            progress.finish()
        for index in range(len(done), len(tasks)):
            _run_task(run, index)
            state.kept = index + 1
    except KeyboardInterrupt as exc:
        state.kept = max(state.kept, _aliased_tasks(store, pipeline, state.legacy_aliases))
        if not state.kept:
            raise
        raise Interrupted(_kept(pipeline, state)) from exc
    head_size = sum(p.numel() for p in head_parameters(bank.model, head_names))
    report = ContinualReport.of(pipeline, tasks, state, bank, head_size)
    if report_dir is not None:
        report.save(report_dir, force)
    return report


def _bank(pipeline: Pipeline) -> tuple[LayerNormBank, list[str]]:
    model = load_model(pipeline.base, resolve_device(pipeline.device))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    bank = LayerNormBank(model)
    return bank, classification_head(model)


def _aliased_tasks(store: Registry, pipeline: Pipeline, legacy: bool) -> int:
    """How many of the pipeline's tasks, in order, the registry holds under their aliases now: a Ctrl-C can land
    after a task's push finished and before this run counted it (a task pushed but not aliased is taken up by
    --resume all the same)."""
    try:
        aliases = store.aliases(pipeline.name)
    except (SpliceError, OSError):
        return 0
    count = 0
    while count < len(pipeline.tasks) and alias_of(count, legacy) in aliases:
        count += 1
    return count


def _kept(pipeline: Pipeline, state: RunState) -> str:
    last = alias_of(state.kept - 1, state.legacy_aliases)
    kept = "task 1 is" if state.kept == 1 else f"tasks 1-{state.kept} are"
    return (
        f"{kept} kept in the registry ({pipeline.name}@{alias_of(0, state.legacy_aliases)}"
        f"{'' if state.kept == 1 else f' .. {pipeline.name}@{last}'}); run it again with --resume (resume=True) "
        f"to go on with task {state.kept + 1} of {len(pipeline.tasks)}"
    )


def _other_pipelines(versions: Iterable[VersionManifest], pipeline: Pipeline) -> list[VersionManifest]:
    """The versions whose recorded pipeline digest is not `pipeline`'s for the tasks up to theirs."""
    return [
        m
        for m in versions
        if m.meta.settings.get("pipeline") != pipeline.digest(int(m.meta.settings.get("task", -1)) + 1)
    ]


def _finished_tasks(store: Registry, pipeline: Pipeline, resume: bool) -> tuple[list[str], bool]:
    """Refs (in task order) of this pipeline's finished tasks, and whether the registry numbers their aliases from
    task-0 (written before the 1-based numbering). Task i's version records the digest of the
    pipeline's first i + 1 tasks, so a pipeline that grew by tasks resumes after them; a version that does not
    match is another pipeline's, refused. A task pushed but not yet aliased (a run stopped in between) is taken
    up: its alias is set now. An alias moved onto another task's version is refused, naming it. A version whose
    blobs are missing is not taken up: its task runs again."""
    if store.latest_version(pipeline.name) is None:
        return [], False
    versions = {m.version: m for m in store.versions(pipeline.name) if not store.missing_blobs(m)}
    other = _other_pipelines(versions.values(), pipeline)
    unaligned = pipeline.model_copy(update={"align": None})
    if other and pipeline.align is not None and not _other_pipelines(other, unaligned):
        raise SpliceError(
            f"registry name {pipeline.name} holds this pipeline's results made without classifier "
            f"alignment ({other[0].ref}), from before align: became the default; add `align: null` to "
            "the pipeline file to go on with them, or give this pipeline another name"
        )
    if other:
        raise SpliceError(
            f"registry name {pipeline.name} already holds another pipeline's results "
            f"({other[0].ref}); give this pipeline another name, or remove them"
        )
    aliases = store.aliases(pipeline.name)
    done: list[str] = []
    legacy = uses_legacy_aliases(aliases)
    while len(done) < len(pipeline.tasks):
        index = len(done)
        alias = aliases.get(alias_of(index, legacy))
        if alias is None or alias.version not in versions:
            pushed = [m for m in versions.values() if m.meta.settings.get("task") == index]
            if not pushed or not resume:
                break
            alias = store.tag(pipeline.name, alias_of(index, legacy), max(m.version for m in pushed))
        check_aliased_task(
            store, pipeline.name, alias.alias, alias.version, versions[alias.version].meta.settings, index
        )
        done.append(versions[alias.version].ref)
    if done and not resume:
        raise SpliceError(
            f"registry name {pipeline.name} already holds tasks 1..{len(done)} of this pipeline; "
            f"pass `resume=True` to continue after them"
        )
    return done, legacy


def _restore(store: Registry, ref: str, base: str, bank: LayerNormBank, pretrained: Values, state: RunState) -> None:
    """A finished task back from the registry: its slot and key, the head as it was after it, its matrix row."""
    patch = store.load(ref)
    settings, metrics = patch.meta.settings, patch.meta.metrics
    with Checkpoint.open(base) as checkpoint:  # the pipeline's base moved or changed: refused, not mixed
        patch.check_base(checkpoint)
    restore_task(bank, patch, pretrained)
    slot = int(settings["task"])
    state.matrix.append([metrics[f"accuracy.{j}"] for j in range(slot + 1)])
    state.oracle.append([metrics[f"oracle_accuracy.{j}"] for j in range(slot + 1)])
    state.task_id.append(metrics["task_id_accuracy"])
    state.losses.append({k: v for k, v in metrics.items() if k.startswith("loss.")})
    state.stored.append(stored_entries(patch))
    state.statistics.append(align.decode(settings))
    state.resumed += 1


def restore_task(bank: LayerNormBank, patch: Patch, pretrained: Values) -> int:
    """A new slot (from the pretrained norms) holding a stored task's values, its key set, the head loaded. The
    patch's tensors are read together (from a registry: one ranged read per pack, not one per tensor)."""
    values = task_values(patch.in_memory(), pretrained)
    settings = patch.meta.settings
    slot = bank.add_task(key=torch.tensor(settings["key"], dtype=torch.float32), init_from="pretrained")
    bank.slots.requires_grad_(False)  # restored slots are values, not trained here
    bank.load_slot(slot, {name: values[name] for name in settings["slot"]})
    load_head(bank.model, {name: values[name] for name in settings["head"]})
    return slot


def _schedule(pipeline: Pipeline) -> Schedule:
    return Schedule(
        pipeline.epochs, pipeline.lr, pipeline.head_lr, pipeline.rectify_epochs or pipeline.epochs, pipeline.batch_size
    )


def tuned_norms(bank: LayerNormBank, norms: str | list[str]) -> list[str]:
    """Stored names of the gamma/beta tensors the pipeline tunes: every norm's, or those whose name contains one of
    the given substrings (each must match some norm)."""
    names = sorted(bank.tensor_names)
    if norms == "all":
        return names
    for pattern in norms:
        if not any(pattern in name for name in names):
            raise SpliceError(f"norms: {pattern!r} matches no norm of the model (they are named like {names[0]})")
    return [name for name in names if any(pattern in name for pattern in norms)]


def _run_task(run: _Run, index: int) -> None:
    pipeline, bank, head_names, tuned, pretrained = run.pipeline, run.bank, run.head_names, run.tuned, run.pretrained
    task, state = run.tasks[index], run.state
    seed = task_seed(pipeline.seed, index)
    torch.manual_seed(seed)
    label = f"task {index + 1}/{len(run.tasks)} {task.name}"
    training = Training(_schedule(pipeline), torch.Generator().manual_seed(seed), run.progress, label)
    key = task_key(
        bank,
        task,
        training.schedule,
        training.generator,
        trained=pipeline.keys == "trained",
        epochs=pipeline.key_epochs,
        lr=pipeline.key_lr,
    )
    slot = bank.add_task(key=key, init_from="pretrained" if pipeline.fisher else None)
    bank.slots.requires_grad_(False)  # train_slot turns on the tuned entries; no other slot takes gradients
    head = head_parameters(bank.model, head_names)
    parameters = {name: bank.slot_parameters(slot)[name] for name in tuned}
    masks = None
    if pipeline.fisher is not None:
        masks = subset_masks(fisher_diagonal(bank, slot, parameters, task), pipeline.fisher, training.generator)
    losses = {
        "loss.layernorm": train_slot(
            bank, slot, list(parameters.values()), head, task, training, _grad_masks(parameters, masks)
        )
    }
    if pipeline.rectify:
        losses["loss.head"] = rectify_head(bank, head, task, training)
    for parameter in head:
        parameter.requires_grad_(False)
    every = bank.slot_state(slot)

    def stored(settings: dict) -> Patch:
        return task_patch(
            pipeline.base,
            {n: every[n].cpu() for n in tuned},
            head_state_of(bank.model, head_names),
            pretrained,
            masks,
            settings,
            f"continual pipeline {pipeline.name}, task {slot + 1}: {task.name}",
        )

    patch = stored(_settings(pipeline, task, slot, key))
    if pipeline.align is not None:
        patch = stored(_aligned(run, patch, pipeline.align, task, training, losses))
    values = task_values(patch, pretrained)  # go on from the task exactly as stored (what --resume reads back)
    bank.load_slot(slot, {name: values[name] for name in patch.meta.settings["slot"]})
    load_head(bank.model, {name: values[name] for name in head_names})
    result = evaluate(
        bank,
        run.tasks[: index + 1],
        pipeline.protocol,
        training.schedule.batch_size,
        run.progress,
        label,
        pipeline.inference,
    )
    state.matrix.append(result.accuracy)
    state.oracle.append(result.oracle_accuracy)
    state.task_id.append(result.task_id_accuracy)
    state.losses.append(losses)
    state.stored.append(stored_entries(patch))
    patch.meta.metrics = {
        **{f"accuracy.{j}": a for j, a in enumerate(result.accuracy)},
        **{f"oracle_accuracy.{j}": a for j, a in enumerate(result.oracle_accuracy)},
        "task_id_accuracy": result.task_id_accuracy,
        **losses,
    }
    alias = alias_of(index, state.legacy_aliases)
    run.progress.start(f"{label} pushing to the registry as {pipeline.name}@{alias}", 1, 0, unit="versions")
    run.store.push(pipeline.name, patch, alias=alias, message=f"{pipeline.name}: {label}")
    run.progress.advance(1, 0)
    run.progress.finish()


def _grad_masks(
    parameters: dict[str, torch.nn.Parameter], masks: dict[str, torch.Tensor] | None
) -> dict[int, torch.Tensor] | None:
    if masks is None:
        return None
    return {id(parameter): masks[name].to(parameter.dtype) for name, parameter in parameters.items()}


def _settings(pipeline: Pipeline, task: TaskData, slot: int, key: torch.Tensor) -> dict:
    """What a task's version says about itself (beside the slot and head names the patch adds)."""
    settings = {
        "pipeline": pipeline.digest(slot + 1),
        "pipeline_settings": pipeline.digest(0),
        "task": slot,
        "task_name": task.name,
        "key": [float(v) for v in key.tolist()],
        "classes": task.classes,
        "protocol": pipeline.protocol,
    }
    if pipeline.fisher is not None:
        settings["fisher"] = pipeline.fisher.model_dump(mode="json")
    if pipeline.inference != "all-classes":
        settings["inference"] = pipeline.inference
    return settings


def _aligned(
    run: _Run,
    patch: Patch,
    alignment: ClassifierAlignment,
    task: TaskData,
    training: Training,
    losses: dict[str, float],
) -> dict:
    """Classifier alignment after the task: its classes' feature statistics (with its slot as stored), then the
    head re-trained on draws from every seen class's; the settings of the task's version, with its statistics."""
    bank, head_names = run.bank, run.head_names
    slot = int(patch.meta.settings["task"])
    values = task_values(patch, run.pretrained)
    bank.load_slot(slot, {name: values[name] for name in patch.meta.settings["slot"]})
    module = align.head_module(bank.model, head_names)
    features = align.head_features(bank, module, slot, task.train, training.schedule.batch_size)
    settings = {
        **patch.meta.settings,
        align.SETTINGS_KEY: align.encode(align.class_statistics(features, task.train["labels"])),
    }
    run.state.statistics.append(align.decode(settings))  # as a resumed run reads them back
    sampled, labels = align.sample_features(run.state.statistics, alignment.samples, training.generator)
    head = head_parameters(bank.model, head_names)
    losses["loss.alignment"] = align_head(module, head, sampled, labels, alignment.lr, alignment.epochs, training)
    for parameter in head:
        parameter.requires_grad_(False)
    return settings
