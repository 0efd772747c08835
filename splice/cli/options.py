"""Options shared by the CLI's commands, declared once."""

from __future__ import annotations

import inspect
import json
import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from splice.cli.render import RichProgress
from splice.errors import SpliceError
from splice.options import DEFAULT_MAX_CONCURRENCY, DEFAULT_SHARD_SIZE, RunOptions

INTERRUPTED = 130  # the shell's code for a process ended by SIGINT

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, no tables.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log every tensor as it is merged.")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output model directory (must not exist, or use --force).")]
Device = Annotated[str, typer.Option(help="auto (cuda if available), cpu, cuda or cuda:N.")]
Dtype = Annotated[str | None, typer.Option(help="Output dtype: float32, bfloat16 or float16 (default: as input).")]
ShardSize = Annotated[str, typer.Option("--shard-size", help="Largest output shard, e.g. 2GB, 500MB.")]
Force = Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")]
Json = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print the result as one JSON document on stdout, instead of "
        "the tables (progress and warnings stay on stderr).",
    ),
]
StorageOptions = Annotated[
    str | None,
    typer.Option("--storage-options", help="JSON passed to fsspec for remote models, e.g. '{\"anon\": true}'."),
]
MaxConcurrency = Annotated[
    int,
    typer.Option(
        "--max-concurrency",
        help="Ranged requests in flight at once when reading remote models (at least 1).",
    ),
]

OldBase = Annotated[
    str | None,
    typer.Option(
        "--from",
        help="The base the patch was made on (verified against its fingerprint): the drift report then "
        "measures the base's change itself; needed for LayerNorm patches.",
    ),
]


def parse_storage_options(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        options = json.loads(text)
    except ValueError as exc:
        raise SpliceError(f"--storage-options is not valid JSON ({exc})") from None
    if not isinstance(options, dict):
        raise SpliceError("--storage-options must be a JSON object, e.g. '{\"anon\": true}'")
    return options


def parse_weights(text: str | None) -> list[float] | None:
    """--weights 0.5,0.3,0.2 as numbers."""
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise SpliceError(f"--weights {text!r}: give comma-separated numbers, e.g. 0.5,0.3,0.2") from None


RegistryURL = Annotated[
    str | None,
    typer.Option(
        "--registry",
        envvar="SPLICE_REGISTRY",
        help="Registry location: a directory or fsspec URL (default: $SPLICE_REGISTRY, else ~/.cache/splice/registry).",
    ),
]


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr, force=True)
    logging.getLogger("splice").setLevel(logging.DEBUG if verbose else logging.WARNING)


@dataclass(frozen=True)
class Shared:
    """What the option tail of the commands that run something gives the command: the run's options, and how to
    show what the run returns."""

    run: RunOptions
    quiet: bool
    as_json: bool


# The tail, in the order --help lists it: (parameter, its typer declaration, its default)
_TAIL: tuple[tuple[str, Any, Any], ...] = (
    ("device", Device, "auto"),
    ("shard_size", ShardSize, "2GB"),
    ("storage_options", StorageOptions, None),
    ("max_concurrency", MaxConcurrency, DEFAULT_MAX_CONCURRENCY),
    ("force", Force, False),
    ("quiet", Quiet, False),
    ("verbose", Verbose, False),
    ("as_json", Json, False),
)

Command = Callable[..., None]


def shared_options(
    *, shard_size: bool = True, verbose: bool = False, placed: Mapping[str, str] | None = None
) -> Callable[[Command], Command]:
    """Declare the shared option tail on a typer command: --device, --shard-size (unless `shard_size=False`),
    --storage-options, --max-concurrency, --force, --quiet, --verbose (with `verbose=True`: it also sets up
    logging) and --json, after the command's own options; `placed` lists its own options the help shows inside
    the tail (option -> the tail option it follows). The command is called with `shared: Shared`, built from them,
    in their place."""
    left_out = {"shard_size"} if not shard_size else set()
    left_out |= {"verbose"} if not verbose else set()
    keyword = inspect.Parameter.KEYWORD_ONLY

    def declare(command: Command) -> Command:
        own = inspect.signature(command, eval_str=True).parameters
        tail = [
            inspect.Parameter(name, keyword, default=default, annotation=declared)
            for name, declared, default in _TAIL
            if name not in left_out
        ]
        for name, follows in (placed or {}).items():
            tail.insert(next(i for i, p in enumerate(tail) if p.name == follows) + 1, own[name].replace(kind=keyword))
        tail_names = {p.name for p in tail}
        parameters = [p.replace(kind=keyword) for p in own.values() if p.name != "shared" and p.name not in tail_names]
        shared_names = [name for name, _, _ in _TAIL if name not in left_out]

        def run_command(**given: Any) -> None:
            tail_values = {name: given.pop(name) for name in shared_names}
            if verbose:
                setup_logging(tail_values["verbose"])
            command(**given, shared=_shared(tail_values))

        run_command.__signature__ = inspect.Signature([*parameters, *tail])  # type: ignore[attr-defined]
        run_command.__annotations__ = {p.name: p.annotation for p in [*parameters, *tail]}
        for attribute in ("__module__", "__name__", "__qualname__", "__doc__"):
            setattr(run_command, attribute, getattr(command, attribute))
        return run_command

    return declare


def _shared(values: Mapping[str, Any]) -> Shared:
    from splice.tensors.writer import parse_size

    shard_size = parse_size(values["shard_size"]) if "shard_size" in values else DEFAULT_SHARD_SIZE
    run = RunOptions(
        device=values["device"],
        shard_size=shard_size,
        force=values["force"],
        progress=RichProgress(values["quiet"]),
        storage_options=parse_storage_options(values["storage_options"]),
        max_concurrency=values["max_concurrency"],
    )
    return Shared(run, values["quiet"], values["as_json"])
