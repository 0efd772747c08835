"""Activations for activation-based alignment: the same inputs through each live model, forward hooks on the
modules the description names (a hook on a Linear sees its pre-activation output), and the same sampled
tokens kept from every model so that neuron i of one model and neuron j of another are points with the same
coordinates.

Live models are built from their config and loaded from the stored tensors; module names come from
`splice.arch.names.stored_to_module_names` (transformers 5 renames modules at load time).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from splice.arch.names import stored_to_module_names
from splice.errors import SpliceError
from splice.hooks import load_callable, user_hook
from splice.progress import NoProgress, Progress

BATCH_SIZE = 32

DataSource = str | Callable[..., Any] | Mapping[str, Any] | torch.Tensor


@dataclass
class Inputs:
    """A batch of model inputs: keyword tensors (or one positional tensor) with `count` samples on dim 0."""

    batch: dict[str, Any] | torch.Tensor
    count: int

    def batches(self, size: int) -> int:
        """How many slices `chunks(size, ...)` yields."""
        return math.ceil(self.count / size)

    def nbytes(self, start: int = 0, stop: int | None = None) -> int:
        """Bytes of the input tensors of samples start..stop (all of them by default)."""
        values = [self.batch] if isinstance(self.batch, torch.Tensor) else self.batch.values()
        return sum(value[start:stop].nbytes for value in values if isinstance(value, torch.Tensor) and value.dim())

    def chunks(
        self, size: int, device: torch.device
    ) -> Iterator[tuple[dict[str, Any] | torch.Tensor, torch.Tensor | None]]:
        """(inputs, attention mask or None) for consecutive slices of `size` samples, on `device`.

        Trailing positions that are padding in every sample of a slice are cut off (from every input laid out
        [samples, positions, ...] like the mask): the model's outputs at the real tokens are the same, and the
        padded rows are dropped from the activations anyway."""
        for start in range(0, self.count, size):
            stop = min(start + size, self.count)
            if isinstance(self.batch, torch.Tensor):
                yield self.batch[start:stop].to(device), None
                continue
            part = {
                key: value[start:stop] if isinstance(value, torch.Tensor) else value
                for key, value in self.batch.items()
            }
            mask = part.get("attention_mask")
            if not isinstance(mask, torch.Tensor):
                yield {key: _to(value, device) for key, value in part.items()}, None
                continue
            if mask.dim() == 2:
                used = torch.nonzero(mask.bool().any(0))
                length = int(used[-1]) + 1 if len(used) else 1
                if length < mask.shape[1]:
                    shape = mask.shape
                    part = {
                        key: value[:, :length]
                        if isinstance(value, torch.Tensor) and value.shape[:2] == shape
                        else value
                        for key, value in part.items()
                    }
            part = {key: _to(value, device) for key, value in part.items()}
            yield part, part["attention_mask"]


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def load_inputs(data: DataSource, samples: int | None, anchor_location: str) -> Inputs:
    """The first `samples` inputs of `data` (all of them: None): a batch (a mapping of tensors, or a tensor), a
    function returning one, or 'MODULE:FUNCTION' / 'file.py:FUNCTION' naming such a function. A function that takes
    an argument gets the anchor model's location (to load its tokenizer or processor). `samples` >= 1 (its callers
    check it)."""
    if isinstance(data, str):
        data = load_callable(data, option="`data`")
    elif callable(data) and not isinstance(data, (torch.Tensor, Mapping)):
        data = user_hook(data, f"`data` function {getattr(data, '__name__', data)!r}")
    if callable(data) and not isinstance(data, (torch.Tensor, Mapping)):
        function = data
        data = function(anchor_location) if _takes_argument(function) else function()
    if isinstance(data, torch.Tensor):
        if data.dim() == 0 or len(data) == 0:
            raise SpliceError("`data` returned an empty tensor; return a batch of model inputs")
        count = len(data) if samples is None else min(samples, len(data))
        return Inputs(data[:count], count)
    if isinstance(data, Mapping):
        tensors = {key: value for key, value in data.items() if isinstance(value, torch.Tensor)}
        lengths = {len(value) for value in tensors.values() if value.dim() > 0}
        if not tensors or len(lengths) != 1 or 0 in lengths:
            raise SpliceError(
                "`data` must return model inputs with one batch size on dim 0, e.g. "
                "{'input_ids': LongTensor[N, T], 'attention_mask': ...} or {'pixel_values': ...}"
            )
        count = lengths.pop() if samples is None else min(samples, lengths.pop())
        return Inputs(
            {key: value[:count] if isinstance(value, torch.Tensor) else value for key, value in data.items()}, count
        )
    raise SpliceError(f"`data` returned {type(data).__name__}; return a dict of input tensors or a tensor")


def _takes_argument(function: Callable) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) and p.default is p.empty
        for p in parameters
    )


@contextlib.contextmanager
def transformers_errors_only() -> Iterator[None]:
    """Only errors from transformers' logger (building a model from a stored config warns about keys that do not
    concern the user). Not `splice.arch.quiet.quiet_transformers`, which silences progress bars."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def model_from_config(class_name: str, config: Mapping[str, Any], **overrides: Any) -> torch.nn.Module:
    """A freshly initialised transformers model of `class_name` from a stored config dict (`overrides` set on the
    config object after it is made)."""
    import transformers

    settings = dict(config)
    model_type = settings.pop("model_type")
    with transformers_errors_only():
        hf_config = transformers.AutoConfig.for_model(model_type, **settings)
        for key, value in overrides.items():
            setattr(hf_config, key, value)
        return getattr(transformers, class_name)(hf_config)


def build_model(
    class_name: str, config: Mapping[str, Any], state: Mapping[str, torch.Tensor], device: torch.device, location: str
) -> torch.nn.Module:
    """A transformers model of `class_name` from a config dict, loaded with `state` (stored names), in fp32."""
    model = model_from_config(class_name, config)
    names = stored_to_module_names(model)
    loaded = {}
    for name, tensor in state.items():
        if name in names:
            loaded[names[name]] = tensor.to(torch.float32) if tensor.is_floating_point() else tensor
    result = model.load_state_dict(loaded, strict=False)
    shared = {tensor.data_ptr() for key, tensor in model.state_dict().items() if key in loaded}
    untied = [key for key in result.missing_keys if model.state_dict()[key].data_ptr() not in shared]
    if result.unexpected_keys or untied:
        problem = untied[0] if untied else result.unexpected_keys[0]
        raise SpliceError(
            f"{location}: cannot load its tensors into {class_name} to collect activations ({problem} does not fit)"
        )
    return model.to(device=device, dtype=torch.float32).eval()


def module_paths(model: torch.nn.Module, stored_modules: set[str]) -> dict[str, str]:
    """{stored module name: live module path} for modules owning a stored `<module>.weight`."""
    names = stored_to_module_names(model)
    paths = {}
    for stored in stored_modules:
        live = names.get(f"{stored}.weight")
        if live is None:
            raise SpliceError(f"no live module holds the stored tensor {stored}.weight")
        paths[stored] = live.removesuffix(".weight")
    return paths


def token_rows(output: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A module output as [tokens, features]: conv maps [B, C, H, W] become tokens, one vector per sample is
    one token, and padding (attention mask 0) is dropped where the sequence lengths agree."""
    if output.dim() == 4:
        output = output.flatten(2).transpose(1, 2)
    elif output.dim() == 2:
        output = output[:, None]
    if mask is not None and output.dim() == 3 and output.shape[:2] == mask.shape:
        return output.reshape(-1, output.shape[-1]).index_select(0, torch.nonzero(mask.reshape(-1)).squeeze(1))
    return output.reshape(-1, output.shape[-1])


def input_key(module: str) -> str:
    """The key under which `collect` returns the activations entering `module` (its first input)."""
    return f"{module}@input"


@torch.no_grad()
def collect(
    model: torch.nn.Module,
    stored_modules: set[str],
    inputs: Inputs,
    tokens: int,
    device: torch.device,
    inputs_of: set[str] | frozenset[str] = frozenset(),
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """{stored module name: activations [tokens, features]} over `inputs`, at most about `tokens` rows each;
    for the modules in `inputs_of` also what enters them, under `input_key(module)`. One forward pass per
    batch serves every hook; `progress` advances by one batch (and its inputs' bytes) after each.

    Each batch keeps a seeded random subset of its rows whose size depends only on the batch and the number
    of rows, so every model keeps the same tokens."""
    progress = progress or NoProgress()
    paths = module_paths(model, set(stored_modules) | set(inputs_of))
    keys = [(stored, stored, False) for stored in stored_modules]
    keys += [(input_key(stored), stored, True) for stored in inputs_of]
    collected: dict[str, list[torch.Tensor]] = {key: [] for key, _, _ in keys}
    state: dict[str, Any] = {"mask": None, "batch": 0, "quota": 0}

    def hook_for(key: str, entering: bool) -> Callable[..., None]:
        def hook(_module, args, kwargs, output):
            if entering:
                output = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            if isinstance(output, (tuple, list)):
                output = output[0]
            rows = token_rows(output.detach().to(torch.float32), state["mask"])
            if len(rows) > state["quota"]:
                generator = torch.Generator().manual_seed(1_000_003 * state["batch"] + len(rows))
                keep = torch.randperm(len(rows), generator=generator)[: state["quota"]].sort().values
                rows = rows[keep.to(rows.device)]
            collected[key].append(rows)

        return hook

    handles = [
        model.get_submodule(paths[stored]).register_forward_hook(hook_for(key, entering), with_kwargs=True)
        for key, stored, entering in keys
    ]
    try:
        for index, (batch, mask) in enumerate(inputs.chunks(BATCH_SIZE, device)):
            size = (
                len(batch)
                if isinstance(batch, torch.Tensor)
                else len(next(value for value in batch.values() if isinstance(value, torch.Tensor)))
            )
            state.update(mask=mask, batch=index, quota=math.ceil(tokens * size / inputs.count))
            try:
                model(batch) if isinstance(batch, torch.Tensor) else model(**batch)
            except (TypeError, ValueError, RuntimeError, IndexError) as exc:
                raise SpliceError(
                    f"the `data` inputs do not run through {type(model).__name__}: "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                ) from exc
            progress.advance(1, inputs.nbytes(index * BATCH_SIZE, index * BATCH_SIZE + size))
    finally:
        for handle in handles:
            handle.remove()
    return {key: torch.cat(parts) for key, parts in collected.items() if parts}
