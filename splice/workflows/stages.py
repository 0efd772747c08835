"""Multi-stage recipes (what mergekit-multi runs): one YAML file of `---`-separated recipes, each with a `name`, later
ones merging earlier ones by that name, as a model, a base model or the model of a `base+lora` reference.

```yaml
name: s1
merge_method: ties
base_model: ./base
models: [{model: ./a, parameters: {weight: 0.5, density: 0.5}}, {model: ./b, parameters: {weight: 0.5}}]
---
name: s2
merge_method: slerp
base_model: s1
models: [{model: s1}, {model: ./c}]
parameters: {t: 0.3}
---
merge_method: linear        # no name: the final merge, written to `out`
models: [{model: s2, parameters: {weight: 0.7}}, {model: ./a, parameters: {weight: 0.3}}]
```

As in mergekit-multi, the document without a name is the final merge (at most one may lack a name), and a document
may name stages defined after it; when every document has a name, the last one is the final merge. The target (the
final merge, or the stage `stage=` names) runs after the stages it needs, and only those: mergekit-multi runs every
document. A name is a stage wherever a model reference says it, before any path of that name.

The cache. Every stage but the target is kept at `<intermediate_dir>/<name>/` (default `intermediate_dir`:
`<out>.stages` beside the output), with a record of its key: the sha256 of its validated recipe (stage names
resolved to their cache directories, local paths made absolute), of each input's digest (`splice.tensors.digest`:
file sizes, times and safetensors headers, so nothing is read whole to know it), of the seed and kernel choice and
of splice's version (the device is not in it: CPU and GPU give the same merge, up to rounding). A stage whose
directory holds its current key is reused and none of its tensors is read (never one whose inputs come from a
`data:` hook: what its code returns is in no key); any other runs and replaces its directory,
published atomically as every output is, so an interrupted stage leaves the old entry (whose key no longer matches)
or none, never one a rerun would trust. mergekit's `--lazy` trusts any directory that exists. The target carries the
same record in `out`: a rerun finds `out` up to date and writes nothing, and a target that must run again replaces
`out` only with `force`. A stage computed again gets new files and so a new digest: the stages after it run again
too.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from splice.errors import OutputExistsError, RecipeError, SpliceError, parameter
from splice.merge.recipe import ModelOpener, Recipe, parse_recipe, read_recipe_documents
from splice.merge.references import map_model_references, model_references
from splice.options import RunOptions
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.stream import StreamReport
from splice.tensors.writer import ensure_output_free, refuse_overlap
from splice.values import YamlDocument
from splice.version import __version__
from splice.workflows.card import MergeRecord, recorded_recipe
from splice.workflows.recorded import OpenedModels, input_digests, merge_recorded
from splice.workflows.references import recorded_reference, reference_locations
from splice.workflows.stats import statistics_locations

STAGE_RECORD = "splice_stage.json"
_STAGE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")


@dataclass(frozen=True, eq=False)
class Stage:
    name: str | None  # None: the document without a name, the final merge
    recipe: Recipe  # as written
    uses: tuple[str, ...]  # the stages it merges, by name


@dataclass
class StageRun:
    name: str | None
    status: str  # "ran"; "reused": its cache entry held its key; "up to date": `out` held it
    out: Path
    key: str
    report: StreamReport | None = None


@dataclass
class StagesReport:
    out: Path
    cache: Path
    stages: list[StageRun] = field(default_factory=list)


def read_stages(path: Path, documents: Sequence[YamlDocument]) -> list[Stage]:
    """The stages of a recipe file's documents, validated: names, no name twice, at most one document without a
    name, no stage that uses itself through others."""
    if not documents:
        raise RecipeError(f"{path}: no recipe in it; a recipe is a mapping with merge_method and models")
    stages: list[Stage] = []
    for number, document in enumerate(documents, 1):
        data = document.data
        name = data.get("name") if isinstance(data, dict) else None
        source = f"{path}[{name}]" if isinstance(name, str) else f"{path}[document {number}]"
        recipe = parse_recipe(data, source, document.key_lines)
        if recipe.name is not None and not _STAGE_NAME.match(recipe.name):
            raise RecipeError(
                f"{source}: name {recipe.name!r} is not a stage name: it names the stage's directory, so use letters, "
                "digits, '_', '.' and '-' (not first)"
            )
        if recipe.name is not None and any(s.name == recipe.name for s in stages):
            raise RecipeError(f"{path}: two documents are named {recipe.name!r}; give each stage its own name")
        if recipe.name is None and any(s.name is None for s in stages):
            raise RecipeError(f"{path}: two documents have no name; only the final merge may go without one")
        stages.append(Stage(recipe.name, recipe, ()))
    names = {s.name for s in stages if s.name is not None}
    stages = [
        Stage(s.name, s.recipe, tuple(dict.fromkeys(n for r in model_references(s.recipe) if (n := _named(r, names)))))
        for s in stages
    ]
    for stage in stages:
        _needed(stages, stage, path)  # a cycle anywhere is refused, needed or not
    return stages


def merge_stages(
    recipe_file: str | os.PathLike,
    out: str | os.PathLike,
    *,
    open_models: ModelOpener,
    run: RunOptions,
    documents: Sequence[YamlDocument] | None = None,
    stage: str | None = None,
    intermediate_dir: str | os.PathLike | None = None,
    prefer_own_kernels: bool = True,
    seed: int | None = None,
) -> StagesReport:
    """Run the final merge of a multi-stage recipe file (or the stage named `stage`) into `out`, with the stages it
    needs taken from the cache in `intermediate_dir` or run into it (see the module's docstring)."""
    recipe_file = Path(recipe_file)
    stages = read_stages(recipe_file, documents if documents is not None else read_recipe_documents(recipe_file))
    target = _target(stages, stage, recipe_file)
    order = _needed(stages, target, recipe_file)
    out = Path(out).absolute()
    cache = _cache_dir(out, intermediate_dir)
    entries = {s.name: str(cache / s.name) for s in stages if s.name is not None}
    homes = {s.name: out if s is target else cache / str(s.name) for s in order}
    resolved = {s.name: recorded_recipe(map_model_references(s.recipe, partial(_resolve, entries))) for s in order}
    opened = OpenedModels(open_models)
    outside = [recorded_reference(r) for s in order for r in s.recipe.read_models() if _named(r, set(entries)) is None]
    for reference in dict.fromkeys(outside):  # every input from outside opened before anything is written
        _open_outside(opened, reference, set(entries), recipe_file, run.storage_options)
    statistics = statistics_locations([r for s in order for r in s.recipe.read_stored()], run.storage_options)
    protected = [*reference_locations(list(dict.fromkeys(outside))), *statistics, str(recipe_file)]

    def record_of(stage: Stage) -> MergeRecord:
        recipe = resolved[stage.name]
        return MergeRecord(recipe, input_digests(recipe, opened, run.storage_options), seed, stage.name)

    records: dict[str | None, MergeRecord] = {}
    keys: dict[str | None, str] = {}
    for s in order:  # what may be reused: a stage whose inputs are all in place and whose home holds its key
        if any(u not in keys for u in s.uses):
            continue
        record = record_of(s)
        key = stage_key(record, prefer_own_kernels)
        if _holds(homes[s.name], key) and not _runs_data_hooks(s.recipe):
            records[s.name], keys[s.name] = record, key
    for s in order:  # the output rule for every directory that will be written, before any is
        if s.name in keys:
            continue
        if s is target:
            ensure_output_free(out, run.force, protected=[*protected, *(str(homes[n]) for n in homes if n != s.name)])
        else:
            _check_entry(homes[s.name], protected, out)

    report = StagesReport(out, cache)
    for s in order:
        home = homes[s.name]
        if s.name in keys:
            report.stages.append(StageRun(s.name, "up to date" if s is target else "reused", home, keys[s.name]))
            continue
        record = record_of(s)
        key = stage_key(record, prefer_own_kernels)
        stamp = {"stage": s.name, "key": key, "splice_version": __version__}
        streamed = merge_recorded(
            record,
            home,
            opened=opened,
            run=run if s is target else run.replace(force=True),  # a stale entry is splice's to replace
            prefer_own_kernels=prefer_own_kernels,
            earlier=[records[u.name] for u in _needed(stages, s, recipe_file)[:-1]],
            extra_files={STAGE_RECORD: (json.dumps(stamp, indent=2) + "\n").encode()},
        )
        records[s.name], keys[s.name] = record, key
        report.stages.append(StageRun(s.name, "ran", home, key, streamed))
    return report


def _runs_data_hooks(recipe: Recipe) -> bool:
    """Whether the stage's inputs include what user code returns (the `data:` hooks of regmean_plusplus and
    localize_stitch): that is in no key, so such a stage is never reused, whatever its directory holds."""
    return any(entry.data is not None for entry in recipe.models)


def stage_key(record: MergeRecord, prefer_own_kernels: bool) -> str:
    """What a stage's output is a function of: its validated recipe (name aside), its inputs' digests, the seed, the
    kernel choice and splice's version, as one sha256."""
    content = {
        "recipe": record.recipe.model_dump(mode="json", exclude_defaults=True, exclude={"name"}),
        "inputs": dict(record.digests),
        "seed": record.seed,
        "prefer_own_kernels": prefer_own_kernels,
        "splice": __version__,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _named(reference: str, names: set[str]) -> str | None:
    """The name in `names` that `reference` is, or is the model of (`name+lora`); None if none."""
    if reference in names:
        return reference
    head = reference.partition("+")[0]
    return head if head in names else None


def _open_outside(
    opened: OpenedModels, reference: str, names: set[str], path: Path, storage_options: dict | None
) -> None:
    """Open a reference that names no stage; one that cannot be opened and is close to a stage's name is named as
    the typo it likely is."""
    try:
        opened([reference], storage_options)
    except SpliceError as exc:
        near = difflib.get_close_matches(reference, sorted(names), n=1)
        if not near:
            raise
        raise RecipeError(
            f"{path}: {reference!r} names no stage (did you mean {near[0]!r}?) and no model it can open: {exc}"
        ) from None


def _resolve(entries: dict[str, str], reference: str) -> str:
    """A model reference with a stage's name replaced by the stage's cache directory (`s1+lora` too)."""
    named = _named(reference, set(entries))
    return reference if named is None else entries[named] + reference[len(named) :]


def _target(stages: Sequence[Stage], stage: str | None, path: Path) -> Stage:
    """The stage `stage` names, else the document without a name, else the last one."""
    if stage is None:
        return next((s for s in stages if s.name is None), stages[-1])
    for candidate in stages:
        if candidate.name == stage:
            return candidate
    names = [s.name for s in stages if s.name is not None]
    near = difflib.get_close_matches(stage, names, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    known = f"its stages are {', '.join(names)}" if names else "its documents have no names"
    raise RecipeError(f"{parameter('stage', repr(stage))}: {path} has no stage of that name{hint}; {known}")


def _needed(stages: Sequence[Stage], target: Stage, path: Path) -> list[Stage]:
    """`target` and the stages it needs, each after the stages it uses (target last); a cycle is refused."""
    by_name = {s.name: s for s in stages if s.name is not None}
    order: list[Stage] = []
    done: set[str | None] = set()

    def visit(stage: Stage, trail: list[str | None]) -> None:
        if stage.name in trail:
            cycle = " -> ".join(str(n) for n in [*trail[trail.index(stage.name) :], stage.name])
            raise RecipeError(f"{path}: stages use each other in a cycle ({cycle}); a stage may use only earlier ones")
        if stage.name in done:
            return
        for used in stage.uses:
            visit(by_name[used], [*trail, stage.name])
        done.add(stage.name)
        order.append(stage)

    visit(target, [])
    return order


def _cache_dir(out: Path, intermediate_dir: str | os.PathLike | None) -> Path:
    if intermediate_dir is None:
        return out.with_name(f"{out.name}.stages").resolve()
    if "://" in os.fspath(intermediate_dir):
        raise SpliceError(f"{parameter('intermediate_dir')} must be a local directory, got {intermediate_dir}")
    cache = Path(intermediate_dir).absolute().resolve()
    if cache.exists() and not cache.is_dir():
        raise OutputExistsError(f"{parameter('intermediate_dir')} {intermediate_dir} is a file: give a directory")
    return cache


def _holds(home: Path, key: str) -> bool:
    """Whether `home` is a published output of the stage keyed `key`: its record says so and its weights open."""
    if not (home / STAGE_RECORD).is_file():
        return False
    try:
        record = json.loads(Checkpoint.open(home).read_file(STAGE_RECORD, limit=1 << 16))
    except (SpliceError, ValueError):
        return False
    return isinstance(record, dict) and record.get("key") == key


def _check_entry(entry: Path, protected: Sequence[str], out: Path) -> None:
    """A stage's cache directory may be written: it is none of `protected` or `out` (nor holds or sits in one), and
    what is there already, if anything, is a stage splice wrote (a stale one)."""
    refuse_overlap(entry, protected, parameter_name="intermediate_dir")
    refuse_overlap(entry, [out], what=f"the output, {parameter('out')}", parameter_name="intermediate_dir")
    if entry.exists() and not (entry / STAGE_RECORD).is_file():  # not splice's: `force` replaces no such thing
        raise OutputExistsError(
            f"{parameter('intermediate_dir')} {entry.parent}: {entry.name} is there and is no stage splice wrote; "
            f"remove it or choose another {parameter('intermediate_dir')}"
        )
    ensure_output_free(entry, True, parameter_name="intermediate_dir")
