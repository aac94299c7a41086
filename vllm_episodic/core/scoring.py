"""Which queries of a step score events for retrieval.

A decode step scores with its latest queries (:meth:`RequestMemory.score_ahead`); a
prefill chunk with some of its own (:func:`scoring_rows`); the prompt's last tokens —
where a question usually sits — with every one of them, against every memory token
(:func:`prompt_end_tokens`, ``full_memory_at_prompt_end``).
"""

from __future__ import annotations

import torch

#: most queries of a prefill chunk that ``mass`` scoring uses, and how many of them are
#: the chunk's last ones (where a prompt's question sits); the rest spread evenly
SCORING_QUERIES = 64
SCORING_TAIL = 16


def prompt_end_tokens(num_computed: int, num_scheduled: int, prompt_tokens: int, last: int) -> int:
    """How many of a step's scheduled tokens are among the prompt's ``last`` tokens
    (``last`` 0: the chunk that ends the prompt counts whole). A prefill chunk holds
    prompt tokens only, so they are its last ones; a question split over two chunks
    counts in both."""
    first, end = num_computed, num_computed + num_scheduled
    if not first < prompt_tokens <= end and not (last and first < prompt_tokens and end > prompt_tokens - last):
        return 0
    start = first if not last else max(first, prompt_tokens - last)
    return min(end, prompt_tokens) - start


def scoring_rows(num_queries: int, prefill_query_tokens: int, scoring: str) -> torch.Tensor:
    """Which of a step's queries score events: the last ``prefill_query_tokens`` (0: all);
    for ``mass`` scoring at most :data:`SCORING_QUERIES` of those, the last
    :data:`SCORING_TAIL` and the rest evenly spaced before them."""
    first = max(0, num_queries - prefill_query_tokens) if prefill_query_tokens else 0
    rows = torch.arange(first, num_queries)
    if scoring != "mass" or rows.numel() <= SCORING_QUERIES:
        return rows
    head = rows[:-SCORING_TAIL]
    spread = head[torch.linspace(0, head.numel() - 1, SCORING_QUERIES - SCORING_TAIL).round().long()]
    return torch.cat((spread, rows[-SCORING_TAIL:]))
