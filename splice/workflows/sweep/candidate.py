"""One candidate of a sweep, evaluated where a worker runs it (the driver's process, a local pool's process, or a Ray
task): merged into memory and handed to the evaluation hook without being written (unless the sweep keeps every
candidate). Whatever the merge or the evaluation raises, or a score that is not a finite number, comes back as the
candidate's one-line error: a sweep records it and goes on.

Everything here is plain data that pickles (a local pool and Ray both ship it to other processes)."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from splice.adapters.apply import patched_state
from splice.adapters.port import prepare_port, write_ported
from splice.errors import SpliceError, first_line
from splice.hooks import Scorer, load_callable, score_state
from splice.merge.recipe import parse_recipe
from splice.merge.soup import add_to_soup, soup_of
from splice.options import RunOptions
from splice.tensors.device import resolve_device
from splice.workflows.merge import merge, merged_model
from splice.workflows.references import model_location, open_model_references
from splice.workflows.sweep.subjects import port_spec, subject_kind

Value = bool | int | float | str


@dataclass(frozen=True)
class Evaluator:
    """What every candidate of one sweep shares: the hook (MODULE:FUNCTION or an absolute file path), the arguments
    passed to it unchanged, where the merge runs, and the seed of the random merge methods."""

    hook: str
    args: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    storage_options: dict[str, Any] | None = None
    seed: int | None = None

    @property
    def run(self) -> RunOptions:
        return RunOptions(device=self.device, storage_options=self.storage_options)


@dataclass(frozen=True)
class MergeCandidate:
    """Trial `number`: the recipe (a merge recipe, or a port) filled with its `values`; `keep_dir`: also write the
    candidate's model there."""

    number: int
    values: dict[str, Value]
    recipe: dict[str, Any]
    keep_dir: str | None = None


@dataclass(frozen=True)
class SoupCandidate:
    """A greedy soup's candidate: the soup of `kept` (in the order they were kept) with `ingredient` joined to it,
    or the one ingredient in `kept` scored on its own when `ingredient` is None."""

    number: int
    kept: tuple[str, ...]
    ingredient: str | None = None


Candidate = MergeCandidate | SoupCandidate


@dataclass(frozen=True)
class Outcome:
    """What evaluating a candidate gave: a finite score, or the one-line error that stopped it."""

    number: int
    score: float | None
    error: str | None = None
    merge_seconds: float = 0.0
    eval_seconds: float = 0.0
    worker: str = ""

    @property
    def failed(self) -> bool:
        return self.score is None


def evaluate(candidate: Candidate, evaluator: Evaluator) -> Outcome:
    """Merge `candidate` into memory and score it; any error is the outcome's one line, never raised."""
    started = time.perf_counter()
    merged = started
    worker = f"{socket.gethostname()}:{os.getpid()}"
    try:
        with _merged(candidate, evaluator) as (state, model_dir):
            merged = time.perf_counter()
            score = score_state(_scorer(evaluator), state, model_dir, "evaluate.hook")
    except Exception as exc:  # the sweep records the candidate as failed and goes on
        now = time.perf_counter()
        merge_seconds = (merged if merged > started else now) - started
        return Outcome(candidate.number, None, _one_line(exc), merge_seconds, now - merged, worker)
    return Outcome(candidate.number, score, None, merged - started, time.perf_counter() - merged, worker)


def _one_line(error: Exception) -> str:
    return first_line(error) if isinstance(error, SpliceError) else f"{type(error).__name__}: {first_line(error)}"


@contextlib.contextmanager
def _merged(candidate: Candidate, evaluator: Evaluator) -> Iterator[tuple[dict[str, torch.Tensor], str]]:
    """The candidate's tensors and a model directory whose config is the candidate's, for the hook's time."""
    if isinstance(candidate, SoupCandidate):
        yield _soup(candidate, evaluator), model_location(candidate.kept[0])
        return
    if subject_kind(candidate.recipe) == "port":
        yield _port(candidate, evaluator)
        return
    recipe = parse_recipe(candidate.recipe, f"trial {candidate.number}")
    run = evaluator.run
    model = merged_model(recipe, seed=evaluator.seed, run=run)
    if candidate.keep_dir is not None:  # the sweep's own directory: a re-run trial (resumed, retried) replaces it
        merge(recipe, candidate.keep_dir, seed=evaluator.seed, run=run.replace(force=True))
        yield model.state, candidate.keep_dir
    elif model.extras.config_updates or model.extras.files:  # a new depth or vocabulary: not the inputs' config
        with tempfile.TemporaryDirectory(prefix="splice-candidate-") as directory:
            model.write_side_files(Path(directory))
            yield model.state, directory
    else:
        yield model.state, model_location(recipe.side_files_source())


def _port(candidate: MergeCandidate, evaluator: Evaluator) -> tuple[dict[str, torch.Tensor], str]:
    """The patch ported at the candidate's scale and applied to the new base, as `splice port --scale` does."""
    spec = port_spec(candidate.recipe, f"trial {candidate.number}")
    run = evaluator.run
    ported = prepare_port(spec.patch, spec.to, old_base=spec.old_base, scale=spec.scale, run=run)
    state = patched_state([ported.patch], spec.to, check_bases=False, run=run)
    if candidate.keep_dir is not None:
        write_ported(ported, spec.to, out=candidate.keep_dir, run=run.replace(force=True))
        return state, candidate.keep_dir
    return state, spec.to


# The soup a worker built last: speculative rounds join several ingredients to the same soup, and the next round
# extends it by one, so a worker rebuilds it only when the soup it is asked for is not the one it holds.
_last_soup: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}


def _soup(candidate: SoupCandidate, evaluator: Evaluator) -> dict[str, torch.Tensor]:
    device = resolve_device(evaluator.device)
    soup = _last_soup.get(candidate.kept)
    if soup is None:
        (held, held_soup), *_ = _last_soup.items() or [((), {})]
        _last_soup.clear()
        kept = candidate.kept
        if held and len(kept) == len(held) + 1 and kept[:-1] == held:  # one more ingredient joined
            (joined,) = open_model_references([kept[-1]], evaluator.storage_options)
            soup = add_to_soup(held_soup, len(held), joined, device)
        else:
            soup = soup_of(open_model_references(list(kept), evaluator.storage_options), device)
        _last_soup[kept] = soup
    if candidate.ingredient is None:
        return soup
    (ingredient,) = open_model_references([candidate.ingredient], evaluator.storage_options)
    return add_to_soup(soup, len(candidate.kept), ingredient, device)


def forget_sweep() -> None:
    """Drop what this process kept for its sweep once the sweep is done: the soup (it may be a model's size, and the
    ingredients may be rewritten before the next sweep asks for a soup of the same paths) and the imported hooks (a
    hook file edited between two sweeps is imported again)."""
    _last_soup.clear()
    _hook.cache_clear()


@functools.lru_cache(maxsize=4)
def _hook(hook: str) -> Callable:
    """The hook, imported once per worker process."""
    return load_callable(hook, option="`evaluate.hook`")


def _scorer(evaluator: Evaluator) -> Scorer:
    """The hook with the sweep's `args` bound as keywords."""
    function = _hook(evaluator.hook)
    return functools.partial(function, **evaluator.args) if evaluator.args else function
