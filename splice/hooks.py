"""Evaluation hooks: load a user's `MODULE:FUNCTION` scorer and call it on a candidate model."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from splice.errors import HookError, SpliceError, first_line

Scorer = Callable[..., float]
"""score(state_dict) or score(state_dict, model_dir) -> held-out score, higher is better."""


def user_hook(function: Callable, label: str) -> Callable:
    """`function` (the user's own code) with anything it raises turned into a HookError naming it by `label`, the
    original exception (and its traceback) kept as the cause."""

    @functools.wraps(function)
    def called(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except Exception as exc:
            raise HookError(f"{label} raised {type(exc).__name__}: {first_line(exc)}") from exc

    return called


def load_callable(reference: str, option: str = "`evaluate`") -> Callable:
    """'package.module:function' or 'path/to/file.py:function'; `option` names it in errors (the parameter that
    gave it, as `parameter` writes it: `evaluate`, `data`, ...; or where a file gave it).
    What the function (or its module, while it loads) raises comes out as a HookError naming it."""
    module_name, sep, attribute = reference.rpartition(":")
    if not sep or not module_name or not attribute:
        raise SpliceError(f"{option} {reference!r}: write it as MODULE:FUNCTION (or path/to/file.py:FUNCTION)")
    label = f"{option} {reference}"
    try:
        if module_name.endswith(".py") or Path(module_name).is_file():
            path = Path(module_name)
            if not path.is_file():
                raise SpliceError(f"{option} {reference!r}: file {path} not found")
            spec = importlib.util.spec_from_file_location(f"splice_user_{path.stem}", path)
            if spec is None or spec.loader is None:  # a file Python has no loader for (not .py)
                raise ImportError(f"{path} is not a Python source file")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            user_hook(spec.loader.exec_module, f"{label} (loading {path})")(module)
        else:
            try:
                found = importlib.util.find_spec(module_name) is not None
            except ImportError:
                raise
            except Exception:  # a parent package's own code raised: importing it below names the hook
                found = True
            if not found:
                raise ModuleNotFoundError(f"No module named {module_name!r}")
            module = user_hook(importlib.import_module, f"{label} (importing {module_name})")(module_name)
    except ImportError as exc:  # the module itself is missing; what its own code raises is a HookError
        raise SpliceError(f"{option} {reference!r}: cannot import {module_name} ({exc})") from exc
    function = getattr(module, attribute, None)
    if not callable(function):
        raise SpliceError(f"{option} {reference!r}: {module_name} has no function {attribute}")
    return user_hook(function, label)


def hook_file(function: Callable) -> str | None:
    """The file a hook's module was loaded from (an output must never replace it), if it has one."""
    module = sys.modules.get(getattr(function, "__module__", None) or "")
    return getattr(module, "__file__", None)


def _takes_two_arguments(function: Callable) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in parameters)


def hook_name(hook: str | Callable, option: str = "`evaluate`") -> str:
    """How errors name a hook: the parameter and MODULE:FUNCTION as the user gave it, or a function's name."""
    return f"{option} {hook}" if isinstance(hook, str) else f"{option} {getattr(hook, '__qualname__', repr(hook))}"


def score_state(scorer: Scorer, state: Mapping[str, torch.Tensor], model_dir: str, hook: str = "`evaluate`") -> float:
    """The score `scorer` gives a candidate, refused (naming the `hook` and the value) unless a finite number:
    every caller scores before it publishes, so a bad score stops a command before anything is published."""
    with torch.no_grad():
        value = scorer(state, model_dir) if _takes_two_arguments(scorer) else scorer(state)
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise SpliceError(f"{hook} returned {value!r}, not a number; nothing was written") from None
    if not math.isfinite(score):
        raise SpliceError(
            f"{hook} returned {score} for {model_dir}: a score must be a finite number; nothing was written"
        )
    return score
