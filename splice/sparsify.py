"""Sparsification shared by merges and patches: keep the largest-magnitude entries; masks bit-packed, eight entries
to a byte (entry 8i+j in bit j of byte i), as mask patches store them and Localize-and-Stitch holds them."""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

import torch

from splice.errors import PatchError

_BIT_WEIGHTS = torch.tensor([1 << bit for bit in range(8)], dtype=torch.uint8)
_SET_BITS = torch.tensor([bin(byte).count("1") for byte in range(256)], dtype=torch.int64)  # byte -> its set bits


def top_magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor | None:
    """Where the k = max(1, int(density * n)) largest-magnitude entries are (None: keep everything).

    The k-th largest magnitude is found with kthvalue (linear time) instead of a full sort. Entries equal
    to it are kept lowest index first until exactly k survive (mergekit's argsort breaks such ties in an
    unspecified order; on large fp32 tensors equal magnitudes at the threshold are common).
    """
    if density >= 1:
        return None
    count = delta.numel()
    if density <= 0 or count == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    return top_k_over({"": delta.abs()}, max(1, int(density * count)))[""]


def top_k_over(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Where the k largest scores of all the tensors together are, one boolean mask per tensor: exactly k entries in
    all (k is capped by the entries there are). Ties at the k-th score are kept in the tensors' order, lowest index
    first, so the result is deterministic."""
    if not scores:
        return {}
    parts = [score.reshape(-1) for score in scores.values()]
    flat = parts[0] if len(parts) == 1 else torch.cat(parts)  # one tensor (a merge's trim): no copy
    k = max(0, min(k, flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k:
        threshold = flat.kthvalue(flat.numel() - k + 1).values
        keep = flat > threshold
        missing = k - int(keep.sum())
        if missing:
            keep[(flat == threshold).nonzero().squeeze(1)[:missing]] = True
    masks, start = {}, 0
    for name, score in scores.items():
        masks[name] = keep[start : start + score.numel()].view(score.shape)
        start += score.numel()
    return masks


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as uint8 bytes, eight entries per byte (flattened, zero-padded)."""
    flat = mask.reshape(-1).to(torch.uint8)
    padded = torch.nn.functional.pad(flat, (0, -flat.numel() % 8)).view(-1, 8)
    return (padded * _BIT_WEIGHTS.to(padded.device)).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The boolean tensor of `shape` that `pack_mask` packed."""
    count = _packed_entries(packed, shape)
    bits = packed.reshape(-1, 1).bitwise_and(_BIT_WEIGHTS.to(packed.device)).ne(0)
    return bits.reshape(-1)[:count].reshape(shape)


def mask_indices(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Where the packed mask of `shape` is set, as sorted flat indices: only the bytes with a bit set are expanded, so
    a sparse mask costs one pass over its bytes (an eighth of the entries) and then its set entries."""
    count = _packed_entries(packed, shape)
    flat = packed.reshape(-1)
    set_bytes = flat.nonzero().squeeze(1)
    rows, bits = flat[set_bytes].reshape(-1, 1).bitwise_and(_BIT_WEIGHTS.to(flat.device)).ne(0).nonzero(as_tuple=True)
    where = set_bytes[rows] * 8 + bits
    return where[where < count]  # not the last byte's padding


def count_selected(packed: torch.Tensor, shape: Sequence[int]) -> int:
    """How many entries of `shape` the packed mask selects: its bytes' set bits, counted without unpacking (the
    last byte's padding bits left out)."""
    padding = -_packed_entries(packed, shape) % 8
    flat = packed.reshape(-1).cpu()
    if padding:
        flat = torch.cat([flat[:-1], flat[-1:] & (0xFF >> padding)])
    return int(torch.bincount(flat, minlength=256) @ _SET_BITS)


def _packed_entries(packed: torch.Tensor, shape: Sequence[int]) -> int:
    """The entries of `shape`, refused unless `packed` holds exactly the bytes they pack into."""
    count = prod(shape)
    if packed.numel() != -(-count // 8):
        raise PatchError(f"a packed mask of {packed.numel()} bytes cannot hold {count} entries of shape {list(shape)}")
    return count
