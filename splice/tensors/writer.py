"""Write a model directory: byte-bounded safetensors shards, the index, and the base model's side files.

The shard layout is planned before the first tensor arrives (every output's name, dtype and shape is
known), so each shard's header is written first and tensor bytes are appended as they are computed:
nothing is buffered beyond the tensor in hand. Everything goes into a hidden sibling directory that is
renamed into place at the end, so an interrupted run leaves nothing that looks like a finished model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch

from splice.errors import CheckpointError, OutputExistsError, SpliceError, parameter
from splice.options import DEFAULT_SHARD_SIZE
from splice.progress import note_published
from splice.tensors.checkpoint import SAFETENSORS_INDEX, Checkpoint
from splice.tensors.device import dtype_name
from splice.tensors.direct_write import DirectFile, StagingBuffer, direct_writes_enabled
from splice.tensors.partials import OwnedPartial, partial_prefix, remove_stale_partials
from splice.tensors.safetensors import SAFETENSORS_SINGLE, OutputTensor, header_bytes

log = logging.getLogger(__name__)

# A tokenizer's files, as transformers saves and loads them.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)

# Files copied from the base model so the output loads like it (config first, then tokenizer/processor).
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    *TOKENIZER_FILES,
    "preprocessor_config.json",
    "processor_config.json",
)

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
}


def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '1.5GiB' or a byte count."""
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        unit = match.group(2).upper() if match else None
        if not match or unit not in _SIZE_UNITS:
            raise SpliceError(f"cannot read size {text!r}: write it like 2GB, 500MB or 1GiB")
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise SpliceError(f"size must be positive, got {text!r}")
    return size


def plan_shards(outputs: list[OutputTensor], shard_size: int) -> list[list[OutputTensor]]:
    """Greedy split in output order; a tensor larger than the bound gets a shard of its own."""
    shards: list[list[OutputTensor]] = [[]]
    used = 0
    for out in outputs:
        if shards[-1] and used + out.nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(out)
        used += out.nbytes
    return shards


def _shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SAFETENSORS_SINGLE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardedWriter:
    """Appends tensors, in the planned order, into shards whose headers were written up front."""

    def __init__(
        self,
        directory: Path,
        outputs: list[OutputTensor],
        shard_size: int = DEFAULT_SHARD_SIZE,
        metadata: Mapping[str, str] | None = None,
        single_file: str | None = None,
    ):
        """`single_file`: write everything into one file of that name (no shard bound, no index)."""
        self.directory = Path(directory)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards = [list(outputs)] if single_file else plan_shards(outputs, shard_size)
        self.file_names = [single_file] if single_file else _shard_file_names(len(self.shards))
        self._order = [(shard_index, out) for shard_index, shard in enumerate(self.shards) for out in shard]
        self._next = 0
        self._rows_done = 0  # rows of the tensor in progress written so far, when it arrives in blocks
        self._file: BinaryIO | DirectFile | None = None
        self._file_index = -1
        self._staging: StagingBuffer | None = None  # direct_write's buffer, made with the first direct file

    @property
    def total_bytes(self) -> int:
        return sum(out.nbytes for _, out in self._order)

    def write(self, name: str, tensor: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
        """Append a whole tensor, or rows a..b-1 of it (`rows=(a, b)`, in order) when a merge is chunked."""
        if self._next >= len(self._order):
            raise SpliceError(f"writer got tensor {name} after every planned tensor was written")
        shard_index, planned = self._order[self._next]
        if name != planned.name:
            raise SpliceError(f"writer expected tensor {planned.name} next, got {name}")
        expected = planned.shape if rows is None else (rows[1] - rows[0], *planned.shape[1:])
        if rows is not None and (rows[0] != self._rows_done or rows[1] > planned.shape[0]):
            raise SpliceError(
                f"tensor {name}: rows {rows[0]}..{rows[1]} arrived after row {self._rows_done} of {planned.shape[0]}"
            )
        if tuple(tensor.shape) != expected or tensor.dtype != planned.dtype:
            raise SpliceError(
                f"tensor {name}: computed {tuple(tensor.shape)} {dtype_name(tensor.dtype)}, "
                f"planned {expected} {dtype_name(planned.dtype)}"
            )
        file = self._shard_file(shard_index)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        if data.numel():
            file.write(data.numpy().data)
        finished = rows is None or rows[1] == planned.shape[0]
        self._rows_done = 0 if finished or rows is None else rows[1]
        if finished:
            self._next += 1

    def copy_stored(self, name: str, source: Checkpoint, stored_name: str | None = None) -> None:
        """Append tensor `name` byte for byte as `source` stores it (as `stored_name`, when the output renames
        it): copied inside the kernel (`os.copy_file_range`) when both files are local, else read and written."""
        stored_name = stored_name or name
        info = source.tensors[stored_name]
        shard_index, planned = self._order[self._next] if self._next < len(self._order) else (-1, None)
        where = source.local_byte_range(stored_name)
        if (
            where is None
            or planned is None
            or planned.name != name
            or info.dtype != planned.dtype
            or info.shape != planned.shape
            or not hasattr(os, "copy_file_range")
        ):
            self.write(name, source.read(stored_name))
            return
        file = self._shard_file(shard_index)
        if isinstance(file, DirectFile):  # written from the staging buffer: the bytes pass through it
            self.write(name, source.read(stored_name))
            return
        fd, start, end = where
        file.flush()
        position = file.tell()
        done = 0
        while done < end - start:
            try:
                copied = os.copy_file_range(fd, file.fileno(), end - start - done, start + done, position + done)
            except OSError:  # e.g. across filesystems on older kernels: the bytes go through user space
                if done:
                    raise
                self.write(name, source.read(stored_name))
                return
            if copied <= 0:
                raise SpliceError(f"{source.location}: file ends inside tensor {stored_name}")
            done += copied
        file.seek(position + done)
        self._next += 1

    def _shard_file(self, shard_index: int) -> BinaryIO | DirectFile:
        """The file of shard `shard_index`: the one open, or opened now (the last one closed) with its header,
        written around the page cache where the file system allows (`direct_write`)."""
        if shard_index != self._file_index:
            self._close_file()
            self._file_index = shard_index
            path = self.directory / self.file_names[shard_index]
            self._file = self._direct_file(path) or open(path, "wb")
            self._file.write(header_bytes(self.shards[shard_index], self.metadata))
        if self._file is None:
            raise SpliceError(f"the writer of {self.directory} is closed")
        return self._file

    def _direct_file(self, path: Path) -> DirectFile | None:
        if not direct_writes_enabled():
            return None
        if self._staging is None:
            self._staging = StagingBuffer()
        return DirectFile.create(path, self._staging)

    def _close_file(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            file.close()

    def close(self) -> None:
        """Finish the last shard and write the index; every planned tensor must have arrived."""
        self._close_file()
        self._release_staging()
        if self._next != len(self._order):
            missing = self._order[self._next][1].name
            raise SpliceError(
                f"output incomplete: tensor {missing} and {len(self._order) - self._next - 1} more were never written"
            )
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes, **self.metadata},
                "weight_map": {out.name: self.file_names[i] for i, out in self._order},
            }
            (self.directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        file, self._file = self._file, None
        if isinstance(file, DirectFile):
            file.abandon()
        elif file is not None:
            file.close()
        self._release_staging()

    def _release_staging(self) -> None:
        if self._staging is not None:
            self._staging.close()
            self._staging = None


def write_state_dict(
    directory: Path,
    state: Mapping[str, torch.Tensor],
    shard_size: int = DEFAULT_SHARD_SIZE,
    metadata: Mapping[str, str] | None = None,
    single_file: str | None = None,
) -> None:
    """For engines that hold a whole model: the same shard layout as a streamed merge."""
    outputs = [OutputTensor(name, t.dtype, tuple(t.shape)) for name, t in state.items()]
    writer = ShardedWriter(directory, outputs, shard_size, metadata, single_file)
    for name, tensor in state.items():
        writer.write(name, tensor)
    writer.close()


def copy_side_files(
    source: Checkpoint,
    directory: Path,
    out_dtype: torch.dtype | None = None,
    config_updates: Mapping[str, Any] | None = None,
    skip: Collection[str] = (),
) -> list[str]:
    """Copy config, generation config and tokenizer/processor files from the base model, the config recording
    `out_dtype` and `config_updates` (a new depth, a new vocabulary size: a key is set at the top level, a dotted
    key such as `text_config.num_hidden_layers` inside the nested section it names). Only regular
    files of bounded size are copied; a symbolic link (which could carry any file into the output), a device or
    an oversized file is skipped with a warning. `skip`: files not copied (the output gets its own)."""
    copied = []
    for name, data in read_side_files(source, [n for n in SIDE_FILES if n not in skip]).items():
        if name == "config.json" and (out_dtype is not None or config_updates):
            config = json.loads(data)
            for key in ("dtype", "torch_dtype"):
                if key in config and out_dtype is not None:
                    config[key] = dtype_name(out_dtype)
            for key, value in (config_updates or {}).items():
                _set_config_value(config, key, value)
            data = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
        (directory / name).write_bytes(data)
        copied.append(name)
    return copied


def read_side_files(source: Checkpoint, names: Sequence[str]) -> dict[str, bytes]:
    """Those of `names` that `source` holds, each a regular file of bounded size; a symbolic link (which could carry
    any file into an output), a device or an oversized file is skipped with a warning."""
    present = set(source.files())
    found = {}
    for name in names:
        if name not in present:
            continue
        try:
            found[name] = source.read_file(name, follow_links=False)
        except CheckpointError as exc:
            log.warning("not copying %s into the output: %s", name, exc)
    return found


def _set_config_value(config: dict[str, Any], key: str, value: Any) -> None:
    """`config[key] = value`, a dotted key naming a value inside nested sections, each of which must exist."""
    *path, leaf = key.split(".")
    for depth, part in enumerate(path):
        if not isinstance(config.get(part), dict):
            raise SpliceError(f"config.json has no section {'.'.join(path[: depth + 1])} to set {key} in")
        config = config[part]
    config[leaf] = value


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")  # s3://b/x, or s3:/b/x once pathlib has collapsed "//"


def _check_output_location(out: str | os.PathLike, parameter_name: str = "out", kind: str = "directory") -> None:
    if _URL.match(os.fspath(out)):
        raise SpliceError(f"{parameter(parameter_name)} must be a local {kind}, got {out}; write locally, then copy")


def refuse_overlap(
    out: str | os.PathLike, protected: Sequence[str | os.PathLike], what: str = "an input", parameter_name: str = "out"
) -> None:
    """Refuse an output directory that is, contains or sits inside one of `protected` (the inputs of a
    command, a registry): replacing it would delete them. Remote locations cannot overlap a local `out`.
    `parameter_name`: the parameter that gave `out`, as errors name it."""
    target = Path(out).absolute().resolve()
    for location in protected:
        text = os.fspath(location)
        if text.startswith("file:"):  # a local registry or model given as a URL (file:///x, or file:/x)
            text = "/" + text[len("file:") :].lstrip("/")
        elif _URL.match(text):
            continue
        kept = Path(text).absolute().resolve()
        if target == kept or kept.is_relative_to(target) or target.is_relative_to(kept):
            relation = "is" if target == kept else "contains" if kept.is_relative_to(target) else "is inside"
            named = parameter(parameter_name)
            raise SpliceError(
                f"{named} {out} {relation} {what} ({location}); writing there would destroy it: "
                f"choose an {named} outside it"
            )


def ensure_output_free(
    out: str | os.PathLike,
    force: bool,
    protected: Sequence[str | os.PathLike] = (),
    what: str = "an input",
    parameter_name: str = "out",
) -> Path:
    """Refuse an existing output before any work starts (unless force), and an output that overlaps one of
    `protected` (with or without force); errors name `out` by `parameter_name`."""
    _check_output_location(out, parameter_name)
    refuse_overlap(out, protected, what, parameter_name)
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(
            f"output {out} already exists: choose another {parameter(parameter_name)} or pass "
            f"`force=True` to replace it"
        )
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a directory; remove it first")
    return out


@contextlib.contextmanager
def staged_output(
    out: str | os.PathLike, force: bool = False, protected: Sequence[str | os.PathLike] = (), what: str = "an input"
) -> Iterator[Path]:
    """Yield a hidden sibling directory owned by this process; rename it to `out` on success, delete it on
    any failure. Partials of `out` left by dead processes are removed first; `protected` as for
    `ensure_output_free`."""
    out = ensure_output_free(out, force, protected, what).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    partial = OwnedPartial(out)
    try:
        yield partial.path
        partial.release()
        _publish(partial.path, out, force)
    except BaseException:
        partial.discard()
        raise
    partial.close()


def _publish(staging: Path, out: Path, force: bool) -> None:
    if not out.exists():
        staging.rename(out)
        note_published(str(out))
        return
    if not force:  # appeared while we worked
        raise OutputExistsError(f"output {out} appeared while merging; nothing was replaced")
    retired = OwnedPartial(out, adopt=out)
    try:
        staging.rename(out)
    except BaseException:
        retired.restore(out)
        raise
    note_published(str(out))
    retired.discard()


def ensure_output_file_free(
    path: str | os.PathLike,
    force: bool,
    protected: Sequence[str | os.PathLike] = (),
    what: str = "an input",
    parameter_name: str = "out",
) -> Path:
    """A file output (predictions, a report's JSON or PNG), before any work: refused when it is or sits inside one
    of `protected` (with or without force), when a directory is there, and when it exists and not `force`."""
    _check_output_location(path, parameter_name, "file")
    refuse_overlap(path, protected, what, parameter_name)
    path = Path(path)
    if path.is_dir():
        raise OutputExistsError(f"{parameter(parameter_name)} {path} is a directory: give a file name")
    if path.exists() and not force:
        raise OutputExistsError(
            f"{parameter(parameter_name)} {path} already exists: choose another or pass `force=True` to replace it"
        )
    return path


def write_output_file(
    path: str | os.PathLike,
    data: bytes,
    force: bool = False,
    protected: Sequence[str | os.PathLike] = (),
    what: str = "an input",
    parameter_name: str = "out",
) -> Path:
    """The output rule for one file: checked as by `ensure_output_file_free`, written to a hidden partial name
    beside it, flushed, then published in one step: linked into place (refused if a file appeared meanwhile) or,
    with `force`, renamed over the old one. Readers see the old file or the whole new one, never a part."""
    path = ensure_output_file_free(path, force, protected, what, parameter_name).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    partial = path.parent / f"{partial_prefix(path)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(partial, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if force:
            os.replace(partial, path)
        else:
            try:
                os.link(partial, path)
            except FileExistsError:
                raise OutputExistsError(
                    f"{parameter(parameter_name)} {path} appeared while writing; nothing was replaced"
                ) from None
        note_published(str(path))
    finally:
        partial.unlink(missing_ok=True)
    return path


def check_report_dir(
    directory: str | os.PathLike, protected: Sequence[str | os.PathLike], names: Sequence[str] = (), force: bool = False
) -> None:
    """Before any work: a directory that reports may be written into (it may exist, as a directory) that is none
    of the inputs and does not contain or sit inside one, where none of the report's files `names` exists
    (unless `force`)."""
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"`report_dir` {directory}: a file is there; give a directory")
    refuse_overlap(directory, protected, "an input", parameter_name="report_dir")
    for name in names:
        ensure_output_file_free(path / name, force, parameter_name="report_dir")


def write_report_files(
    directory: str | os.PathLike,
    files: Mapping[str, bytes],
    force: bool = False,
    protected: Sequence[str | os.PathLike] = (),
) -> list[Path]:
    """A report's files (name -> content) into `directory`, each by `write_output_file`."""
    check_report_dir(directory, protected, list(files), force)
    return [
        write_output_file(Path(directory) / name, data, force, parameter_name="report_dir")
        for name, data in files.items()
    ]
