"""Collecting the statistics the data-dependent merges need, in one pass over the user's batches through a live
transformers model: the input Gram matrix of every linear layer (RegMean) and the diagonal Fisher of every float
parameter (Fisher merging). Results are keyed by stored tensor names (`splice.arch.names`), not live module paths.

Batches are `Inputs` as `splice.merge.fusion.activations.load_inputs` makes them from the `--data` hook; the live
model comes from `live_model` (a checkpoint location) or is any transformers model.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from splice.arch.names import stored_to_module_names
from splice.errors import SpliceError
from splice.merge.fusion.activations import BATCH_SIZE, DataSource, Inputs, build_model, load_inputs, token_rows
from splice.progress import NoProgress, Progress
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.stream import read_floats

Loss = Callable[[Any, torch.Tensor], torch.Tensor]  # (model outputs, the example's labels) -> scalar
Labels = Literal["sample", "batch"]  # a Fisher's labels: sampled from the model, or the batch's


@dataclass
class Grams:
    """Input Gram matrices X^T X (fp64, [in, in]) of the linear layers, and the tokens each was summed over.

    Layers fed the identical input tensor (q/k/v; gate/up) share one matrix: `keys` maps each layer's stored
    weight name to the key of its matrix in `grams` and `tokens` (the stored weight name of the first of them)."""

    grams: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    samples: int = 0
    transposed: set[str] = field(default_factory=set)  # weights stored in x out (GPT-2's Conv1D)

    def of(self, weight: str) -> torch.Tensor:
        """The Gram matrix of the layer whose stored weight is `weight`."""
        return self.grams[self.keys[weight]]


@dataclass
class Fisher:
    """Diagonal Fisher of each float parameter (fp32, the parameter's shape), keyed by stored tensor name, and
    the number of examples it is the mean over."""

    diagonals: dict[str, torch.Tensor] = field(default_factory=dict)
    samples: int = 0
    labels: str = "sample"


def live_model(model: str | Checkpoint, device: torch.device, storage_options: dict | None = None) -> torch.nn.Module:
    """The transformers model stored at `model` (a location, or its opened checkpoint; its config's first
    `architectures` class), in fp32, eval."""
    checkpoint = model if isinstance(model, Checkpoint) else Checkpoint.open(model, storage_options)
    config, class_name = transformers_class(checkpoint, "statistics need a live model")
    return build_model(class_name, config, read_floats(checkpoint, device), device, checkpoint.location)


def transformers_class(checkpoint: Checkpoint, why: str) -> tuple[dict[str, Any], str]:
    """(config.json, the first class its `architectures` names), or one line saying there is none and `why` one is
    needed."""
    config = checkpoint.config()
    classes = (config or {}).get("architectures") or []
    if config is None or not classes:
        raise SpliceError(f"{checkpoint.location}: no config.json naming its transformers class; {why}")
    return config, classes[0]


def _inputs(batches: Inputs | DataSource, samples: int | None) -> Inputs:
    if isinstance(batches, Inputs):
        return batches
    return load_inputs(batches, samples, "")


def _stored_names(model: torch.nn.Module) -> dict[str, str]:
    """{live parameter name: stored name} for each parameter the model owns (a tied weight once, under the name
    it is stored by: named_parameters keeps the first of the names sharing one tensor)."""
    live_to_stored = {live: stored for stored, live in stored_to_module_names(model).items()}
    return {name: live_to_stored[name] for name, _ in model.named_parameters() if name in live_to_stored}


def linear_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{stored weight name: module} for every Linear and GPT-2 Conv1D owning its weight (a head tied to the
    embedding is the embedding's tensor, not a layer of its own: skipped)."""
    from transformers.pytorch_utils import Conv1D

    stored = _stored_names(model)
    layers: dict[str, torch.nn.Module] = {}
    for path, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            name = stored.get(f"{path}.weight" if path else "weight")
            if name is not None:
                layers[name] = module
    return layers


def _is_conv1d(layer: torch.nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(layer, Conv1D)


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


def run_batch(model: torch.nn.Module, batch: dict[str, Any] | torch.Tensor) -> Any:
    """`model` on one batch of `data` inputs; inputs it does not take are one line naming the model."""
    try:
        return model(batch) if isinstance(batch, torch.Tensor) else model(**batch)
    except (TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise SpliceError(
            f"the `data` inputs do not run through {type(model).__name__}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc


class GramHooks:
    """Forward pre-hooks on linear layers ({stored weight name: module}) that add X^T X of each layer's input to
    `grams`, one forward at a time (`with hooks.forward(mask): ...`), padding rows (mask 0) dropped.

    Accumulated in fp64: an entry is a sum over every token of the run, and the fp32 sum of millions of products
    loses the low digits that the off-diagonal entries (small differences of large sums) and the solve (condition
    numbers of 1e6 and more) depend on. Layers fed the identical input tensor object in one forward share one
    matrix. Used as a context manager: the hooks are removed on exit."""

    def __init__(self, layers: dict[str, torch.nn.Module], owner: str, samples: int = 0):
        self.grams = Grams(samples=samples, transposed={name for name, layer in layers.items() if _is_conv1d(layer)})
        self._owner = owner
        self._mask: torch.Tensor | None = None
        self._seen: dict[int, tuple[weakref.ref, str]] = {}
        self._keys: dict[str, str] = {}
        self._handles = [
            module.register_forward_pre_hook(self._hook_for(name), with_kwargs=True) for name, module in layers.items()
        ]

    def _hook_for(self, weight: str) -> Callable[..., None]:
        def hook(_module, args, kwargs):
            self._add(weight, _first_tensor(args, kwargs))

        return hook

    def _add(self, weight: str, x: torch.Tensor) -> None:
        if weight in self._keys:
            raise SpliceError(f"{weight}: its layer runs more than once per forward; one Gram per use is needed")
        shared = self._seen.get(id(x))
        if shared is not None and shared[0]() is x:  # the same tensor object, not a reused address
            self._keys[weight] = shared[1]
            return
        self._seen[id(x)] = (weakref.ref(x), weight)
        self._keys[weight] = weight
        rows = x.detach().reshape(-1, x.shape[-1]) if x.dim() > 3 else token_rows(x.detach(), self._mask)
        rows = rows.to(torch.float64)
        grams = self.grams
        if weight in grams.grams:
            grams.grams[weight].addmm_(rows.T, rows)
            grams.tokens[weight] += len(rows)
        else:
            grams.grams[weight] = rows.T @ rows
            grams.tokens[weight] = len(rows)

    @contextlib.contextmanager
    def forward(self, mask: torch.Tensor | None) -> Iterator[None]:
        """One forward pass of the hooked layers over inputs whose padding positions are `mask` == 0."""
        self._mask, self._seen, self._keys = mask, {}, {}
        yield
        if self.grams.keys and self._keys != self.grams.keys:
            raise SpliceError(
                f"{self._owner}: its layers shared inputs differently from one batch to the next; "
                "Grams cannot be shared consistently"
            )
        self.grams.keys = self._keys
        self._seen = {}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> GramHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@torch.no_grad()
def collect_grams(
    model: torch.nn.Module,
    batches: Inputs | DataSource,
    samples: int | None = None,
    device: torch.device | None = None,
    progress: Progress | None = None,
) -> Grams:
    """X^T X of the inputs of every Linear / Conv1D layer of `model` over `batches` (at most `samples` samples),
    padding positions (attention mask 0) excluded, with forward pre-hooks (`GramHooks`), one forward per batch.
    Memory: one [in, in] fp64 matrix per distinct input."""
    inputs = _inputs(batches, samples)
    device = device or next(model.parameters()).device
    progress = progress or NoProgress()
    progress.start("collecting Gram matrices", inputs.count, 0, unit="samples")
    try:
        with GramHooks(linear_layers(model), type(model).__name__, inputs.count) as hooks:
            for start, (batch, mask) in zip(range(0, inputs.count, BATCH_SIZE), inputs.chunks(BATCH_SIZE, device)):
                with hooks.forward(mask):
                    run_batch(model, batch)
                progress.advance(min(BATCH_SIZE, inputs.count - start), 0)
    finally:
        progress.finish()
    return hooks.grams


def check_labels(labels: str, inputs: Inputs) -> None:
    """`labels` is one `collect_fisher` knows, and the batch holds the labels it names."""
    if labels not in ("sample", "batch"):
        raise SpliceError(f"`labels` must be 'sample' or 'batch', got {labels!r}")
    if labels == "batch" and (isinstance(inputs.batch, torch.Tensor) or "labels" not in inputs.batch):
        raise SpliceError("`labels='batch'` needs a `labels` entry in the `data` batch; or use `labels='sample'`")


def collect_fisher(
    model: torch.nn.Module,
    batches: Inputs | DataSource,
    loss: Loss | None = None,
    labels: Labels = "sample",
    samples: int | None = None,
    seed: int = 0,
    device: torch.device | None = None,
    progress: Progress | None = None,
) -> Fisher:
    """The diagonal Fisher of every float parameter of `model`: mean over the examples n of
    (d loss_n / d theta)^2, with loss_n = -log p(y_n | x_n) of each example on its own (per-example gradients).

    labels="sample" (the default): y_n drawn from the model's own predictive distribution (softmax of its
      `logits`, seeded by `seed`), as Matena and Raffel do: that is the Fisher information proper, the
      curvature Fisher merging weights by; it needs no labelled data (the `--data` hook gives inputs); and the
      "empirical" Fisher with given labels is a poor curvature estimate where the model fits them (Kunstner et
      al., 2019). loss_n is the cross-entropy of the sampled labels averaged over the example's non-padding
      positions (one position for a sequence or image classifier), the scale of the models' own losses.
    labels="batch": y_n is the batch's `labels`, and loss_n the model's own `loss` output on that example.
    loss: a function (model outputs, the example's labels) -> scalar, replacing either loss above.

    Per-example gradients come from a loop over the examples (one forward and backward each), not
    torch.func.vmap: transformers' forwards branch in Python on tensor values (mask building, attention
    dispatch), which vmap refuses, and a loop holds one example's activations and gradients, not a batch's.
    The sum is accumulated in fp32: its terms are non-negative, so nothing cancels."""
    inputs = _inputs(batches, samples)
    device = device or next(model.parameters()).device
    check_labels(labels, inputs)
    stored = _stored_names(model)
    parameters = {
        stored[name]: parameter
        for name, parameter in model.named_parameters()
        if name in stored and parameter.is_floating_point()
    }
    generator = torch.Generator().manual_seed(seed)
    sums = {name: torch.zeros_like(parameter, dtype=torch.float32) for name, parameter in parameters.items()}
    training, wanted = model.training, {name: p.requires_grad for name, p in parameters.items()}
    model.eval()
    progress = progress or NoProgress()
    progress.start("collecting the Fisher (one backward per example)", inputs.count, 0, unit="samples")
    try:
        for parameter in parameters.values():
            parameter.requires_grad_(True)
        for example, mask in inputs.chunks(1, device):
            model.zero_grad(set_to_none=True)
            _example_loss(model, example, mask, loss, labels, generator).backward()
            for name, parameter in parameters.items():
                if parameter.grad is not None:
                    sums[name].add_(parameter.grad.detach().float().square())
            progress.advance(1, 0)
    finally:
        progress.finish()
        model.zero_grad(set_to_none=True)
        for name, parameter in parameters.items():
            parameter.requires_grad_(wanted[name])
        model.train(training)
    return Fisher({name: total.div_(inputs.count) for name, total in sums.items()}, inputs.count, labels)


def _example_loss(
    model: torch.nn.Module,
    example: dict[str, Any] | torch.Tensor,
    mask: torch.Tensor | None,
    loss: Loss | None,
    labels: str,
    generator: torch.Generator,
) -> torch.Tensor:
    if labels == "batch":
        assert isinstance(example, dict)  # collect_fisher refuses a bare tensor batch for labels="batch"
        if loss is not None:
            given = example["labels"]
            return loss(run_batch(model, {key: value for key, value in example.items() if key != "labels"}), given)
        value = getattr(run_batch(model, example), "loss", None)
        if value is None:
            raise SpliceError(f"{type(model).__name__} returned no `loss` for the batch's labels; give `loss=`")
        return value
    if isinstance(example, dict):
        example = {key: value for key, value in example.items() if key != "labels"}
    outputs = run_batch(model, example)
    logits = getattr(outputs, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.shape[-1] < 2:
        raise SpliceError(f"{type(model).__name__} has no class `logits` to sample labels from; use `labels='batch'`")
    with torch.no_grad():
        probabilities = torch.softmax(logits.detach().float().reshape(-1, logits.shape[-1]), -1).cpu()
        sampled = torch.multinomial(probabilities, 1, generator=generator).squeeze(1).to(logits.device)
    if loss is not None:
        return loss(outputs, sampled.reshape(logits.shape[:-1]))
    log_p = torch.log_softmax(logits.float(), -1).reshape(-1, logits.shape[-1])
    picked = log_p.gather(1, sampled[:, None]).squeeze(1)
    if mask is not None and logits.dim() == 3 and logits.shape[:2] == mask.shape:
        picked = picked[mask.reshape(-1).bool()]
    return -picked.mean()
