"""LayerNormBank: per-task gamma/beta for every LayerNorm / RMSNorm of a loaded model, task keys, and per-sample
routing inside one batch (De Min et al., task-keyed LayerNorm tuning for continual learning).

Each norm of the wrapped model is replaced by a `BankedNorm` that keeps the pretrained module (and its
parameters, under their old names, so the model's state dict is unchanged) and reads the per-sample slot ids
the bank sets for one forward call. The slots themselves belong to the bank (`bank.slots`), not to the model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from splice.arch.names import stored_to_module_names
from splice.arch.norms import loaded_norm_modules
from splice.arch.pooling import pool
from splice.errors import SpliceError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

NormKind = Literal["layernorm", "rmsnorm"]
LAYERNORM: NormKind = "layernorm"  # x - mean, over the root mean square
RMSNORM: NormKind = "rmsnorm"  # x over the root mean square (Llama, T5)


class _Route:
    """The per-sample slot ids of the forward call under way, shared by every BankedNorm of one bank."""

    ids: torch.Tensor | None = None


class NormSlots(torch.nn.Module):
    """One norm's bank: a weight (and a bias) Parameter per task slot."""

    def __init__(self, has_bias: bool):
        super().__init__()
        self.weights = torch.nn.ParameterList()
        self.biases = torch.nn.ParameterList() if has_bias else None

    def add(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weights.append(torch.nn.Parameter(weight.detach().clone()))
        if self.biases is not None:
            if bias is None:
                raise SpliceError("this norm's slots have a bias: give one")
            self.biases.append(torch.nn.Parameter(bias.detach().clone()))

    def slot(self, task: int) -> dict[str, torch.nn.Parameter]:
        """leaf name ("weight", "bias") -> that slot's Parameter."""
        found = {"weight": self.weights[task]}
        if self.biases is not None:
            found["bias"] = self.biases[task]
        return found

    def gathered(self, ids: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each sample's weight and bias, [B, d], viewed as `shape`: only the slots the batch uses are stacked, so
        the cost follows the tasks in the batch, not the tasks in the bank."""
        unique, position = torch.unique(ids, return_inverse=True)
        used: list[int] = unique.tolist()
        weight = torch.stack([self.weights[t] for t in used]).index_select(0, position).view(shape)
        if self.biases is None:
            return weight, None
        return weight, torch.stack([self.biases[t] for t in used]).index_select(0, position).view(shape)


class BankedNorm(torch.nn.Module):
    """A norm that applies each sample's slot: normalise without affine (as `kind` says), then `* w[ids] (+ b[ids])`.
    With no ids set (the pretrained pass) it is the original module."""

    # not submodules: the original's parameters are registered as this module's own, the slots belong to the bank
    original: torch.nn.Module
    slots: NormSlots
    route: _Route

    def __init__(self, original: torch.nn.Module, kind: NormKind, slots: NormSlots, route: _Route):
        super().__init__()
        self.kind = kind
        self.weight = _parameter(original, "weight")  # the same Parameters: the model's state dict keeps its names
        self.bias = _parameter(original, "bias")
        eps = getattr(original, "variance_epsilon", getattr(original, "eps", None))
        self.eps: float | None = None if eps is None else float(eps)
        self.normalized_shape = tuple(getattr(original, "normalized_shape", None) or self.weight.shape)
        self.__dict__["original"] = original
        self.__dict__["slots"] = slots
        self.__dict__["route"] = route

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        if self.kind == LAYERNORM:
            return F.layer_norm(x, self.normalized_shape, None, None, eps)
        hidden = x.to(torch.float32)
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
        return hidden.to(x.dtype)

    @staticmethod
    def affine(normalised: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = weight * normalised
        return out if bias is None else out + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.route.ids
        if ids is None:
            return self.original(x)
        if ids.shape[0] != x.shape[0]:
            raise SpliceError(f"{ids.shape[0]} task ids for a batch of {x.shape[0]}; give one task id per input")
        weight, bias = self.slots.gathered(ids, (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],))
        return self.affine(self.normalise(x), weight, bias)

    def extra_repr(self) -> str:
        return f"{self.kind}, {tuple(self.weight.shape)}, eps={self.eps}, slots={len(self.slots.weights)}"


def _parameter(module: torch.nn.Module, leaf: str) -> Any:
    """`module`'s Parameter `leaf`, or None (a norm without a bias)."""
    found = getattr(module, leaf, None)
    return found if isinstance(found, torch.nn.Parameter) else None


def computes_as_banked(norm: BankedNorm) -> bool:
    """Whether the banked formula, with a slot equal to the norm's pretrained values, reproduces its module on an
    input with a clear mean (so a LayerNorm and an RMSNorm tell apart)."""
    weight = norm.weight.detach()
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn((2, 3, weight.shape[0]), generator=generator) + 1).to(weight.device, weight.dtype)
    bias = None if norm.bias is None else norm.bias.detach()
    with torch.no_grad():
        expected = norm.original(x)
        got = norm.affine(norm.normalise(x), weight, bias)
    tolerance = 1e-5 if weight.dtype in (torch.float32, torch.float64) else 1e-2
    return expected.shape == got.shape and torch.allclose(expected.float(), got.float(), atol=tolerance, rtol=0)


def banked_norm(name: str, module: torch.nn.Module, route: _Route) -> BankedNorm:
    """`module` (a norm by splice.arch.norms) as a BankedNorm computing as it does: as a LayerNorm or as a Llama-style
    RMSNorm, whichever reproduces it; a norm computing otherwise (e.g. an RMSNorm that scales by (1 + weight)) is
    refused."""
    slots = NormSlots(has_bias=_parameter(module, "bias") is not None)
    for kind in (LAYERNORM, RMSNORM):
        norm = BankedNorm(module, kind, slots, route)
        if computes_as_banked(norm):
            return norm
    raise SpliceError(
        f"{name} ({type(module).__name__}) does not compute as a LayerNorm or a "
        f"Llama-style RMSNorm; LayerNormBank cannot bank it"
    )


def wrap_norms(model: torch.nn.Module, route: _Route) -> dict[str, BankedNorm]:
    """Replace every norm of `model` (splice.arch.norms: the norms a LayerNorm patch holds) in place, all checked
    before any is replaced; module name -> its BankedNorm."""
    if any(isinstance(module, BankedNorm) for module in model.modules()):
        raise SpliceError(f"{type(model).__name__}: its norms are already banked; wrap the model once")
    norms = {name: banked_norm(name, model.get_submodule(name), route) for name in loaded_norm_modules(model)}
    if not norms:
        raise SpliceError(f"{type(model).__name__}: no LayerNorm or RMSNorm modules with a weight found")
    for name, norm in norms.items():
        model.set_submodule(name, norm)
    return norms


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """`module` in eval mode (no dropout) for a block, each submodule's own mode restored after."""
    modes = {child: child.training for child in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for child, training in modes.items():
            child.training = training


class LayerNormBank(torch.nn.Module):
    """Wraps a loaded HF model (ViT, BERT, GPT-2, Llama, T5, in place): every LayerNorm / RMSNorm gets per-task
    gamma/beta banks [T, d]; the pretrained norms are never modified (kept for the routing pass).

    `bank.to(device)` moves the model and the slots together (the slots are the bank's, not the model's)."""

    model: PreTrainedModel
    keys: torch.Tensor  # [T, D] each task's key, unit norm (zeros until set)
    has_key: torch.Tensor  # [T] bool

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        stored = {module: name for name, module in stored_to_module_names(model).items()}
        self._route = _Route()
        banked = wrap_norms(model, self._route)
        self.model = model
        self.norm_names: list[str] = list(banked)
        self.slots = torch.nn.ModuleList(norm.slots for norm in banked.values())
        self._norms: list[BankedNorm] = list(banked.values())
        # stored tensor name -> (norm index, leaf) for every banked weight and bias
        self._stored: dict[str, tuple[int, str]] = {
            stored[f"{name}.{leaf}"]: (index, leaf)
            for index, (name, norm) in enumerate(banked.items())
            for leaf in ("weight", "bias")
            if getattr(norm, leaf) is not None
        }
        dim = model.config.hidden_size
        self.register_buffer("keys", torch.zeros(0, dim, device=self._norms[0].weight.device))
        self.register_buffer("has_key", torch.zeros(0, dtype=torch.bool, device=self.keys.device))

    @property
    def num_tasks(self) -> int:
        return self.keys.shape[0]

    @property
    def feature_dim(self) -> int:
        return self.keys.shape[1]

    def _task(self, task: int) -> int:
        if not 0 <= task < self.num_tasks:
            raise SpliceError(f"no task slot {task}: the bank has {self.num_tasks} (0..{self.num_tasks - 1})")
        return task

    def add_task(self, key: torch.Tensor | None = None, init_from: int | str | None = None) -> int:
        """A new slot; its gamma/beta copied from slot `init_from` ("pretrained": the pretrained norms; default:
        the last slot, or the pretrained norms for the first task); returns its index."""
        task = self.num_tasks
        if init_from == "pretrained":
            source = None
        elif isinstance(init_from, str):
            raise SpliceError(f"`init_from` takes a slot index or 'pretrained', not {init_from!r}")
        else:
            source = self._task(init_from) if init_from is not None else (task - 1 if task else None)
        for norm in self._norms:
            values = norm.slots.slot(source) if source is not None else {"weight": norm.weight, "bias": norm.bias}
            norm.slots.add(values["weight"], values.get("bias"))
        self.keys = torch.cat([self.keys, self.keys.new_zeros(1, self.feature_dim)])
        self.has_key = torch.cat([self.has_key, self.has_key.new_zeros(1)])
        if key is not None:
            self.set_key(task, key)
        return task

    def set_key(self, task: int, key: torch.Tensor) -> None:
        """Slot `task`'s key (stored unit norm)."""
        key = key.detach().reshape(-1).to(self.keys.device, self.keys.dtype)
        if key.shape[0] != self.feature_dim:
            raise SpliceError(f"a key of {key.shape[0]} values; this model's features have {self.feature_dim}")
        if not torch.isfinite(key).all() or key.norm() == 0:
            raise SpliceError("a task key must be finite and nonzero")
        self.keys[self._task(task)] = F.normalize(key, dim=0)
        self.has_key[task] = True

    def task_parameters(self, task: int) -> list[torch.nn.Parameter]:
        """The trainable gamma/beta of one slot (per-slot Parameters so an optimizer can take just them)."""
        task = self._task(task)
        return [parameter for norm in self._norms for parameter in norm.slots.slot(task).values()]

    @property
    def tensor_names(self) -> list[str]:
        """Stored names of every banked gamma and beta (the tensors a slot holds)."""
        return list(self._stored)

    def slot_parameters(self, task: int) -> dict[str, torch.nn.Parameter]:
        """Stored tensor name -> the trainable Parameter of that norm's gamma or beta in one slot."""
        task = self._task(task)
        return {name: self._norms[index].slots.slot(task)[leaf] for name, (index, leaf) in self._stored.items()}

    def freeze_backbone(self) -> LayerNormBank:
        """Freeze every parameter of the model (its head too: unfreeze it yourself); the bank slots train."""
        self.model.requires_grad_(False)
        self.slots.requires_grad_(True)
        return self

    @contextmanager
    def _routing(self, ids: torch.Tensor | None) -> Iterator[None]:
        previous, self._route.ids = self._route.ids, ids
        try:
            yield
        finally:
            self._route.ids = previous

    @torch.no_grad()
    def features(self, **inputs: Any) -> torch.Tensor:
        """[B, D] routing features from a pass with the PRETRAINED norms (eval mode, no gradient):
        model.base_model(**inputs).last_hidden_state pooled per architecture (splice.arch.pooling)."""
        inputs = {name: value for name, value in inputs.items() if name != "labels"}
        with self._routing(None), eval_mode(self.model):
            hidden = self.model.base_model(**inputs).last_hidden_state
        return pool(self.model.config.model_type, hidden, inputs.get("attention_mask")).float()

    @staticmethod
    def closed_form_key(features: torch.Tensor) -> torch.Tensor:
        """normalise(mean_i normalise(f_i)): the optimum of -mean cos(f_i, k)."""
        return F.normalize(F.normalize(features.float(), dim=-1).mean(dim=0), dim=0)

    def select(self, features: torch.Tensor) -> torch.Tensor:
        """[B] argmax_t cos(f, k_t) over the tasks with keys."""
        if not bool(self.has_key.any()):
            raise SpliceError("no task has a key yet; give add_task a key or call set_key before routing")
        similarity = F.normalize(features.float(), dim=-1).to(self.keys.device) @ self.keys.float().T
        return similarity.masked_fill(~self.has_key, float("-inf")).argmax(dim=-1)

    def route(self, **inputs: Any) -> torch.Tensor:
        """features + select: [B] task ids"""
        return self.select(self.features(**inputs))

    def _checked_ids(self, task_ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(task_ids, device=self.keys.device).long().reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_tasks):
            raise SpliceError(f"task ids must lie in 0..{self.num_tasks - 1} (the bank's slots)")
        return ids

    def forward(self, *args: Any, task_ids: torch.Tensor | None = None, **inputs: Any) -> Any:
        """The model's output with each sample's slot: task_ids [B] given (oracle) or routed (features ->
        select). One batched pass, gamma/beta gathered per sample. Returns the wrapped model's own output."""
        if task_ids is None:
            if args:
                raise SpliceError(
                    "pass the model's inputs by keyword (input_ids=..., pixel_values=...) to route "
                    "them, or give task_ids"
                )
            ids = self.route(**inputs)
        else:
            ids = self._checked_ids(task_ids)
        with self._routing(ids):
            return self.model(*args, **inputs)

    def slot_state(self, task: int) -> dict[str, torch.Tensor]:
        """STORED tensor names (as save_pretrained writes them) -> that slot's gamma/beta: exactly the tensors
        of a splice LayerNorm patch for this slot."""
        task = self._task(task)
        return {
            name: self._norms[index].slots.slot(task)[leaf].detach().clone()
            for name, (index, leaf) in self._stored.items()
        }

    def load_slot(self, task: int, values: Mapping[str, torch.Tensor]) -> None:
        """Fill a slot from stored names -> tensors (a LayerNorm patch's tensors); norms not named keep their
        values. Unknown names and wrong shapes are refused before anything changes."""
        task = self._task(task)
        unknown = sorted(set(values) - set(self._stored))
        if unknown:
            raise SpliceError(
                f"not a norm of this model: {', '.join(unknown[:3])}"
                f"{f' (+{len(unknown) - 3} more)' if len(unknown) > 3 else ''}"
            )
        targets = {name: self._norms[self._stored[name][0]].slots.slot(task)[self._stored[name][1]] for name in values}
        for name, target in targets.items():
            if tuple(values[name].shape) != tuple(target.shape):
                raise SpliceError(f"{name}: shape {tuple(values[name].shape)}, the model's is {tuple(target.shape)}")
        with torch.no_grad():
            for name, target in targets.items():
                target.copy_(values[name])
