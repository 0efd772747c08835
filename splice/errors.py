"""Errors a user can cause. Each carries a one-line message that says what is wrong and what to do.

A message that tells the user to pass something names the Python parameter in backticks, as `parameter` makes it
(`force=True`, `out`, `base=MODEL_DIR`); the command line rewrites those to its flags (splice.cli.flags)."""

import re
import traceback

PARAMETER = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)(?:=([^`\s]+))?`")
"""A parameter as `parameter` writes it in a message: its name, and the value to pass when the message says one."""


def parameter(name: str, value: object = None) -> str:
    """How a message names a parameter to pass: `name`, or `name=value` with `value` as Python source
    (`parameter("force", True)` -> `force=True`) or a placeholder (`parameter("base", "MODEL_DIR")`)."""
    return f"`{name}`" if value is None else f"`{name}={value}`"


class SpliceError(Exception):
    """Base for every user-facing error; the CLI prints its message on one line and exits 2."""


class CheckpointError(SpliceError):
    """A model directory or weights file is missing, unreadable or corrupt."""


class IncompatibleModelsError(SpliceError):
    """Inputs to one merge disagree on tensor names, shapes or dtypes."""


class RecipeError(SpliceError):
    """A merge recipe names an unknown method or parameter, or is malformed."""


class OutputExistsError(SpliceError):
    """The output directory exists and `force=True` was not given."""


class PatchError(SpliceError):
    """A patch directory is missing, malformed, or does not fit the base it is applied to."""


class HookError(SpliceError):
    """A user's own function (an `evaluate` scorer, a `data` function, a pipeline's data hook) raised; the exception
    it raised is the cause (`__cause__`), whose traceback the CLI prints before the one-line error."""


class NonFiniteOutputError(SpliceError):
    """A merge or patch would write NaN/Inf into a tensor whose inputs were finite."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C after part of the work was kept: the message says what is kept (the CLI prints it instead of
    "nothing was published")."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line and 200 characters (its type name when it has none), for a
    one-line error that wraps it."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def hook_traceback(error: HookError) -> str:
    """The traceback of what a user's hook raised, from the user's own code down (the frames of splice's wrapper
    and of Python's import machinery left out)."""
    cause = error.__cause__
    if cause is None:
        return ""
    frames = cause.__traceback__.tb_next if cause.__traceback__ is not None else None  # the wrapper's frame
    while (
        frames is not None
        and frames.tb_next is not None
        and (
            frames.tb_frame.f_code.co_filename.startswith("<frozen importlib")
            or frames.tb_frame.f_globals.get("__name__", "").startswith("importlib")
        )
    ):
        frames = frames.tb_next
    return "".join(traceback.format_exception(type(cause), cause, frames))
