"""A model run one block at a time, as RegMean++'s walk (`walk.py`) needs it: what a block stack is, and the one
for transformers checkpoints.

`TransformersBlocks` builds the checkpoint's transformers model with every parameter on the meta device
(`splice.arch.skeleton`), so the module tree costs nothing, and gives real tensors to one piece at a time: the
embeddings while the inputs enter, then one block. A block is called exactly as its parent model calls it. Those
arguments (the attention mask in the form the model builds it, rotary position embeddings, position ids, ...) are
recorded once per chunk of inputs: each block's `forward` is swapped for a recorder that keeps its arguments and
hands the hidden states on unchanged, and one forward of the parent model with real embeddings runs through the
recorders (the last one stops it, so nothing after the blocks runs). Each block later gets back its own recorded
call, whatever the parent varies per block (Qwen2 passes a sliding-window mask to some layers).

Runnable: model types whose blocks map hidden states to hidden states and whose parent does nothing between
blocks (read in each model's forward): ViT, BERT, GPT-2 and Llama-style decoders (Llama, Mistral, Qwen2). Any
other model type is refused in one line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from splice.arch.layers import layer_index
from splice.arch.names import stored_to_module_names
from splice.arch.skeleton import parameters_on_meta, place, unplace
from splice.errors import SpliceError
from splice.merge.fusion.activations import BATCH_SIZE, Inputs, model_from_config
from splice.merge.stats.collect import linear_layers, run_batch, transformers_class
from splice.tensors.checkpoint import Checkpoint

RUNNABLE = {"vit": "ViT", "bert": "BERT", "gpt2": "GPT-2", "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}

# where activations wait between blocks: host memory, not the compute device's
STORAGE = torch.device("cpu")


@dataclass
class Chunk:
    """One slice of a task's samples at the current block boundary."""

    hidden: torch.Tensor  # what enters the block, [samples, positions, features] (or [samples, features])
    mask: torch.Tensor | None  # [samples, positions], 0 at padding: those rows stay out of the Grams
    context: Any = None  # what else the stack needs to run a block on this slice (its recorded calls)


class BlockStack(Protocol):
    """How to run a model a block at a time."""

    def enter(self, before: Mapping[str, torch.Tensor], inputs: Sequence[Inputs]) -> list[list[Chunk]]:
        """Per task, its inputs as chunks entering block 0 of the model whose tensors before the blocks are
        `before` (stored names, on the compute device)."""
        ...

    def load(self, index: int, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.nn.Module]:
        """Block `index` holding `tensors` (its stored tensors, on the compute device); returns its linear layers
        {stored weight name: module}."""
        ...

    def run(self, index: int, chunk: Chunk) -> torch.Tensor:
        """What the loaded block `index` outputs for `chunk` (the next block's input)."""
        ...

    def unload(self, index: int) -> None:
        """Release block `index`'s tensors."""
        ...


class _Stop(Exception):
    """Raised by the last block's recorder: the parent's forward has given every block its arguments."""


@dataclass
class _Call:
    """A block's recorded arguments besides its hidden states (passed first positionally, or as a keyword)."""

    positional: bool
    args: tuple
    kwargs: dict[str, Any]


def _moved(value: Any, device: torch.device, memo: dict[int, Any]) -> Any:
    """`value` with every tensor inside (tuples, lists, dicts, a `_Call`) on `device`, each distinct tensor moved
    once (the blocks of a chunk share their mask and position embeddings)."""
    if isinstance(value, torch.Tensor):
        if id(value) not in memo:
            memo[id(value)] = (value, value.detach().to(device))  # the source kept alive: its id stays unique
        return memo[id(value)][1]
    if isinstance(value, _Call):
        return _Call(value.positional, _moved(value.args, device, memo), _moved(value.kwargs, device, memo))
    if isinstance(value, (tuple, list)):
        return type(value)(_moved(item, device, memo) for item in value)
    if isinstance(value, dict):
        return {key: _moved(item, device, memo) for key, item in value.items()}
    return value


def _class_of(checkpoint: Checkpoint) -> tuple[dict[str, Any], str, str]:
    config, class_name = transformers_class(checkpoint, "regmean_plusplus runs the model")
    return config, class_name, str(config.get("model_type"))


class TransformersBlocks:
    """The block stack of transformers checkpoints of one architecture (see the module)."""

    def __init__(self, checkpoints: Sequence[Checkpoint], device: torch.device):
        location = checkpoints[0].location
        config, class_name, model_type = _class_of(checkpoints[0])
        if model_type not in RUNNABLE:
            raise SpliceError(
                f"regmean_plusplus: {location} is a {class_name} (model_type {model_type}), which splice cannot run "
                f"block by block (it can: {', '.join(RUNNABLE.values())}); use merge_method: regmean"
            )
        for other in checkpoints[1:]:
            if _class_of(other)[1:] != (class_name, model_type):
                raise SpliceError(
                    f"regmean_plusplus: {other.location} is not a {class_name} like {location}; "
                    "RegMean++ merges models of one architecture"
                )
        with parameters_on_meta():
            model = model_from_config(class_name, config, use_cache=False)
        self.model = model.eval()
        self.device = device
        self.live = stored_to_module_names(model)  # {stored name: state-dict name}
        self.blocks = self._find_blocks(list(checkpoints[0].tensors), location)
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.to(device)
        in_block = [{id(module) for module in block.modules()} for block in self.blocks]
        self._linears: list[dict[str, torch.nn.Module]] = [{} for _ in self.blocks]
        for weight, module in linear_layers(model).items():
            index = layer_index(weight)
            if index is not None and index < len(self.blocks) and id(module) in in_block[index]:
                self._linears[index][weight] = module

    def _find_blocks(self, stored: list[str], location: str) -> torch.nn.ModuleList:
        """The ModuleList holding the blocks: every stored tensor of block i lives in its i-th module."""
        first = next((name for name in stored if layer_index(name) == 0 and name in self.live), None)
        lists = [
            (path, module)
            for path, module in self.model.named_modules()
            if isinstance(module, torch.nn.ModuleList) and first and self.live[first].startswith(f"{path}.0.")
        ]
        if not lists:
            raise SpliceError(f"regmean_plusplus: {location}: no list of blocks in {type(self.model).__name__}")
        path, blocks = max(lists, key=lambda found: len(found[0]))
        for name in stored:
            index = layer_index(name)
            if index is not None and name in self.live and not self.live[name].startswith(f"{path}.{index}."):
                raise SpliceError(f"regmean_plusplus: {location}: {name} is not in block {index} of the model")
        return blocks

    def _place(self, tensors: Mapping[str, torch.Tensor]) -> list[str]:
        """The stored tensors put in the model (those it holds); their state-dict names."""
        placed = []
        for name, tensor in tensors.items():
            if name in self.live:
                place(self.model, self.live[name], tensor)
                placed.append(self.live[name])
        return placed

    def enter(self, before: Mapping[str, torch.Tensor], inputs: Sequence[Inputs]) -> list[list[Chunk]]:
        placed = self._place(before)
        last = len(self.blocks) - 1
        recorded: dict[int, _Call] = {}
        entering: list[torch.Tensor] = []

        def recorder(index: int) -> Any:
            def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
                if args:
                    hidden, call = args[0], _Call(True, args[1:], kwargs)
                else:
                    rest = {key: value for key, value in kwargs.items() if key != "hidden_states"}
                    hidden, call = kwargs["hidden_states"], _Call(False, (), rest)
                if index in recorded:
                    raise SpliceError(f"regmean_plusplus: block {index} runs more than once per forward")
                recorded[index] = call
                if index == 0:
                    entering.append(hidden)
                if index == last:
                    raise _Stop
                return hidden

            return forward

        for index, block in enumerate(self.blocks):
            block.forward = recorder(index)
        result = []
        try:
            for task in inputs:
                chunks = []
                for batch, mask in task.chunks(BATCH_SIZE, self.device):
                    recorded.clear()
                    entering.clear()
                    try:
                        run_batch(self.model, batch)
                    except _Stop:
                        pass
                    if len(recorded) != len(self.blocks) or not entering:
                        raise SpliceError(
                            f"regmean_plusplus: {type(self.model).__name__} ran {len(recorded)} of its "
                            f"{len(self.blocks)} blocks on the `data` inputs; it cannot be run block by block"
                        )
                    memo: dict[int, Any] = {}
                    calls = [_moved(recorded[index], STORAGE, memo) for index in range(len(self.blocks))]
                    hidden = entering[0].detach().to(STORAGE)
                    chunks.append(Chunk(hidden, None if mask is None else mask.to(STORAGE), calls))
                result.append(chunks)
        finally:
            for block in self.blocks:
                del block.forward
            parameters = {name for name, _ in self.model.named_parameters()}
            unplace(self.model, [name for name in placed if name in parameters])
        return result

    def load(self, index: int, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.nn.Module]:
        self._place(tensors)
        empty = next((name for name, p in self.blocks[index].named_parameters() if p.is_meta), None)
        if empty is not None:
            raise SpliceError(f"regmean_plusplus: the checkpoints store no tensor for {empty} of block {index}")
        return self._linears[index]

    def run(self, index: int, chunk: Chunk) -> torch.Tensor:
        call = _moved(chunk.context[index], self.device, {})
        hidden = chunk.hidden.to(self.device)
        block = self.blocks[index]
        output = (
            block(hidden, *call.args, **call.kwargs) if call.positional else block(hidden_states=hidden, **call.kwargs)
        )
        if isinstance(output, (tuple, list)):
            output = output[0]
        return output.detach().to(STORAGE)

    def unload(self, index: int) -> None:
        block = self.blocks[index]
        unplace(block, [name for name, _ in block.named_parameters()])
