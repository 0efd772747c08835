"""A small real soup task: a tiny ViT on scikit-learn's 8x8 digits (ships with scikit-learn, no download).

One base model is pretrained on one part of the data; ingredients are fine-tuned from that same init on
another part with different learning rates, seeds and augmentation; a held-out part scores candidates
(greedy soup) and a test part reports the result.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import ViTConfig, ViTForImageClassification

from splice.arch.names import stored_to_module_names
from splice.arch.quiet import quiet_transformers
from splice.errors import SpliceError
from splice.tensors.checkpoint import Checkpoint

IMAGE_SIZE = 8
NUM_LABELS = 10
# Fractions of the 1797 images, in split order; test takes the rest.
SPLIT_FRACTIONS = {"pretrain": 0.4, "finetune": 0.3, "val": 0.15}

StateDict = Mapping[str, torch.Tensor]


class Split(NamedTuple):
    x: torch.Tensor  # [N, 1, 8, 8] float32 in [0, 1]
    y: torch.Tensor  # [N] int64 labels 0..9


@dataclass(frozen=True)
class DigitsSplits:
    pretrain: Split  # trains the shared base model
    finetune: Split  # trains the ingredients
    val: Split  # held out: scores ingredients and greedy candidates
    test: Split  # touched only to report


def load_digits_splits(seed: int = 0) -> DigitsSplits:
    """Disjoint pretrain / finetune / val / test splits of the digits, shuffled with `seed`."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise SpliceError("the digits workflow needs scikit-learn: pip install 'splice[demo]'") from exc
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    parts, start = {}, 0
    for name, fraction in SPLIT_FRACTIONS.items():
        stop = start + round(fraction * len(y))
        parts[name] = Split(x[order[start:stop]], y[order[start:stop]])
        start = stop
    return DigitsSplits(**parts, test=Split(x[order[start:]], y[order[start:]]))


def model_config() -> ViTConfig:
    config = ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=2,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    config.num_labels = NUM_LABELS
    return config


def new_model(seed: int = 0) -> ViTForImageClassification:
    """A freshly initialised tiny ViT (about 18k parameters); the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ViTForImageClassification(model_config())


@dataclass(frozen=True)
class Augmentation:
    """Random translation by up to `shift` pixels (zero fill) and Gaussian pixel noise of std `noise`."""

    noise: float = 0.0
    shift: int = 0


def augment(x: torch.Tensor, generator: torch.Generator, noise: float = 0.0, shift: int = 0) -> torch.Tensor:
    """Random translation by up to `shift` pixels (zero fill) and Gaussian pixel noise of std `noise`."""
    if shift > 0:
        count = len(x)
        padded = F.pad(x, (shift, shift, shift, shift))
        dy, dx = torch.randint(0, 2 * shift + 1, (2, count, 1), generator=generator)
        span = torch.arange(IMAGE_SIZE)
        rows, cols = (dy + span)[:, :, None], (dx + span)[:, None, :]
        x = padded[torch.arange(count)[:, None, None], 0, rows, cols].unsqueeze(1)
    if noise > 0:
        x = (x + noise * torch.randn(x.shape, generator=generator)).clamp(0.0, 1.0)
    return x


def train(
    model: ViTForImageClassification,
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    lr: float,
    steps: int,
    seed: int = 0,
    batch_size: int = 64,
    augmentation: Augmentation = Augmentation(),
    weight_decay: float = 0.01,
) -> list[float]:
    """AdamW with cosine decay for `steps` minibatches of `data` (images, labels: a Split), reshuffled each epoch,
    each augmented as `augmentation` says; returns each step's loss.

    All randomness (order, augmentation) comes from a generator seeded with `seed`, so a run repeats exactly.
    """
    x, y = data
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    losses: list[float] = []
    model.train()
    order = torch.empty(0, dtype=torch.int64)
    with one_thread():
        for _ in range(steps):
            if len(order) < batch_size:
                order = torch.cat([order, torch.randperm(len(y), generator=generator)])
            batch, order = order[:batch_size], order[batch_size:]
            images = augment(x[batch], generator, augmentation.noise, augmentation.shift)
            loss = model(pixel_values=images, labels=y[batch]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    model.eval()
    return losses


def checkpoint_names(model: ViTForImageClassification) -> dict[str, str]:
    """Map from the tensor names `save_pretrained` writes to the names in `model.state_dict()`."""
    return stored_to_module_names(model)


def load_state(
    model: ViTForImageClassification, state: StateDict, names: Mapping[str, str] | None = None
) -> ViTForImageClassification:
    """Load a state dict keyed by module names or by on-disk names (see `checkpoint_names`)."""
    if set(state) != set(model.state_dict()):
        names = names if names is not None else checkpoint_names(model)
        state = {names.get(name, name): tensor for name, tensor in state.items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


@torch.no_grad()
def accuracy(
    model: ViTForImageClassification | StateDict,
    x: torch.Tensor,
    y: torch.Tensor,
    model_dir: str | os.PathLike | None = None,
) -> float:
    """Top-1 accuracy of a model, or of a state dict loaded into the model saved in `model_dir`."""
    if not isinstance(model, torch.nn.Module):
        if model_dir is None:
            raise SpliceError("accuracy of a state dict needs model_dir, a saved model to load it into")
        model = load_state(load_model(model_dir), model)
    model.eval()
    with one_thread():
        return (model(pixel_values=x).logits.argmax(-1) == y).float().mean().item()


def load_model(model_dir: str | os.PathLike) -> ViTForImageClassification:
    with quiet_transformers():
        return ViTForImageClassification.from_pretrained(model_dir).eval()


def make_scorer(x: torch.Tensor, y: torch.Tensor, model_dir: str | os.PathLike) -> Callable[[StateDict], float]:
    """`score(state_dict) -> accuracy on (x, y)`, for `splice.greedy_soup`; state dicts use on-disk names.

    The model is built from `model_dir` once; each call only loads the state dict into it.
    """
    model = load_model(model_dir)
    names = checkpoint_names(model)
    with Checkpoint.open(model_dir) as stored:
        if set(stored.tensors) != set(names):
            raise SpliceError(f"{model_dir}: tensor names differ from the ones transformers would save")

    def score(state: StateDict) -> float:
        return accuracy(load_state(model, state, names), x, y)

    return score


@dataclass(frozen=True)
class FineTune:
    """One ingredient's hyperparameters."""

    lr: float
    seed: int
    noise: float = 0.0
    shift: int = 0

    @property
    def augmentation(self) -> Augmentation:
        return Augmentation(self.noise, self.shift)

    @property
    def name(self) -> str:
        return f"lr{self.lr:g}-noise{self.noise:g}-shift{self.shift}-seed{self.seed}"


FINETUNE_LRS = (1e-4, 3e-4, 1e-3)
FINETUNE_AUGMENTATIONS = ((0.0, 0), (0.1, 0), (0.0, 1), (0.1, 1))  # (noise, shift)


def fine_tunes(count: int, seed: int = 0) -> list[FineTune]:
    """`count` distinct hyperparameter settings: learning rates and augmentations cycle, seeds differ."""
    recipes = []
    for i in range(count):
        noise, shift = FINETUNE_AUGMENTATIONS[i % len(FINETUNE_AUGMENTATIONS)]
        recipes.append(FineTune(FINETUNE_LRS[i % len(FINETUNE_LRS)], 1000 * seed + i + 1, noise, shift))
    return recipes


def prepare_ingredients(
    workdir: str | os.PathLike,
    count: int,
    seed: int = 0,
    *,
    pretrain_steps: int = 300,
    finetune_steps: int = 75,
    pretrain_lr: float = 3e-3,
    splits: DigitsSplits | None = None,
) -> tuple[Path, list[Path], DigitsSplits]:
    """Pretrain a base model, then fine-tune `count` ingredients from it; all saved under `workdir`.

    Returns (base model dir, ingredient dirs named after their hyperparameters, the data splits).
    """
    workdir = Path(workdir)
    splits = splits or load_digits_splits(seed)
    model = new_model(seed)
    train(model, splits.pretrain, lr=pretrain_lr, steps=pretrain_steps, seed=seed)
    base_dir = workdir / "base"
    base_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with quiet_transformers():
        model.save_pretrained(base_dir)
        ingredient_dirs = []
        for index, recipe in enumerate(fine_tunes(count, seed)):
            model.load_state_dict(base_state)
            train(
                model,
                splits.finetune,
                lr=recipe.lr,
                steps=finetune_steps,
                seed=recipe.seed,
                augmentation=recipe.augmentation,
            )
            directory = workdir / f"ingredient-{index:02d}-{recipe.name}"
            model.save_pretrained(directory)
            ingredient_dirs.append(directory)
    return base_dir, ingredient_dirs, splits


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: these matrices are too small to gain from more, and on a busy machine
    extra intra-op threads made training steps 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
