"""Values read from files (recipes, pipelines, PEFT configs, patch.json): the pydantic types every file format uses
so that numbers are finite and of the type they mean ("false" is not a bool, "8" is not a number), free-form data
is nested only so deep, YAML files read with the line of each key, and a validation error reads as one line.
Free of torch."""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, NamedTuple, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, Field, StrictInt, ValidationError

MAX_DEPTH = 16  # free-form data (a patch's settings) nested deeper than this is refused
FLOAT32_MAX = 3.4028234663852886e38

FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
"""A finite number (an int is taken as a float; a string or a bool is not)."""

Float32 = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-FLOAT32_MAX, le=FLOAT32_MAX)]
"""A finite number a float32 computation can hold (a scale that multiplies tensors)."""

PositiveInt = Annotated[StrictInt, Field(gt=0)]

ModelT = TypeVar("ModelT", bound=BaseModel)


def finite(value: Any) -> Any:
    """`value` unchanged, unless it is a float that is NaN or infinite."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value}")
    return value


def bounded(value: Any, depth: int = 0) -> Any:
    """`value` unchanged, once every float in it (and in the pydantic models it holds) is finite and no list or
    mapping nests deeper than MAX_DEPTH."""
    original = value
    if depth > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, BaseModel):
        value = dict(value)
    if isinstance(value, dict):
        for item in value.values():
            bounded(item, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            bounded(item, depth + 1)
    else:
        finite(value)
    return original


Finite = AfterValidator(finite)
Bounded = AfterValidator(bounded)


def printable(text: object) -> str:
    """`text` with every character that is not printable (a line break, an escape) written as its Python
    escape, so that what a file holds stays on one line of an error message."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def one_line(error: ValidationError, whole: str) -> str:
    """The first error of a pydantic validation as `where: what (+n more)`, pydantic's type tags left out
    (`whole` is where, when the error is the whole document's); keys read from the file are escaped."""
    first = error.errors()[0]
    where = ".".join(
        str(p) for p in first["loc"] if not str(p).startswith(("list[", "dict[", "union[", "function-", "tuple["))
    )
    more = f" (+{error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return printable(f"{where or whole}: {first['msg']}{more}")


def unknown_key(
    error: ValidationError, known: Collection[str], source: str, key_lines: Mapping[str, int] | None = None
) -> str | None:
    """`source:LINE: unknown key 'nmae' (did you mean 'name'?)` for a mistyped top-level key (the first one), else
    None. The missing field a typo leaves behind is not counted as another error."""
    problems = error.errors()
    extra = next((p for p in problems if p["type"] == "extra_forbidden" and len(p["loc"]) == 1), None)
    if extra is None:
        return None
    key = str(extra["loc"][0])
    # the closest key, and a second one as close but for a letter (`modles`: modules or models?)
    near = difflib.get_close_matches(key, list(known), n=2, cutoff=0.6)
    near = [name for name in near if _closeness(key, name) >= _closeness(key, near[0]) - 0.15]
    missing = {(name,) for name in near}  # the required field the typo left behind
    hint = f"did you mean {' or '.join(map(repr, near))}?" if near else f"the keys are {', '.join(known)}"
    others = [p for p in problems if p is not extra and not (p["type"] == "missing" and tuple(p["loc"]) in missing)]
    line = (key_lines or {}).get(key)
    more = f" (+{len(others)} more)" if others else ""
    return f"{source}{f':{line}' if line else ''}: unknown key {key!r} ({hint}){more}"


def _closeness(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b).ratio()


class YamlDocument(NamedTuple):
    data: Any
    key_lines: dict[str, int]  # each top-level key -> the line it is on (1-based)


def read_yaml(path: str | Path, loader: type[yaml.SafeLoader] = yaml.SafeLoader) -> YamlDocument:
    """A YAML file parsed by `loader` (a safe loader), with the line of each top-level key; a file that cannot be
    read as YAML is a ValueError of one line, `path:LINE:COLUMN: not valid YAML: what (where it began)`."""
    return _read_yaml(path, loader, single=True)[0]


def read_yaml_documents(path: str | Path, loader: type[yaml.SafeLoader] = yaml.SafeLoader) -> list[YamlDocument]:
    """Each document of a YAML file of `---`-separated documents (empty ones left out), as `read_yaml` reads one;
    the line of a key is its line in the file."""
    return [document for document in _read_yaml(path, loader, single=False) if document.data is not None]


def _read_yaml(path: str | Path, loader: type[yaml.SafeLoader], single: bool) -> list[YamlDocument]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except (IsADirectoryError, PermissionError) as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        parser = loader(text)
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow
        line, column = text.count("\n", 0, exc.position) + 1, exc.position - text.rfind("\n", 0, exc.position)
        raise ValueError(f"{path}:{line}:{column}: not valid YAML: {exc.reason} (#x{exc.character:04x})") from None
    try:
        nodes = [parser.get_single_node()] if single else _every_node(parser)
        return [YamlDocument(None if n is None else parser.construct_document(n), _key_lines(n)) for n in nodes]
    except yaml.MarkedYAMLError as exc:
        raise ValueError(_yaml_error_line(path, exc)) from None
    except RecursionError:
        raise ValueError(f"{path}: not valid YAML (nested too deeply to parse)") from None
    finally:
        parser.dispose()


def _every_node(parser: yaml.SafeLoader) -> list[yaml.Node | None]:
    nodes: list[yaml.Node | None] = []
    while parser.check_node():
        nodes.append(parser.get_node())
    return nodes


def _key_lines(node: yaml.Node | None) -> dict[str, int]:
    key_lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode):
                key_lines.setdefault(str(key.value), key.start_mark.line + 1)
    return key_lines


def _yaml_error_line(path: str | Path, error: yaml.MarkedYAMLError) -> str:
    mark = error.problem_mark or error.context_mark
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
    what = " ".join((error.problem or error.context or "unreadable").split())
    began = error.context_mark if error.problem and error.context else None
    if began is not None and mark is not None and (began.line, began.column) == (mark.line, mark.column):
        began = None
    context = (
        f" ({' '.join(error.context.split())} at {began.line + 1}:{began.column + 1})"
        if began is not None and error.context
        else ""
    )
    return f"{where}: not valid YAML: {what}{context}"


def parse_json(text: str | bytes) -> Any:
    """json.loads, with a document nested too deep for the parser a ValueError like any other malformed JSON."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply to parse") from None


def validated_yaml(
    path: str | Path, model: type[ModelT], what: str, shape: str, error: type[Exception] = ValueError
) -> ModelT:
    """A YAML file validated as `model`, or `error` with one line naming the file: `path: no such WHAT file`, not
    YAML, not a mapping (`shape` says what the document must be, e.g. "a pipeline is a mapping (base, name, ...)"),
    a mistyped top-level key (with its line and the nearest valid key), or the first invalid entry."""
    try:
        data, key_lines = read_yaml(path)
    except FileNotFoundError:
        raise error(f"{path}: no such {what} file") from None
    except ValueError as exc:
        raise error(str(exc)) from None
    if not isinstance(data, dict):
        raise error(f"{path}: {shape}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        mistyped = unknown_key(exc, model.model_fields, str(path), key_lines)
        raise error(mistyped or f"{path}: {one_line(exc, what)}") from None


def beside(file: Path, location: str) -> str:
    """A relative local path as relative to `file`'s directory (URLs and absolute paths as they are)."""
    if "://" in location or Path(location).is_absolute():
        return location
    return str((file.parent / location).resolve())


def hook_beside(file: Path, hook: str) -> str:
    """path/to/file.py:FUNCTION relative to `file`'s directory; MODULE:FUNCTION as it is."""
    module, sep, function = hook.rpartition(":")
    if sep and module.endswith(".py"):
        return f"{beside(file, module)}:{function}"
    return hook
