"""Modules (mergekit's `modules:`): the parts of a model that mergekit's architecture catalogue names, such as the
text decoder, vision tower and projector of a multimodal model, each with its tensors before its layers, its layers
and its tensors after them.

Which tensors belong to which module is mergekit's knowledge, read through its architecture API at run time
(`arch_info_for_config`: the weights before, in each layer of, and after every module, for the model's config), never
copied. A stored tensor inside a module's layer travels with the layer even where mergekit's table leaves it out (as
splice's slices do). A tensor no module claims is refused by name: mergekit would leave it out of its output, and the
model would no longer load as it was.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from splice.errors import RecipeError
from splice.merge.slices import LayerStack
from splice.tensors.checkpoint import Checkpoint


@dataclass(frozen=True)
class ModelModules:
    """A model split into the modules of its architecture: each module's stored tensors, as a stack of layers."""

    architecture: str
    stacks: dict[str, LayerStack]


def model_modules(checkpoint: Checkpoint) -> ModelModules:
    """`checkpoint`'s tensors split into the modules mergekit's architecture catalogue gives its architecture; a
    tensor a module needs but the model does not store, or one no module claims, is refused by name."""
    from mergekit.architecture import ConfiguredModelArchitecture

    architecture, info, config = _architecture(checkpoint)
    configured = ConfiguredModelArchitecture(info=info, config=config)
    stacks: dict[str, LayerStack] = {}
    for name in info.modules:
        module = configured.get_module(name)
        where = f"{checkpoint.location}: module {name} of mergekit's {architecture}"
        stacks[name] = _module_stack(checkpoint, module, where)
    claims: dict[str, str] = {}
    for name, stack in stacks.items():
        for tensor in [*stack.before, *stack.after, *(t for layer in stack.layers.values() for t in layer)]:
            if claims.setdefault(tensor, name) != name:
                raise RecipeError(
                    f"{checkpoint.location}: mergekit's {architecture} gives {tensor} to two modules ({claims[tensor]}"
                    f" and {name}); merge this model with models:"
                )
    claimed = set(claims)
    unclaimed = [name for name in checkpoint.tensors if name not in claimed]
    if unclaimed:
        shown = ", ".join(unclaimed[:4]) + (f" (and {len(unclaimed) - 4} more)" if len(unclaimed) > 4 else "")
        raise RecipeError(
            f"{checkpoint.location} stores {len(unclaimed)} tensor{'' if len(unclaimed) == 1 else 's'} that no module "
            f"of mergekit's {architecture} claims: {shown}; mergekit would leave them out of its output, so modules: "
            "cannot merge this model (merge it with models:, which merges every tensor by name)"
        )
    return ModelModules(architecture, stacks)


def _architecture(checkpoint: Checkpoint) -> tuple[str, Any, Any]:
    """The model's architecture name, mergekit's description of it, and its config as transformers reads it."""
    import transformers
    from mergekit.architecture import arch_info_for_config

    config = checkpoint.config()
    if config is None:
        raise RecipeError(f"{checkpoint.location} has no config.json; modules: reads the model's architecture there")
    names = config.get("architectures") or []
    if not isinstance(names, list) or len(names) != 1:
        raise RecipeError(
            f"{checkpoint.location}: config.json names {len(names) if isinstance(names, list) else 0} architectures; "
            "modules: finds a module's tensors from the one architecture a model's config names"
        )
    try:
        hf_config = transformers.AutoConfig.for_model(**config)
    except (ValueError, KeyError, TypeError) as exc:
        raise RecipeError(f"{checkpoint.location}: transformers cannot read its config.json ({exc})") from None
    info = arch_info_for_config(hf_config)
    if info is None:
        raise RecipeError(
            f"{checkpoint.location}: mergekit's architecture catalogue has no {names[0]}, so it names no modules of it "
            f"(architectures with several modules: {', '.join(modular_architectures())}); merge it with models: "
            "or slices:"
        )
    return names[0], info, hf_config


def modular_architectures() -> list[str]:
    """The architectures mergekit's catalogue splits into several modules."""
    from mergekit.architecture.json_definitions import NAME_TO_ARCH

    return sorted(name for name, infos in NAME_TO_ARCH.items() if any(len(info.modules) > 1 for info in infos))


def _module_stack(checkpoint: Checkpoint, module: Any, where: str) -> LayerStack:
    """One module's stored tensors: mergekit's weights before and after its layers, and every tensor stored in each
    of its layers (mergekit's layer weights among them). A weight mergekit marks optional may be absent."""
    try:
        depth = int(module.num_layers())
    except (RuntimeError, AttributeError, TypeError) as exc:
        raise RecipeError(f"{where}: its depth could not be read from config.json ({exc})") from None
    missing: list[str] = []

    def stored(weights: Sequence[Any]) -> list[str]:
        found = [weight.name for weight in weights if weight.name in checkpoint.tensors]
        missing.extend(w.name for w in weights if w.name not in checkpoint.tensors and not w.optional)
        return found

    before, after = stored(module.pre_weights()), stored(module.post_weights())
    layers: dict[int, list[str]] = {}
    container = _layer_container(module, where) if depth else None
    if container is not None:
        for index in range(depth):
            stored(module.layer_weights(index))
            prefix = f"{container}{index}."
            layers[index] = [name for name in checkpoint.tensors if name.startswith(prefix)]
    if missing:
        shown = ", ".join(missing[:4]) + (f" (and {len(missing) - 4} more)" if len(missing) > 4 else "")
        raise RecipeError(
            f"{where} needs {len(missing)} tensor{'' if len(missing) == 1 else 's'} the model does not store: {shown}"
        )

    def renumber(name: str, index: int) -> str:
        assert container is not None and name.startswith(container)
        return f"{container}{index}.{name[len(container) :].split('.', 1)[1]}"

    depth_key = module.info.num_layers_config_key() if depth else None
    return LayerStack(layers, before, after, renumber, depth_key)


def _layer_container(module: Any, where: str) -> str:
    """The prefix of the module's layer tensors before the layer index (`language_model.model.layers.`), where
    mergekit names every layer weight of a module under one."""
    first = [weight.name for weight in module.layer_weights(0)]
    second = [weight.name for weight in module.layer_weights(1)]
    containers = set()
    for zero, one in zip(first, second):
        container = os.path.commonprefix([zero, one])
        if not (container.endswith(".") and zero.startswith(f"{container}0.") and one.startswith(f"{container}1.")):
            raise RecipeError(
                f"{where}: mergekit names a layer weight without its layer index ({zero}), so splice cannot say which "
                "layer it belongs to; merge this model with models:"
            )
        containers.add(container)
    if len(containers) != 1:
        raise RecipeError(
            f"{where}: mergekit names its layer weights under {len(containers)} prefixes "
            f"({', '.join(sorted(containers)) or 'none'}); splice takes a module's layers from one stack: merge this "
            "model with models:"
        )
    return containers.pop()
