"""Model soups (Wortsman et al., 2022): uniform, weighted and greedy, on the streaming spine."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from typing_extensions import Unpack

from splice.errors import SpliceError
from splice.hooks import Scorer, hook_name, load_callable, score_state
from splice.merge.kernels import weighted_average
from splice.options import RunKeywords, RunOptions, run_options
from splice.progress import Progress
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.device import parse_dtype, resolve_device
from splice.tensors.stream import (
    OutputExtras,
    StreamReport,
    check_same_tensors,
    open_all,
    plan_same_name,
    read_floats,
    read_model,
    refuse_new_non_finite_state,
    run_stream,
)
from splice.tensors.writer import (
    copy_side_files,
    ensure_output_free,
    staged_output,
    write_state_dict,
)


def check_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if count == 0:
        raise SpliceError("no models given")
    if weights is None:
        return [1.0] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise SpliceError(f"got {len(weights)} weights for {count} models; give one weight per model")
    if not all(math.isfinite(w) for w in weights):
        raise SpliceError(f"weights must be finite numbers, got {weights}")
    return weights


def soup(
    models: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    weights: Sequence[float] | None = None,
    dtype: str | torch.dtype | None = None,
    run: RunOptions | None = None,
    **run_keywords: Unpack[RunKeywords],
) -> StreamReport:
    """Uniform (no weights) or weighted soup: sum_i w_i theta_i / sum_i w_i, streamed tensor by tensor.

    `run` (or its fields as keywords: device, shard_size, force, progress, storage_options, ...) says how the
    run runs. Tensors larger than its `chunk_bytes` are merged in blocks of rows, so memory stays flat.
    """
    run = run_options(run, run_keywords, "soup")
    weights = check_weights(weights, len(models))
    kernel = weighted_average(weights)
    out_dtype = parse_dtype(dtype)
    ensure_output_free(out, run.force, protected=models)
    checkpoints = open_all([str(m) for m in models], run.storage_options)
    plan = plan_same_name(checkpoints, out_dtype)
    kind = "uniform" if len(set(weights)) == 1 else "weighted"
    return run_stream(
        plan,
        kernel,
        out,
        side_files_from=checkpoints[0],
        run=run,
        out_dtype=out_dtype,
        extras=OutputExtras(metadata={"splice_merge_method": f"{kind} soup"}),
        description=f"{kind} soup",
    )


@dataclass
class GreedyStep:
    model: str
    score: float  # the ingredient's own held-out score
    soup_score: float | None  # the candidate soup's score when this ingredient was tried (None: the first)
    kept: bool
    tie: bool = False  # kept though the soup's score did not rise (the default rule keeps ties; --strict does not)


@dataclass
class GreedySoupReport:
    out: Path
    steps: list[GreedyStep]
    soup_score: float
    seconds: float
    shard_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # ingredients kept on a tie: the evaluation may have saturated

    @property
    def kept(self) -> list[str]:
        return [s.model for s in self.steps if s.kept]

    @property
    def best_ingredient(self) -> GreedyStep:
        return max(self.steps, key=lambda s: s.score)


def greedy_soup(
    models: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    evaluate: Scorer | str,
    *,
    strict: bool = False,
    dtype: str | torch.dtype | None = None,
    run: RunOptions | None = None,
    **run_keywords: Unpack[RunKeywords],
) -> GreedySoupReport:
    """Greedy soup: ingredients sorted by held-out score; each is kept only if the soup's score does not
    drop (`strict=True`: only if it rises, as the authors' code does).

    Memory holds the running soup and the candidate; each ingredient is read tensor by tensor.
    `evaluate(state_dict)` or `evaluate(state_dict, model_dir)` returns the held-out score.
    `run` (or its fields as keywords) as for `soup`.
    """
    started = time.perf_counter()
    run = run_options(run, run_keywords, "greedy_soup")
    scorer = load_callable(evaluate) if isinstance(evaluate, str) else evaluate
    hook = hook_name(evaluate)
    ensure_output_free(out, run.force, protected=models)
    out_dtype = parse_dtype(dtype)
    torch_device = resolve_device(run.device)
    progress = run.reporter
    locations = [str(m) for m in models]
    checkpoints = open_all(locations, run.storage_options)
    check_same_tensors(checkpoints)
    # every ingredient is read once to be scored and once more to join (or not) the soup
    progress.start(
        "greedy soup", 2 * len(checkpoints) - 1, 2 * sum(c.total_bytes for c in checkpoints), unit="models read"
    )
    scores = []
    for checkpoint in checkpoints:
        scores.append(score_state(scorer, read_floats(checkpoint, torch_device), checkpoint.location, hook))
        progress.advance(1, checkpoint.total_bytes)
    steps, soup_state, best, anchor = _select_greedily(
        locations, checkpoints, scores, scorer, hook, strict, torch_device, progress
    )
    progress.finish()
    shard_files = write_soup(soup_state, checkpoints[anchor], checkpoints, out, out_dtype, run)
    return GreedySoupReport(Path(out), steps, best, time.perf_counter() - started, shard_files, _tie_notes(steps))


def _tie_notes(steps: list[GreedyStep]) -> list[str]:
    """A line for each ingredient kept though the score did not rise: once the evaluation saturates, a tie keeps
    anything, even an untrained base."""
    return [
        f"{s.model} was kept on a tie: the soup's score stayed {s.soup_score:.4f} (its own score "
        f"{s.score:.4f}); a saturated evaluation keeps any ingredient, even an untrained base; --strict keeps "
        f"only ingredients that raise the score"
        for s in steps
        if s.tie
    ]


def _select_greedily(
    locations: list[str],
    checkpoints: list,
    scores: list[float],
    scorer: Scorer,
    hook: str,
    strict: bool,
    torch_device: torch.device,
    progress: Progress,
) -> tuple[list[GreedyStep], dict, float, int]:
    """Best ingredient first; each next one joins the running average if the soup's score does not drop.
    Returns the steps, the soup's state, its score and the index of the first (best) ingredient."""
    order = sorted(range(len(checkpoints)), key=lambda i: -scores[i])
    first = checkpoints[order[0]]
    soup_state = read_floats(first, torch_device)
    progress.advance(0, first.total_bytes)
    best = scores[order[0]]
    steps = [GreedyStep(locations[order[0]], best, None, True)]
    kept = 1
    for index in order[1:]:
        ingredient = checkpoints[index]
        candidate = add_to_soup(soup_state, kept, ingredient, torch_device)
        candidate_score = score_state(scorer, candidate, first.location, hook)
        accept = candidate_score > best if strict else candidate_score >= best
        steps.append(
            GreedyStep(locations[index], scores[index], candidate_score, accept, tie=accept and candidate_score == best)
        )
        if accept:
            soup_state, best, kept = candidate, candidate_score, kept + 1
        del candidate
        progress.advance(1, ingredient.total_bytes)
    return steps, soup_state, best, order[0]


def add_to_soup(
    soup_state: dict[str, torch.Tensor], kept: int, ingredient: Checkpoint, device: torch.device
) -> dict[str, torch.Tensor]:
    """The running average of `kept` ingredients with one more joined: every greedy soup (sequential, or a
    sweep's speculative one) computes its candidates by this one formula, so their soups agree bit for bit."""
    candidate = {}
    for name, tensor in read_model(ingredient):
        current = soup_state[name]
        if not current.is_floating_point():
            candidate[name] = current
            continue
        tensor = tensor.to(device=device, dtype=current.dtype)
        candidate[name] = current * (kept / (kept + 1)) + tensor * (1 / (kept + 1))
    return candidate


def soup_of(ingredients: Sequence[Checkpoint], device: torch.device) -> dict[str, torch.Tensor]:
    """The greedy soup of `ingredients` as kept in that order (the first, then each joined by `add_to_soup`)."""
    state = read_floats(ingredients[0], device)
    for kept, ingredient in enumerate(ingredients[1:], start=1):
        state = add_to_soup(state, kept, ingredient, device)
    return state


def write_soup(
    soup_state: dict[str, torch.Tensor],
    anchor: Checkpoint,
    checkpoints: list[Checkpoint],
    out: str | os.PathLike,
    out_dtype: torch.dtype | None,
    run: RunOptions,
) -> list[str]:
    """The greedy soup in the anchor's stored dtypes (or `out_dtype`), with the anchor's side files; refused
    if a tensor would hold NaN/Inf where the ingredients hold none."""
    stored = anchor.tensors
    final = {
        name: tensor.to(dtype=(out_dtype or stored[name].dtype) if tensor.is_floating_point() else tensor.dtype).to(
            "cpu"
        )
        for name, tensor in soup_state.items()
    }
    refuse_new_non_finite_state(final, checkpoints)
    with staged_output(out, run.force) as staging:
        write_state_dict(staging, final, run.shard_size, {"splice_merge_method": "greedy soup"})
        copy_side_files(anchor, staging, out_dtype)
    return sorted(p.name for p in Path(out).glob("*.safetensors"))


def soup_or_greedy(
    models: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    weights: Sequence[float] | None = None,
    greedy: bool = False,
    evaluate: Scorer | str | None = None,
    strict: bool = False,
    **options: Any,
) -> StreamReport | GreedySoupReport:
    """What `splice soup` runs: a greedy soup when `greedy` (which needs `evaluate`), else a uniform or
    weighted one. `options` are the ones both take (dtype, and `run` or its fields)."""
    if greedy or evaluate is not None:
        if not (greedy and evaluate is not None):
            raise SpliceError("a greedy soup needs both `greedy=True` and `evaluate=MODULE:FUNCTION`")
        if weights is not None:
            raise SpliceError("`weights` does not apply to a greedy soup")
        return greedy_soup(models, out, evaluate, strict=strict, **options)
    if strict:
        raise SpliceError("`strict=True` applies only to a greedy soup (`greedy=True` `evaluate=MODULE:FUNCTION`)")
    return soup(models, out, weights=weights, **options)
