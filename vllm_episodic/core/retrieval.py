"""Which events a layer attends to: similarity top-k plus temporal contiguity.

EM-LLM's two-stage retrieval, per layer and step:

1. *similarity*: events ranked by query · representative keys (summed over heads),
   taken greedily in rank order while they fit ``(1 − share) × budget`` tokens;
2. *contiguity*: the temporal neighbours (event ± 1) of those events enter a queue of
   ``share × budget`` tokens that persists across steps; new neighbours go in front,
   the oldest fall out when it is full.

When every event fits in the budget, all are attended.
"""

from __future__ import annotations

from collections import deque

import torch


def similarity_scores(query: torch.Tensor, reps: torch.Tensor) -> torch.Tensor:
    """Score of each event.

    Args:
        query: ``[num_heads, head_size]``, the step's query (mean over its tokens).
        reps: ``[events, num_heads, head_size]`` representative keys.

    Returns:
        ``(events,)`` float32: sum over heads of query · representative.
    """
    return torch.einsum("hd,ehd->e", query.float(), reps.float())


def top_within_budget(scores: torch.Tensor, sizes: torch.Tensor, budget: int) -> torch.Tensor:
    """Event ids in descending score, the longest prefix whose sizes fit ``budget``."""
    order = torch.argsort(scores, descending=True, stable=True)
    fits = torch.cumsum(sizes[order], 0) <= budget
    return order[: int(fits.sum())] if bool(fits.all()) else order[: int(fits.to(torch.int8).argmin())]


class ContiguityBuffer:
    """Temporal neighbours of recently retrieved events (one per request and layer)."""

    def __init__(self, capacity_tokens: int):
        self.capacity = capacity_tokens
        self.events: deque[int] = deque()

    def update(self, top: list[int], sizes: torch.Tensor, num_events: int) -> list[int]:
        """Push the neighbours of ``top`` (best first); return the buffer's events."""
        if self.capacity <= 0:
            return []
        chosen = set(top)
        fresh = []
        for event in top:
            for neighbour in (event + 1, event - 1):
                if 0 <= neighbour < num_events and neighbour not in chosen:
                    chosen.add(neighbour)
                    fresh.append(neighbour)
        kept = [e for e in self.events if e not in chosen and e < num_events]
        queue, used = deque(), 0
        for event in fresh + kept:  # newest first
            size = int(sizes[event])
            if used + size > self.capacity:
                continue
            queue.append(event)
            used += size
        self.events = queue
        return list(queue)

    def clear(self) -> None:
        self.events.clear()


def retrieve(
    scores: torch.Tensor,
    sizes: torch.Tensor,
    budget: int,
    contiguity_share: float,
    buffer: ContiguityBuffer,
) -> list[int]:
    """Events to attend, in temporal order.

    Args:
        scores: ``(events,)`` similarity of each event.
        sizes: ``(events,)`` tokens per event.
        budget: tokens of events attended in total.
        contiguity_share: fraction of ``budget`` reserved for temporal neighbours.
        buffer: this request and layer's persistent contiguity queue
            (its capacity is ``contiguity_share × budget``).
    """
    num_events = int(sizes.numel())
    if num_events == 0 or budget <= 0:
        return []
    if int(sizes.sum()) <= budget:
        return list(range(num_events))
    similarity_budget = budget - buffer.capacity
    top = top_within_budget(scores, sizes, similarity_budget).tolist()
    neighbours = buffer.update(top, sizes, num_events) if contiguity_share > 0 else []
    return sorted(set(top) | set(neighbours))
