"""`LazyTensors`: the interface of a patch's tensors when they are not held in memory. A patch read from a patch
file (`StoredTensors`), from a registry version (`RegistryTensors`) or computed on lookup (`MappedTensors`: a rescaled
or ported patch) is a name -> tensor mapping that knows every shape without reading a value, and reads them all
at once as cheaply as its store allows. A plain dict of tensors is the in-memory case; `Patch` tells them apart."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class LazyTensors(Protocol):
    """Tensors read (or computed) when looked up."""

    @property
    def shapes(self) -> Mapping[str, tuple[int, ...]]:
        """Tensor name -> shape, without reading any values."""
        ...

    def __getitem__(self, name: str) -> torch.Tensor: ...

    def __iter__(self) -> Iterator[str]: ...

    def __len__(self) -> int: ...

    def read_all(self) -> dict[str, torch.Tensor]:
        """Every tensor, read now (together, where the store can: one ranged read per pack)."""
        ...
