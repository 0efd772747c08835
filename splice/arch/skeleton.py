"""A transformers model without its weights: parameters on the `meta` device (no memory), buffers real (rotary
frequencies, position ids: computed at construction, not stored), and parts of it given real tensors one at a time.

Engines that run a model a piece at a time (RegMean++'s block walk) build the whole module tree this way and
materialise only the piece they run, so memory follows the piece, never the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules constructed inside get every parameter on the meta device as it is registered (their
    initialisation then costs nothing); buffers stay where they were made. Patches `Module.register_parameter`
    for the duration: build nothing on another thread meanwhile."""
    original = torch.nn.Module.register_parameter

    def register(self: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    torch.nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


def place(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put `tensor` in as the parameter or buffer `name` (a state-dict name of `model`), replacing the tensor
    object rather than copying into it (so a meta parameter becomes real, and a real one goes back to meta).
    Another module sharing the old parameter object (a tied head) keeps the old one."""
    path, _, attribute = name.rpartition(".")
    module = model.get_submodule(path)
    if attribute in module._parameters:
        module._parameters[attribute] = torch.nn.Parameter(tensor, requires_grad=False)
    elif attribute in module._buffers:
        module._buffers[attribute] = tensor
    else:
        raise KeyError(name)


def unplace(model: torch.nn.Module, names: Iterator[str] | list[str]) -> None:
    """The parameters `names` back on the meta device (their memory released)."""
    for name in names:
        tensor = model.get_parameter(name)
        place(model, name, torch.empty_like(tensor, device="meta"))
