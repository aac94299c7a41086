"""Graph refinement of event boundaries (EM-LLM §3.2), vectorised.

Tokens are nodes of a graph whose edge weights are key similarities. Each boundary
between two consecutive events moves to the split point of the pair that maximises
modularity (or minimises conductance) of the two-community partition
``{[p, t), [t, n)}``, keeping both events within [min_size, max_size]. All split
points of a pair are scored at once from 2-D prefix sums of the similarity matrix;
the only Python loop is over boundaries.
"""

from __future__ import annotations

import torch


def key_similarity(keys: torch.Tensor) -> torch.Tensor:
    """Edge weights between tokens from their (un-rotated) keys.

    Args:
        keys: ``[groups, tokens, head_size]``: every (layer, KV head) pair is a group.

    Returns:
        ``[tokens, tokens]`` float32, sum over groups of the cosine similarity clamped at
        0 (modularity and conductance need non-negative weights).
    """
    k = torch.nn.functional.normalize(keys.float(), dim=-1)
    return torch.einsum("gid,gjd->ij", k, k).clamp(min=0)


def split_scores(adjacency: torch.Tensor, metric: str) -> torch.Tensor:
    """Score every two-community split ``{[0, t), [t, n)}`` of a graph.

    Args:
        adjacency: ``[n, n]`` symmetric, non-negative.
        metric: ``"modularity"`` (higher is better) or ``"conductance"`` (lower is better).

    Returns:
        ``(n + 1,)``: score of splitting at t = 0..n (t = 0 and n are one community).
    """
    a = adjacency.double()
    degree = a.sum(1)
    total = degree.sum()  # 2m
    zero = torch.zeros(1, dtype=torch.float64)
    inner_prefix = torch.cat((zero, a.cumsum(0).cumsum(1).diagonal()))  # sum A[:t, :t]
    vol_left = torch.cat((zero, degree.cumsum(0)))  # sum of degrees in [0, t)
    inner_left = inner_prefix
    inner_right = total - 2 * vol_left + inner_left
    vol_right = total - vol_left
    if metric == "modularity":
        if total <= 0:
            return torch.zeros_like(vol_left)
        return (inner_left + inner_right - (vol_left**2 + vol_right**2) / total) / total
    if metric == "conductance":
        cut = vol_left - inner_left
        smaller = torch.minimum(vol_left, vol_right)
        scores = cut / smaller.clamp(min=1e-12)
        scores[smaller <= 0] = float("inf")
        return scores
    raise ValueError(f"metric must be 'modularity' or 'conductance', got {metric!r}")


def refine_boundaries(
    bounds: list[int],
    similarity: torch.Tensor,
    offset: int,
    min_size: int,
    max_size: int,
    metric: str,
) -> list[int]:
    """Move the inner boundaries of consecutive events to better split points.

    Args:
        bounds: ``[b_0, b_1, ..., b_k]`` event edges (absolute token positions); event i
            is ``[b_i, b_{i+1})``. ``b_0`` and ``b_k`` stay fixed.
        similarity: ``[n, n]`` over tokens ``[offset, offset + n)``, covering
            ``[b_0, b_k)``.
        offset: absolute position of the first row of ``similarity``.

    Returns:
        the refined edges: same count, strictly increasing, sizes within bounds.
    """
    out = list(bounds)
    better = max if metric == "modularity" else min
    for i in range(1, len(out) - 1):
        left, right = out[i - 1], out[i + 1]
        lo = max(left + min_size, right - max_size)
        hi = min(left + max_size, right - min_size)
        if lo >= hi:
            continue
        window = similarity[left - offset : right - offset, left - offset : right - offset]
        scores = split_scores(window, metric)
        candidates = torch.arange(lo - left, hi - left + 1)
        values = scores[candidates]
        best = int(candidates[(values.argmax() if better is max else values.argmin())])
        out[i] = left + best
    return out
