"""Patch: named tensors plus a PatchMeta manifest; on disk a directory of `patch.json` + `tensors.safetensors`.

A patch records a fingerprint of every base tensor it touches (name, shape, dtype, sha256 of the bytes)
so that applying it to another base can be refused with a precise account of what differs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import accumulate
from pathlib import Path
from typing import BinaryIO

import torch
from pydantic import ValidationError

from splice.adapters.fingerprint import BaseMismatch, compare_base, refuse_drift
from splice.adapters.kinds import KINDS
from splice.adapters.kinds.spec import PatchSize
from splice.adapters.lazy import LazyTensors
from splice.adapters.meta import FORMAT_VERSION, PatchMeta
from splice.adapters.meta import PatchKind as PatchKind  # re-exported: callers import it with Patch
from splice.errors import CheckpointError, PatchError
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.safetensors import OutputTensor, header_bytes
from splice.tensors.writer import staged_output
from splice.values import one_line, parse_json

MANIFEST = "patch.json"
TENSORS = "tensors.safetensors"


def write_patch_dir(
    directory: str | os.PathLike,
    meta: PatchMeta,
    tensors: Sequence[OutputTensor],
    fill: Callable[[BinaryIO, list[int]], None],
    force: bool = False,
    protected: Sequence[str | os.PathLike] = (),
    extra_files: Mapping[str, bytes] | None = None,
) -> Path:
    """The patch directory format, once: `tensors.safetensors` (a header for `tensors` in this order, tagged
    with the patch kind, then their bytes, which `fill(file, offsets)` writes, each at its offset) and
    `patch.json`, published atomically. `Patch.save` and `Registry.pull` both write patches through here;
    a `directory` that is, contains or sits inside one of `protected` is refused. `extra_files`: more files
    published with it (a report)."""
    header = header_bytes(tensors, {"format": "pt", "splice_patch_kind": meta.kind.value})
    ends = list(accumulate((t.nbytes for t in tensors), initial=len(header)))
    with staged_output(directory, force, protected, "the patch's source") as staging:
        with open(staging / TENSORS, "xb") as handle:
            handle.write(header)
            handle.truncate(ends[-1])
            handle.flush()
            fill(handle, ends[:-1])
        (staging / MANIFEST).write_text(meta.model_dump_json(indent=2) + "\n")
        for name, data in (extra_files or {}).items():
            (staging / name).write_bytes(data)
    return Path(directory)


class StoredTensors(Mapping[str, torch.Tensor]):
    """A stored patch's tensors, each read when it is looked up (ranged reads, locally or remotely): `LazyTensors`."""

    def __init__(self, stored: Checkpoint):
        self.stored = stored
        self.shapes = {name: info.shape for name, info in stored.tensors.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.stored.tensors:
            raise KeyError(name)
        return self.stored.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.stored.tensors)

    def __len__(self) -> int:
        return len(self.stored.tensors)

    def read_all(self) -> dict[str, torch.Tensor]:
        return dict(self)


class Patch:
    """Named tensors and their manifest. `tensors` are held in a dict, or read lazily (`LazyTensors`: a stored
    patch reads each on lookup)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], meta: PatchMeta):
        self.tensors: Mapping[str, torch.Tensor] = tensors if isinstance(tensors, LazyTensors) else dict(tensors)
        self.meta = meta

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape, without reading any values."""
        if isinstance(self.tensors, LazyTensors):
            return dict(self.tensors.shapes)
        return {n: tuple(t.shape) for n, t in self.tensors.items()}

    @property
    def size(self) -> PatchSize:
        """The values the patch holds, and a mask patch's mask bits apart."""
        return KINDS[self.meta.kind].size(self.shapes, self.meta.settings)

    @property
    def num_parameters(self) -> int:
        """The values the patch holds (a mask patch's packed mask bits are not parameters)."""
        return self.size.values

    @property
    def stored_at(self) -> str | None:
        """Where the tensors are read from when they are read lazily from a stored patch (else None)."""
        return self.tensors.stored.location if isinstance(self.tensors, StoredTensors) else None

    def as_dict(self) -> dict:
        """What the patch is, without its values: the manifest, each tensor's shape, the parameter count."""
        return {
            "meta": self.meta.model_dump(mode="json"),
            "shapes": {n: list(s) for n, s in self.shapes.items()},
            "parameters": self.num_parameters,
        }

    def in_memory(self) -> Patch:
        """The same patch with every tensor read now (together, where the store can: one ranged read per pack)."""
        if isinstance(self.tensors, LazyTensors):
            return Patch(self.tensors.read_all(), self.meta)
        return Patch(dict(self.tensors), self.meta)

    def save(
        self, directory: str | os.PathLike, force: bool = False, extra_files: Mapping[str, bytes] | None = None
    ) -> Path:
        """Write `patch.json` and `tensors.safetensors` (and `extra_files`), published atomically."""
        specs = [OutputTensor(name, t.dtype, tuple(t.shape)) for name, t in self.tensors.items()]

        def fill(handle: BinaryIO, offsets: list[int]) -> None:
            for tensor, offset in zip(self.tensors.values(), offsets):
                handle.seek(offset)
                handle.write(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)

        return write_patch_dir(
            directory,
            self.meta,
            specs,
            fill,
            force,
            protected=[self.stored_at] if self.stored_at else [],
            extra_files=extra_files,
        )

    @classmethod
    def load(cls, location: str | os.PathLike, storage_options: dict | None = None) -> Patch:
        """A patch directory, locally or at any fsspec URL (tensors read through the spine's checked reader)."""
        try:
            stored = Checkpoint.open(location, storage_options, weights_file=TENSORS)
        except CheckpointError as exc:
            raise PatchError(f"not a splice patch: {exc}") from None
        if MANIFEST not in stored.files():
            raise PatchError(f"not a splice patch: {location} has no {MANIFEST}")
        try:
            meta = PatchMeta.model_validate(parse_json(stored.read_file(MANIFEST)))
        except ValidationError as exc:
            raise PatchError(f"{location}/{MANIFEST}: {one_line(exc, 'manifest')}") from None
        except ValueError as exc:  # not JSON
            raise PatchError(f"{location}/{MANIFEST}: manifest: {exc}") from None
        if meta.format_version > FORMAT_VERSION:
            raise PatchError(
                f"{location}: patch format {meta.format_version} is newer than this splice "
                f"({FORMAT_VERSION}); upgrade splice"
            )
        return cls(StoredTensors(stored), meta)

    def check_base(self, base: Checkpoint, allow_drift: bool = False) -> list[BaseMismatch]:
        """Refuse a base the patch was not made for (unless allow_drift); returns the differences.
        A patch without a base record (imported from PEFT) is checked by shape only, where it is applied."""
        if self.meta.base is None:
            return []
        mismatches = compare_base(self.meta.base, base)
        if not allow_drift:
            refuse_drift(mismatches, base.location, self.meta.kind.value, "`allow_base_drift=True`")
        return mismatches


def describe_settings(meta: PatchMeta) -> str:
    """The kind-specific settings of a patch in one readable line (per-module tables summarised)."""
    return KINDS[meta.kind].describe(meta.settings)
