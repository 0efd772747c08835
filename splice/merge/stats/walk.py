"""RegMean++: RegMean with each block's inputs taken from the *merged* model, merged block by block.

What the references do (read, not copied): the paper (Nguyen et al. 2025, arXiv:2508.03121: X^(l)_i =
f_M^(l-1)(X^(l-1)_i), the previous *merged* layer, where RegMean takes the candidate's f_i^(l-1)); FusionBench's
`fusion_bench/method/regmean_plusplus/regmean_plusplus.py` and `clip_regmean_plusplus.py` (tanganke/fusion_bench;
its `docs/algorithms/regmean_plusplus.md` links the authors' repository nthehai01/RegMean-plusplus, a FusionBench fork
whose `fusion_bench/method/regmean_plusplus/regmean.py` runs the same algorithm); and MergeBench's
`merging/merging_methods/regmean_plusplus.py` (uiuctml/MergeBench, for Llama and Gemma-2).

- The input of block l on task i's data is the merged model's: activations start at the merged model's embedding
  output and, once block l is merged, every task's activations are pushed through the merged block l. Both
  references agree.
- Inside block l, the Grams come from the *task model's own* block l run on that input, with hooks on its linear
  layers: a layer after the block's first sub-layer (the MLP after attention, the output projection after
  q/k/v) sees task i's own earlier sub-layers, not merged ones. Both references do this (FusionBench hooks
  `layer_to_merge`, the task model's layer; MergeBench runs `compute_grams` on `finetuned_layer`); the paper's
  recursion is per block.
- The first block: FusionBench averages the embeddings (and CLIP's pre-LayerNorm) into the merged model and takes
  block 0's input from those merged embeddings. MergeBench starts the merged model from the base (pretrained) model
  and keeps the base's embeddings and head (its task models may have grown their vocabularies). They disagree; splice
  follows FusionBench and the authors' code: the embeddings take the weighted average and feed block 0 (the method
  is "inputs from the merged model", and a RegMean++ recipe names no base model).
- A Gram is the mean X^T X / rows over the task's tokens in both (RegMean's original code does the same), so every
  task weighs the same whatever its token count. Here it is the sum X^T X over the task's real tokens (padding
  excluded; both references count padding rows), as in splice's `regmean` recipe method, whose merge is the
  least-squares fit over the concatenated inputs: RegMean++ then differs from splice's RegMean only in where block
  l's inputs come from, and block 0 (whose inputs are the same when the embeddings agree) is RegMean's. The two
  conventions agree when every task gives the same number of tokens.
- Shrinkage: both scale the off-diagonal entries (FusionBench `reduce_non_diagonal_ratio`, MergeBench `reduction`):
  `alpha` here, solved by `solve.RegMeanSystem` (pinv above its condition limit, reported per layer).
- Norms, biases and any other tensor of a block: the plain mean in both; the `weights`-weighted average here
  (equal weights: the same). Tensors after the blocks (final norm, head): FusionBench keeps the pretrained model's,
  MergeBench averages all but the head; here all take the weighted average. Nothing is pushed through the last
  block (both skip it). Both hook `nn.Linear` only; GPT-2's Conv1D layers are solved too (transposed layout).

Memory: the walk reads one block of one task model at a time (solved with running sums, `RegMeanSystem`, so the
model count never multiplies a block), keeps each task's activations at the current block boundary (bounded by
its `Inputs`), and hands the merged tensors out block by block. How a block is built and run is a `BlockStack`'s
job (`blocks.TransformersBlocks` for transformers checkpoints).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from splice.arch.layers import before_layers, layer_container, layer_index
from splice.errors import SpliceError
from splice.merge.fusion.activations import Inputs
from splice.merge.kernels import average_coefficients
from splice.merge.stats.blocks import BlockStack, Chunk, TransformersBlocks
from splice.merge.stats.collect import GramHooks, Grams
from splice.merge.stats.datamerge import LayerSolve
from splice.merge.stats.solve import RegMeanSystem, WeightLayout, check_alpha
from splice.progress import NoProgress, Progress
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.device import compute_dtype_for, resolve_device


@dataclass(frozen=True)
class Partition:
    """A model's stored tensor names: before the blocks (embeddings), per block, after the blocks."""

    before: list[str]
    blocks: list[list[str]]
    after: list[str]

    @classmethod
    def of(cls, names: Sequence[str], location: str) -> Partition:
        containers = {layer_container(name) for name in names} - {None}
        if len(containers) != 1:
            found = ", ".join(sorted(str(c) for c in containers)) or "none"
            raise SpliceError(
                f"regmean_plusplus: {location}: RegMean++ walks one stack of blocks, found {found}; "
                "use merge_method: regmean"
            )
        indexed: dict[int, list[str]] = {}
        for name in names:
            index = layer_index(name)
            if index is not None:
                indexed.setdefault(index, []).append(name)
        if sorted(indexed) != list(range(len(indexed))):
            raise SpliceError(f"regmean_plusplus: {location}: its blocks are not numbered 0..{len(indexed) - 1}")
        outside = [name for name in names if layer_index(name) is None]
        return cls(
            before=[name for name in outside if before_layers(name)],
            blocks=[indexed[i] for i in range(len(indexed))],
            after=[name for name in outside if not before_layers(name)],
        )


@dataclass(frozen=True)
class MergedPart:
    """Merged tensors of one part of the model, in walk order: "embeddings", "block 0", ..., "head"."""

    scope: str
    tensors: dict[str, torch.Tensor]  # stored name -> merged tensor (CPU; floats in fp32, fp64 kept)
    solved: tuple[LayerSolve, ...] = ()  # the block's RegMean solves (condition number, pseudo-inverse used)
    averaged: tuple[str, ...] = field(default=())  # took the weighted average (copied: non-float tensors)


def regmean_plusplus(
    checkpoints: Sequence[Checkpoint],
    inputs: Sequence[Inputs],
    alpha: float = 0.9,
    weights: Sequence[float] | None = None,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> Iterator[MergedPart]:
    """The RegMean++ merge of transformers checkpoints of one architecture, each with its own task's `inputs`
    (`load_inputs` over the model's `data` hook, bounded by `samples`), as `MergedPart`s in walk order: the
    embeddings, each block, the head. `alpha`: RegMean's shrinkage of off-diagonal Gram entries; `weights`: per
    model, for the tensors that take the weighted average (equal by default). Everything refusable is refused
    here, before the first part is made; the walk runs as the parts are taken."""
    coefficients = _checked_arguments(checkpoints, inputs, alpha, weights)
    compute = resolve_device(device)
    stack = TransformersBlocks(checkpoints, compute)  # refuses what splice cannot run block by block
    partition = _partition(checkpoints)
    return _walk(checkpoints, inputs, stack, partition, alpha, coefficients, compute, progress or NoProgress())


def walk(
    checkpoints: Sequence[Checkpoint],
    inputs: Sequence[Inputs],
    stack: BlockStack,
    alpha: float = 0.9,
    weights: Sequence[float] | None = None,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> Iterator[MergedPart]:
    """RegMean++ over any `BlockStack` (see `regmean_plusplus`)."""
    coefficients = _checked_arguments(checkpoints, inputs, alpha, weights)
    partition = _partition(checkpoints)
    compute = resolve_device(device)
    return _walk(checkpoints, inputs, stack, partition, alpha, coefficients, compute, progress or NoProgress())


def _checked_arguments(
    checkpoints: Sequence[Checkpoint], inputs: Sequence[Inputs], alpha: float, weights: Sequence[float] | None
) -> list[float]:
    """The weighted average's coefficients, or a one-line refusal of the arguments."""
    if not checkpoints:
        raise SpliceError("regmean_plusplus: no models given")
    if len(inputs) != len(checkpoints):
        raise SpliceError(f"regmean_plusplus: {len(inputs)} `data` inputs for {len(checkpoints)} models; give one each")
    check_alpha(alpha)
    weights = [1.0] * len(checkpoints) if weights is None else [float(w) for w in weights]
    if len(weights) != len(checkpoints):
        raise SpliceError(f"regmean_plusplus: {len(weights)} weights for {len(checkpoints)} models")
    return average_coefficients(weights)


def _partition(checkpoints: Sequence[Checkpoint]) -> Partition:
    """The models' tensors before, in and after the blocks, or a one-line refusal of models not of one shape."""
    first = checkpoints[0]
    for other in checkpoints[1:]:
        missing = set(first.tensors) ^ set(other.tensors)
        if missing:
            name = sorted(missing)[0]
            where = other.location if name in first.tensors else first.location
            raise SpliceError(f"regmean_plusplus: {where} has no tensor {name}; RegMean++ merges models of one shape")
        for name, info in first.tensors.items():
            if other.tensors[name].shape != info.shape:
                raise SpliceError(
                    f"regmean_plusplus: {name} is {list(info.shape)} in {first.location} but "
                    f"{list(other.tensors[name].shape)} in {other.location}; RegMean++ merges models of one shape"
                )
    return Partition.of(list(first.tensors), first.location)


def _read(checkpoint: Checkpoint, name: str, device: torch.device) -> torch.Tensor:
    tensor = checkpoint.read(name)
    if tensor.is_floating_point():
        return tensor.to(device=device, dtype=compute_dtype_for(tensor.dtype))
    return tensor.to(device)


class _Average:
    """sum_i c_i t_i over the models, added one model at a time in model order (the arithmetic of
    `kernels.weighted_average`, so the result is the same to the bit) with one running sum per tensor; a non-float
    tensor (a stored index buffer) is the first model's."""

    def __init__(self, coefficients: Sequence[float]):
        self.coefficients = coefficients
        self.sums: dict[str, torch.Tensor] = {}
        self._added: dict[str, int] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        position = self._added.get(name, 0)
        self._added[name] = position + 1
        if not tensor.is_floating_point():
            self.sums.setdefault(name, tensor)
        elif position == 0:
            self.sums[name] = tensor * self.coefficients[0]
        else:
            self.sums[name] += tensor * self.coefficients[position]


def _averaged(
    checkpoints: Sequence[Checkpoint], names: list[str], coefficients: Sequence[float], device: torch.device
) -> dict[str, torch.Tensor]:
    """{name: weighted average over the models}, one stored tensor read at a time."""
    average = _Average(coefficients)
    for name in names:
        for checkpoint in checkpoints:
            average.add(name, _read(checkpoint, name, device))
    return average.sums


def _cpu(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to("cpu") for name, tensor in tensors.items()}


@torch.no_grad()
def _walk(
    checkpoints: Sequence[Checkpoint],
    inputs: Sequence[Inputs],
    stack: BlockStack,
    partition: Partition,
    alpha: float,
    coefficients: Sequence[float],
    device: torch.device,
    progress: Progress,
) -> Iterator[MergedPart]:
    progress.start("RegMean++", len(partition.blocks), 0, unit="blocks")
    before = _averaged(checkpoints, partition.before, coefficients, device)
    chunks = stack.enter(before, inputs)
    yield MergedPart("embeddings", _cpu(before), averaged=tuple(partition.before))
    del before
    last = len(partition.blocks) - 1
    for index, names in enumerate(partition.blocks):
        merged, solved = _merge_block(checkpoints, chunks, stack, index, names, alpha, coefficients, device)
        if index < last:
            stack.load(index, merged)
            for task in chunks:
                for chunk in task:
                    chunk.hidden = stack.run(index, chunk)
            stack.unload(index)
        solved_names = {s.tensor for s in solved}
        averaged = tuple(name for name in names if name not in solved_names)
        yield MergedPart(f"block {index}", _cpu(merged), tuple(solved), averaged)
        del merged
        progress.advance(1, 0)
    del chunks
    after = _averaged(checkpoints, partition.after, coefficients, device)
    yield MergedPart("head", _cpu(after), averaged=tuple(partition.after))
    progress.finish()


def _merge_block(
    checkpoints: Sequence[Checkpoint],
    chunks: list[list[Chunk]],
    stack: BlockStack,
    index: int,
    names: list[str],
    alpha: float,
    coefficients: Sequence[float],
    device: torch.device,
) -> tuple[dict[str, torch.Tensor], list[LayerSolve]]:
    """Block `index` merged: each task's block in turn is loaded, run on that task's chunks with Gram hooks on its
    linear layers, and added to the running RegMean systems (one per distinct input); the rest averaged."""
    systems: dict[str, RegMeanSystem] = {}
    keys: dict[str, str] | None = None
    others = _Average(coefficients)
    for checkpoint, task in zip(checkpoints, chunks):
        tensors = {name: _read(checkpoint, name, device) for name in names}
        layers = stack.load(index, tensors)
        with GramHooks(layers, f"{checkpoint.location} block {index}") as hooks:
            for chunk in task:
                with hooks.forward(None if chunk.mask is None else chunk.mask.to(device)):
                    stack.run(index, chunk)
        stack.unload(index)
        grams = hooks.grams
        if keys is None:
            keys = dict(grams.keys)
        elif grams.keys != keys:
            raise SpliceError(
                f"regmean_plusplus: block {index} of {checkpoint.location} runs its linear layers differently "
                "from the first model's; RegMean++ merges models of one architecture"
            )
        for key, gram in grams.grams.items():
            if grams.tokens[key] == 0:
                raise SpliceError(
                    f"regmean_plusplus: {checkpoint.location}: no token reached {key} (every position is padding); "
                    "give `data` with real tokens"
                )
            shared = {name: (tensors[name], _layout(name, grams)) for name, k in keys.items() if k == key}
            systems.setdefault(key, RegMeanSystem(alpha)).add(gram, shared)
        for name in names:
            if keys is None or name not in keys:
                others.add(name, tensors[name])
        del tensors, grams, hooks, layers
    merged: dict[str, torch.Tensor] = {}
    solved: list[LayerSolve] = []
    for system in systems.values():
        for name, result in system.solve().items():
            merged[name] = result.weight
            solved.append(LayerSolve(name, result.condition, result.pseudo_inverse))
    merged.update(others.sums)
    return {name: merged[name] for name in names}, solved


def _layout(weight: str, grams: Grams) -> WeightLayout:
    return WeightLayout.in_out if weight in grams.transposed else WeightLayout.out_in
