"""Values read from files (recipes, PEFT configs, patch.json): the pydantic types every file format uses so
that numbers are finite and of the type they mean ("false" is not a bool, "8" is not a number), free-form data
is nested only so deep, and a validation error reads as one line. Free of torch."""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field, StrictInt, ValidationError

MAX_DEPTH = 16  # free-form data (a patch's settings) nested deeper than this is refused
FLOAT32_MAX = 3.4028234663852886e38

FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
"""A finite number (an int is taken as a float; a string or a bool is not)."""

Float32 = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-FLOAT32_MAX, le=FLOAT32_MAX)]
"""A finite number a float32 computation can hold (a scale that multiplies tensors)."""

PositiveInt = Annotated[StrictInt, Field(gt=0)]

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
    where = ".".join(str(p) for p in first["loc"]
                     if not str(p).startswith(("list[", "dict[", "union[", "function-", "tuple[")))
    more = f" (+{error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return printable(f"{where or whole}: {first['msg']}{more}")


def parse_json(text: str | bytes) -> Any:
    """json.loads, with a document nested too deep for the parser a ValueError like any other malformed JSON."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply to parse") from None
