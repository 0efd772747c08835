"""How a run runs, whatever it computes: one value every library entry point takes, and the CLI builds once.

`RunOptions` says where the math runs, how large output shards get, whether an existing output is replaced,
who is told of progress, how remote files are opened, and how far the stream reads ahead. Entry points take it
as `run=RunOptions(...)`, or its fields as keywords, as they always did (`device="cpu", force=True`);
`run_options` folds either form into one value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

from splice.errors import SpliceError
from splice.progress import NoProgress, Progress

DEFAULT_SHARD_SIZE = 2 * 1000**3

# An elementwise kernel sees tensors above this size in blocks of rows, so memory does not grow with the
# largest tensor (an embedding matrix is often the largest by far).
CHUNK_BYTES = 4 * 1024 * 1024

# Ranged requests a run keeps in flight to remote stores (splice.tensors.ranged). Measured against moto's S3 server
# on loopback (benchmarks/throughput.py --modes s3): see benchmarks/README.md.
DEFAULT_MAX_CONCURRENCY = 8


@dataclass(frozen=True)
class RunOptions:
    """device: "auto" (cuda when a GPU is visible), "cpu", "cuda" or "cuda:N".
    shard_size: the largest output shard, in bytes.
    force: replace an output that exists (never an input).
    progress: told what is read and computed (`splice.progress.Progress`); None: nobody.
    storage_options: passed to fsspec for remote models, patches and registries.
    read_ahead_depth: work units the stream reads ahead of the one it computes.
    chunk_bytes: tensors larger than this reach an elementwise kernel in blocks of rows (blocks of at least 8 MB
      when an input is remote: one ranged request per input and block).
    compute_threads: work units computed at once on the CPU by a kernel computed in slices (soups, linear, task
      arithmetic, TIES); 0: one per core, at most 4. Each holds its unit's inputs and output.
    max_concurrency: ranged requests in flight at once when tensors are read from a remote store: the inputs of
      the work unit computed and of those read ahead are requested together, a range over 8 MB in parts; at least
      1. It bounds requests, not memory: the read-ahead does (the inputs of `read_ahead_depth` + 2 work units)."""

    device: str = "auto"
    shard_size: int = DEFAULT_SHARD_SIZE
    force: bool = False
    progress: Progress | None = None
    storage_options: dict | None = None
    read_ahead_depth: int = 2
    chunk_bytes: int = CHUNK_BYTES
    compute_threads: int = 0
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY

    def __post_init__(self) -> None:
        given = self.max_concurrency
        if isinstance(given, bool) or not isinstance(given, int) or given < 1:
            raise SpliceError(f"`max_concurrency={given!r}` is not a number of requests: give 1 or more")

    @property
    def reporter(self) -> Progress:
        """`progress`, or one that tells nobody."""
        return self.progress or NoProgress()

    def replace(self, **changes: Any) -> RunOptions:
        return dataclasses.replace(self, **changes)


class RunKeywords(TypedDict, total=False):
    """`RunOptions`' fields, as the keywords entry points have always taken."""

    device: str
    shard_size: int
    force: bool
    progress: Progress | None
    storage_options: dict | None
    read_ahead_depth: int
    chunk_bytes: int
    compute_threads: int
    max_concurrency: int


RUN_FIELDS = tuple(field.name for field in dataclasses.fields(RunOptions))


def run_options(run: RunOptions | None, keywords: Mapping[str, Any], caller: str) -> RunOptions:
    """The run `caller` was asked for: `run`, or the defaults, with `keywords` (RunOptions' fields) put in. A
    keyword that says something else than the `run` given beside it is an error, as is a keyword that is none
    of the fields."""
    unknown = sorted(set(keywords) - set(RUN_FIELDS))
    if unknown:
        raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}")
    if run is None:
        return RunOptions(**keywords)
    conflicting = [name for name, value in keywords.items() if value != getattr(run, name)]
    if conflicting:
        name = conflicting[0]
        raise SpliceError(
            f"{caller} got `{name}={keywords[name]!r}` and `run` with {name}={getattr(run, name)!r}: "
            f"give it once, in `run` (run.replace({name}=...)) or as the keyword"
        )
    return run


def split_run_keywords(
    keywords: Mapping[str, Any], keep: Collection[str] = ()
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(RunOptions' fields among `keywords`, the other keywords), for an entry point that also takes keywords of
    its own; names in `keep` stay with the others."""
    run = {name: value for name, value in keywords.items() if name in RUN_FIELDS and name not in keep}
    return run, {name: value for name, value in keywords.items() if name not in run}
