"""Options shared by the CLI's commands, declared once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from splice.errors import SpliceError

INTERRUPTED = 130  # the shell's code for a process ended by SIGINT

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, no tables.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log every tensor as it is merged.")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output model directory (must not exist, or use --force).")]
Device = Annotated[str, typer.Option(help="auto (cuda if available), cpu, cuda or cuda:N.")]
Dtype = Annotated[str | None, typer.Option(help="Output dtype: float32, bfloat16 or float16 (default: as input).")]
ShardSize = Annotated[str, typer.Option("--shard-size", help="Largest output shard, e.g. 2GB, 500MB.")]
Force = Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as one JSON document on stdout, instead of "
                                                   "the tables (progress and warnings stay on stderr).")]
StorageOptions = Annotated[str | None, typer.Option(
    "--storage-options", help='JSON passed to fsspec for remote models, e.g. \'{"anon": true}\'.')]

OldBase = Annotated[str | None, typer.Option(
    "--from", help="The base the patch was made on (verified against its fingerprint): the drift report then "
                   "measures the base's change itself; needed for LayerNorm patches.")]


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
RegistryURL = Annotated[str | None, typer.Option(
    "--registry", envvar="SPLICE_REGISTRY",
    help="Registry location: a directory or fsspec URL (default: $SPLICE_REGISTRY, else ~/.cache/splice/registry).")]
