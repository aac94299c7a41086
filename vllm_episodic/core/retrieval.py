"""Which events a layer attends to: similarity top-k plus temporal contiguity.

EM-LLM's two-stage retrieval, per layer and step:

1. *similarity*: events ranked by query · representative keys (summed over heads),
   taken greedily in rank order while they fit ``(1 − share) × budget`` tokens;
2. *contiguity*: the temporal neighbours (event ± 1) of those events enter a queue of
   ``share × budget`` tokens that persists across steps; new neighbours go in front,
   the oldest fall out when it is full.

Scoring and selection go through :mod:`vllm_episodic.kernels` (Triton on a GPU).
"""

from __future__ import annotations

from collections import deque

import torch

from vllm_episodic.kernels import score_events, select_within_budget


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
    query: torch.Tensor,
    reps: torch.Tensor,
    available: torch.Tensor,
    budget: int,
    buffer: ContiguityBuffer,
) -> tuple[list[int], torch.Tensor]:
    """Events to attend, best first, and every event's score.

    Args:
        query: ``[num_heads, head_size]`` the step's scoring query.
        reps: ``[events, num_heads, head_size]`` representative keys.
        available: ``(events,)`` attendable tokens of each event (0: never chosen).
        budget: tokens of events attended in total; similarity gets all of it but the
            contiguity buffer's capacity.
        buffer: this request and layer's persistent contiguity queue.

    Returns:
        the chosen events (similarity picks first, then neighbours) and ``(events,)``
        float32 scores (``-inf`` where nothing is available).
    """
    count = available.numel()
    owner = torch.zeros(count, dtype=torch.int32, device=reps.device)
    scores = score_events(query[None], reps, owner, available)
    bounds = torch.tensor([0, count], device=reps.device)
    order, taken = select_within_budget(scores, available, bounds, budget - buffer.capacity)
    chosen = order[0][taken[0]].tolist()
    used = int(available[chosen].sum()) if chosen else 0
    if buffer.capacity > 0:
        picked = set(chosen)
        for event in buffer.update(chosen, available, count):
            size = int(available[event])
            if event not in picked and size > 0 and used + size <= budget:
                chosen.append(event)
                used += size
    return chosen, scores
