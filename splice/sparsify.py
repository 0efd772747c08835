"""Sparsification shared by merges and patches: keep the largest-magnitude entries."""

from __future__ import annotations

import torch


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
    k = max(1, int(density * count))
    magnitudes = delta.abs().reshape(-1)
    threshold = magnitudes.kthvalue(count - k + 1).values
    keep = magnitudes > threshold
    missing = k - int(keep.sum())
    if missing:
        keep[(magnitudes == threshold).nonzero().squeeze(1)[:missing]] = True
    return keep.view_as(delta)
