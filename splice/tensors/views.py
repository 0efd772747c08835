"""`DerivedCheckpoint`: a model whose tensors are another checkpoint's, some of them computed on read.

What a merge's inputs look like once prepared: a LoRA applied on the fly (`base+lora`), embedding rows put in the
output vocabulary's order (tokenizer alignment). The stream reads it as it reads any `Checkpoint`; tensors it does
not derive are read (and copied byte for byte) from the inner checkpoint, and its side files are the inner's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from splice.errors import CheckpointError
from splice.tensors.checkpoint import Checkpoint
from splice.tensors.ranged import RemoteRange
from splice.tensors.safetensors import TensorInfo
from splice.tensors.stream import Rows

DeriveTensor = Callable[[str, Rows], torch.Tensor]
"""(tensor name, rows of dim 0 or None for all) -> the derived tensor's value, in the dtype and shape its info says."""


class DerivedCheckpoint(Checkpoint):
    def __init__(
        self,
        inner: Checkpoint,
        derived: Mapping[str, TensorInfo],
        derive: DeriveTensor,
        location: str | None = None,
        derived_from: Sequence[Checkpoint] = (),
    ):
        """`derived`: name -> info (dtype, shape) of each tensor `derive` computes, replacing or added to the inner
        checkpoint's in its storage order; `location` names the view in messages (default: the inner's);
        `derived_from`: every other checkpoint `derive` reads (a LoRA adapter), so that the view's digest
        (`splice.tensors.digest`) changes when one of them does."""
        tensors = {name: derived.get(name, info) for name, info in inner.tensors.items()}
        tensors.update({name: info for name, info in derived.items() if name not in tensors})
        super().__init__(location or inner.location, inner.fs, inner.root, tensors, inner.shards)
        self.inner = inner
        self.derived = frozenset(derived)
        self.derived_from = tuple(derived_from)
        self._derive = derive

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if name not in self.derived:
            return self.inner.read(name, rows)
        return self._derive(name, rows)

    def local_byte_range(self, name: str) -> tuple[int, int, int] | None:
        return None if name in self.derived else self.inner.local_byte_range(name)

    def remote_byte_range(self, name: str, rows: Rows = None) -> RemoteRange | None:
        return None if name in self.derived else self.inner.remote_byte_range(name, rows)

    @property
    def is_local(self) -> bool:
        return self.inner.is_local

    def files(self) -> list[str]:
        return self.inner.files()

    def read_file(self, name: str, limit: int | None = None, follow_links: bool = True) -> bytes:
        if limit is None:
            return self.inner.read_file(name, follow_links=follow_links)
        return self.inner.read_file(name, limit, follow_links)

    def close(self) -> None:
        self.inner.close()


class MappedCheckpoint(Checkpoint):
    """Tensors looked up by name in a mapping that reads each when asked (a registry version's tensors, hash-checked
    on every read), read by the stream as it reads any `Checkpoint`. The last tensor looked up is kept, so reading
    one tensor block of rows by block costs one lookup; there are no side files."""

    def __init__(self, location: str, tensors: Mapping[str, torch.Tensor], infos: Mapping[str, TensorInfo]):
        import fsspec

        super().__init__(
            location, fsspec.filesystem("memory"), "", dict(infos), sorted({i.shard for i in infos.values()})
        )
        self._mapping = tensors
        self._last: tuple[str, torch.Tensor] | None = None

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        with self._lock:
            if self._last is None or self._last[0] != name:
                if name not in self.tensors:
                    raise CheckpointError(f"{self.location}: no tensor named {name}")
                self._last = (name, self._mapping[name])
            tensor = self._last[1]
        return tensor if rows is None else tensor[rows[0] : rows[1]]

    def local_byte_range(self, name: str) -> tuple[int, int, int] | None:
        return None

    def remote_byte_range(self, name: str, rows: Rows = None) -> RemoteRange | None:
        return None

    @property
    def is_local(self) -> bool:
        return False

    def files(self) -> list[str]:
        return []

    def read_file(self, name: str, limit: int | None = None, follow_links: bool = True) -> bytes:
        raise CheckpointError(f"{self.location} holds tensors only: no file {name}")
