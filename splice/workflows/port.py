"""`splice port`: a patch from a directory, a PEFT adapter or the registry, ported onto an evolved base; the ported
patch written, applied or pushed; scores before and after (with an evaluation hook); the port kept in the
source version's health history."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from typing_extensions import Unpack

from splice.adapters.drift import REPORT_FILES
from splice.adapters.live import patched_state
from splice.adapters.patch import Patch
from splice.adapters.port import Ported, check_port_outputs, patch_label, run_port
from splice.adapters.sources import PatchSource, load_patch, patch_location
from splice.errors import SpliceError
from splice.hooks import hook_name, load_callable, score_state
from splice.options import RunKeywords, RunOptions, run_options
from splice.registry.health import DriftSummary, HealthRecord
from splice.registry.manifest import PushStats, VersionManifest
from splice.registry.refs import RegistryError
from splice.registry.store import Registry, open_registry
from splice.tensors.checkpoint import Checkpoint, recorded_location
from splice.tensors.writer import check_report_dir


@dataclass
class PortOutcome:
    ported: Ported  # the ported patch, its drift report, what was written
    source: VersionManifest | None = None  # the registry version ported (None: a patch directory or adapter)
    pushed: VersionManifest | None = None
    push_stats: PushStats | None = None  # the blob bytes the push wrote and reused
    score_before: float | None = None  # the patch on its own base
    score_after: float | None = None  # the ported patch on the new base
    report_files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def drift(self):
        return self.ported.drift


def is_registry_ref(patch: PatchSource) -> bool:
    """A string that names no directory or URL is a registry ref (name, name@3, name@prod, name@sha256:...)."""
    return isinstance(patch, str) and "://" not in patch and not Path(patch).exists()


def port(
    patch: PatchSource,
    to: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    as_patch: str | os.PathLike | None = None,
    push: str | None = None,
    alias: str | None = None,
    message: str = "",
    old_base: str | os.PathLike | None = None,
    scale: float = 1.0,
    registry: Registry | str | None = None,
    evaluate: str | Callable | None = None,
    report_dir: str | os.PathLike | None = None,
    run: RunOptions | None = None,
    **run_keywords: Unpack[RunKeywords],
) -> PortOutcome:
    """Port a patch (a directory, a PEFT adapter, or a registry ref) onto the evolved base `to`; write the ported
    model (`out`), the ported patch (`as_patch`), and/or push it as the next version of `push`. Each base is read
    once: the drift is measured while the ported model streams into its staged output, which is published only once
    the report is in it and every check (and `evaluate`'s scores) passed. A registry version's port is kept in
    its health history (`registry show NAME`), with the scores `evaluate` gave before and after porting. `run`
    (or its fields as keywords: device, shard_size, force, progress, storage_options, ...) says how it runs."""
    run = run_options(run, run_keywords, "port")
    storage_options, force = run.storage_options, run.force
    if out is None and as_patch is None and push is None:
        raise SpliceError(
            "say where the port goes: `out=DIR` (the ported model), `as_patch=DIR` (the ported "
            "patch) or `push=NAME` (the ported patch as a registry version)"
        )
    store = open_registry(registry, storage_options) if push is not None or is_registry_ref(patch) else None
    if push is not None and store is not None:
        store.check_push(push, alias)
    source, loaded, label = _source(patch, store, to, storage_options)
    scorer = load_callable(evaluate) if isinstance(evaluate, str) else evaluate
    check_port_outputs(loaded, to, old_base, out, as_patch, force, also_protected=[store.url] if store else [])
    if report_dir is not None:
        inputs = (to, old_base, None if is_registry_ref(patch) else patch_location(patch), store.url if store else None)
        check_report_dir(report_dir, [p for p in inputs if p is not None], REPORT_FILES, force)
    scores: dict[str, float | None] = {}

    def scored(ported: Ported) -> Ported:
        """Before the port is published: the scores `evaluate` gives (a score it refuses stops the port)."""
        if scorer is None or evaluate is None:
            return ported
        hook = hook_name(evaluate)
        scores["before"], scores["after"] = _scores(scorer, hook, loaded, ported.patch, to, old_base, storage_options)
        return _scored(ported, scores["before"], scores["after"])

    ported = run_port(
        loaded,
        to,
        out=out,
        as_patch=as_patch,
        old_base=old_base,
        scale=scale,
        source=label,
        run=run,
        draw_report=report_dir is not None,
        vet=scored,
    )
    outcome = PortOutcome(ported, source, score_before=scores.get("before"), score_after=scores.get("after"))
    if report_dir is not None:
        outcome.report_files = ported.drift.save(Path(report_dir), force)
    if push is not None and store is not None:
        pushed = store.push(push, ported.patch, alias=alias, message=message or ported.patch.meta.lineage[-1])
        outcome.pushed, outcome.push_stats = pushed.manifest, pushed.stats
    if source is not None and store is not None:
        outcome.warnings += record_port(store, source, ported, str(to), outcome, out or as_patch)
    return outcome


def _source(
    patch: PatchSource, store: Registry | None, to: str | os.PathLike, storage_options: dict | None
) -> tuple[VersionManifest | None, Patch, str]:
    """(the registry version, or None; the loaded patch; how the lineage names it)."""
    if store is not None and is_registry_ref(patch):
        version = store.resolve(patch)
        return version, store.load(version.ref), version.ref
    with Checkpoint.open(to, storage_options) as base:
        loaded = load_patch(patch, storage_options, base=base)
    return None, loaded, patch_label(patch)


def _scores(
    scorer: Callable,
    hook: str,
    patch: Patch,
    ported: Patch,
    to: str | os.PathLike,
    old_base: str | os.PathLike | None,
    storage_options: dict | None,
) -> tuple[float | None, float]:
    """The evaluation before porting (`patch` on its own base, when it is given; else None) and after (`ported`
    on the new base), each on a model built in memory."""
    before = None
    if old_base is not None:
        with Checkpoint.open(old_base, storage_options) as old:
            before = score_state(scorer, patched_state(old, [patch]), str(old_base), hook)
    with Checkpoint.open(to, storage_options) as new:
        return before, score_state(scorer, patched_state(new, [ported]), str(to), hook)


def _scored(ported: Ported, before: float | None, after: float | None) -> Ported:
    """`ported` with the scores that were measured in its patch's metrics (score_before_port, score_after_port)."""
    scores = {
        key: value for key, value in (("score_before_port", before), ("score_after_port", after)) if value is not None
    }
    if not scores:
        return ported
    meta = ported.patch.meta.model_copy(update={"metrics": {**ported.patch.meta.metrics, **scores}})
    return replace(ported, patch=Patch(ported.patch.tensors, meta))


def record_port(
    store: Registry,
    source: VersionManifest,
    ported: Ported,
    base: str,
    outcome: PortOutcome | None,
    output: str | os.PathLike | None,
) -> list[str]:
    """Keep the port in the source version's health history; a warning (not a failure: the port itself is
    done) when the registry cannot take the record."""
    drift = ported.drift
    record = HealthRecord(
        event="port",
        version=source.version,
        digest=source.digest,
        base=base,
        base_digest=drift.new_digest,
        base_check=f"ported: {drift.verdict}",
        drift=DriftSummary.model_validate(drift.summary()),
        score_before=outcome.score_before if outcome else None,
        score_after=outcome.score_after if outcome else None,
        ported_to=outcome.pushed.ref if outcome and outcome.pushed else None,
        output=str(output) if output is not None else None,
    )
    return record_health(store, source.name, record)


def record_health(store: Registry, name: str, record: HealthRecord) -> list[str]:
    record = record.model_copy(
        update={"base": recorded_location(record.base), "output": record.output and recorded_location(record.output)}
    )
    try:
        store.record_health(record, name)
    except (RegistryError, OSError) as exc:
        return [f"the registry did not take the health record of {name}@{record.version}: {exc}"]
    return []
