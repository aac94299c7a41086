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

from vllm_episodic.kernels import score_layer_events, select_within_budget


class ContiguityBuffer:
    """Temporal neighbours of recently retrieved events (one per request and layer)."""

    def __init__(self, capacity_tokens: int):
        self.capacity = capacity_tokens
        self.events: deque[int] = deque()

    def update(self, top: list[int], sizes, num_events: int) -> list[int]:
        """Push the neighbours of ``top`` (best first); return the buffer's events.
        ``sizes[e]``: tokens of event e (a list or a tensor)."""
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


def retrieve_layers(
    queries: torch.Tensor,
    reps: torch.Tensor,
    available: torch.Tensor,
    budget: int,
    buffers: list[ContiguityBuffer],
) -> tuple[list[list[int]], torch.Tensor]:
    """Events to attend for one or more layers of one request, best first, in one scoring
    and one selection call (the layers share the events and the budget).

    Args:
        queries: ``[layers, num_heads, head_size]`` one scoring query per layer.
        reps: ``[layers, events, num_heads, head_size]`` representative keys.
        available: ``(events,)`` attendable tokens of each event (0: never chosen).
        budget: tokens of events attended per layer; similarity gets all of it but the
            contiguity queue's capacity.
        buffers: the layers' persistent contiguity queues (all of the same capacity).

    Returns:
        per layer the chosen events (similarity picks first, then neighbours), and
        ``[layers, events]`` float32 scores (``-inf`` where nothing is available).
    """
    layers, count = reps.shape[:2]
    scores = score_layer_events(queries, reps, available)
    bounds = torch.arange(layers + 1, device=reps.device) * count
    positive = available[available > 0]
    smallest = int(positive.min()) if positive.numel() else 1
    order, taken = select_within_budget(scores.flatten(), available.repeat(layers), bounds,
                                        budget - buffers[0].capacity, longest=count, smallest=smallest)
    # one read-back for all layers; -1 marks what did not fit
    ranked = order.masked_fill(~taken, -1).tolist()
    sizes = available.tolist()
    chosen = [_with_neighbours([e for e in row if e >= 0], sizes, budget, buffer)
              for row, buffer in zip(ranked, buffers)]
    return chosen, scores


def _with_neighbours(chosen: list[int], sizes: list[int], budget: int, buffer: ContiguityBuffer) -> list[int]:
    """The similarity picks, then the contiguity queue's events while they fit the budget
    (``sizes``: every event's available tokens)."""
    if buffer.capacity <= 0:
        return chosen
    used = sum(sizes[e] for e in chosen)
    picked = set(chosen)
    for event in buffer.update(chosen, sizes, len(sizes)):
        size = sizes[event]
        if event not in picked and size > 0 and used + size <= budget:
            chosen.append(event)
            used += size
    return chosen
