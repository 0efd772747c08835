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
