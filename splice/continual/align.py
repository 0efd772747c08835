"""Classifier alignment from per-class feature statistics (SLCA, Zhang et al. 2023): each task keeps the mean and
covariance of the features its classes give the head (made with the task's own slot), in its version's settings;
after each task the head is re-trained on features drawn from a Gaussian per seen class, so the rows of every
class, old and new, are fitted together without any old data."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from splice.arch.names import stored_to_module_names
from splice.continual.bank import LayerNormBank, eval_mode
from splice.continual.data import TaskData, batches
from splice.continual.train import inputs_of
from splice.errors import SpliceError

SETTINGS_KEY = "class_statistics"


@dataclass(frozen=True)
class ClassStatistics:
    count: int
    mean: torch.Tensor  # [D] float64
    covariance: torch.Tensor  # [D, D] float64, unbiased (n - 1); zeros for a class of one sample


def head_module(model: torch.nn.Module, head_names: list[str]) -> torch.nn.Module:
    """The module holding the head's tensors (a Linear for ViT and BERT classification heads)."""
    modules = {stored_to_module_names(model)[name].rpartition(".")[0] for name in head_names}
    if len(modules) != 1:
        raise SpliceError(
            f"classifier alignment needs a head that is one linear layer; this one spans "
            f"{', '.join(sorted(modules))}: set align: null in the pipeline"
        )
    return model.get_submodule(modules.pop())


@contextmanager
def _captured(head: torch.nn.Module) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """What `head` takes and gives, collected while the block runs."""
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = head.register_forward_hook(lambda module, args, output: captured.append((args[0].detach(), output)))
    try:
        yield captured
    finally:
        handle.remove()


def _per_input(taken: torch.Tensor, given: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
    """[B, D] the feature vector behind each input's logits. A head fed one vector per input took it; a decoder's
    score layer takes every token's and the model keeps one token's logits (the last one not padding): that
    token is found as the one whose head output is exactly the model's logits. None when none is."""
    if taken.dim() == 2:
        return taken
    if taken.dim() != 3 or given.shape[:2] != taken.shape[:2] or logits.dim() != 2:
        return None
    same = (given == logits[:, None, :]).all(dim=-1)  # [B, T]
    if not bool(same.any(dim=-1).all()):
        return None
    last = (same.long() * torch.arange(1, same.shape[1] + 1, device=same.device)).argmax(dim=-1)
    return taken[torch.arange(taken.shape[0], device=taken.device), last]


def _features_of(
    bank: LayerNormBank, head: torch.nn.Module, inputs: dict[str, torch.Tensor], ids: torch.Tensor | None
) -> torch.Tensor | None:
    """One forward pass (slots `ids`; None: the pretrained norms) and the head's feature vector per input."""
    with _captured(head) as captured, eval_mode(bank.model):
        logits = (bank(task_ids=ids, **inputs) if ids is not None else bank.model(**inputs)).logits
    if len(captured) != 1:
        return None
    return _per_input(*captured[0], logits)


@torch.no_grad()
def head_features(
    bank: LayerNormBank, head: torch.nn.Module, slot: int, inputs: dict[str, torch.Tensor], batch_size: int
) -> torch.Tensor:
    """[N, D] the feature vector the head turns into each input's logits, run with slot `slot` (eval mode)."""
    found = []
    for part in batches(inputs, batch_size, device=bank.keys.device):
        ids = torch.full((next(iter(part.values())).shape[0],), slot, dtype=torch.long)
        features = _features_of(bank, head, inputs_of(part), ids)
        if features is None:  # check_alignable refused such a model before anything was trained
            raise SpliceError("classifier alignment: the head's inputs no longer match the model's logits")
        found.append(features)
    return torch.cat(found)


@torch.no_grad()
def check_alignable(bank: LayerNormBank, head_names: list[str], task: TaskData) -> None:
    """Refuse, before anything is trained, a model whose head is not one linear layer giving each input's logits
    from one feature vector: one pass of two inputs with the pretrained norms."""
    head = head_module(bank.model, head_names)
    if not isinstance(head, torch.nn.Linear):
        raise SpliceError(
            f"classifier alignment needs a linear head; {type(bank.model).__name__}'s is "
            f"{type(head).__name__}: set align: null in the pipeline"
        )
    sample = {name: value[:2].to(bank.keys.device) for name, value in inputs_of(task.train).items()}
    if _features_of(bank, head, sample, None) is None:
        raise SpliceError(
            f"classifier alignment needs the logits to come from one feature vector per input; "
            f"{type(bank.model).__name__}'s do not: set align: null in the pipeline"
        )


def class_statistics(features: torch.Tensor, labels: torch.Tensor) -> dict[int, ClassStatistics]:
    """Per class: sample count, mean and unbiased covariance of its features (in float64)."""
    found = {}
    for cls in sorted(int(c) for c in labels.unique()):
        x = features[labels.to(features.device) == cls].double().cpu()
        covariance = torch.cov(x.T) if x.shape[0] > 1 else torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        found[cls] = ClassStatistics(x.shape[0], x.mean(dim=0), covariance.reshape(x.shape[1], x.shape[1]))
    return found


def encode(statistics: dict[int, ClassStatistics]) -> dict:
    """The statistics as a task version keeps them in its settings (JSON floats: float64 exactly)."""
    return {
        str(cls): {"count": s.count, "mean": s.mean.tolist(), "covariance": s.covariance.tolist()}
        for cls, s in statistics.items()
    }


def decode(settings: dict) -> dict[int, ClassStatistics]:
    """A task version's statistics back from its settings ({} when it has none)."""
    return {
        int(cls): ClassStatistics(
            int(s["count"]),
            torch.tensor(s["mean"], dtype=torch.float64),
            torch.tensor(s["covariance"], dtype=torch.float64),
        )
        for cls, s in settings.get(SETTINGS_KEY, {}).items()
    }


def sample_features(
    statistics: list[dict[int, ClassStatistics]], per_class: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` draws from N(mean, covariance) of every class of every task (by class, then task: a class two
    tasks share, task-incremental, is drawn from each), float32, and their labels. The covariance's square root
    comes from its eigendecomposition (negative rounding noise clamped to 0), so a singular covariance (fewer
    samples than dimensions) needs no added ridge."""
    features, labels = [], []
    every = sorted(
        ((cls, index, stats) for index, task in enumerate(statistics) for cls, stats in task.items()),
        key=lambda found: found[:2],
    )
    for cls, _, stats in every:
        values, vectors = torch.linalg.eigh(stats.covariance)
        root = vectors * values.clamp(min=0).sqrt()
        noise = torch.randn(per_class, stats.mean.shape[0], generator=generator, dtype=torch.float64)
        features.append((stats.mean + noise @ root.T).float())
        labels.append(torch.full((per_class,), cls, dtype=torch.long))
    return torch.cat(features), torch.cat(labels)
