"""Retrieval for many rows at once: one call selects for several (request, layer)
rows (:func:`retrieve_rows`), for one layer of a prefill step's rows
(:func:`select_layer`) or for every layer of a decode step's rows before the layers run
(:func:`select_ahead`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vllm_episodic.core.retrieval import (
    Selection,
    fill_budget,
    most_events,
    retrieve,
    stack_queues,
)

if TYPE_CHECKING:
    from vllm_episodic.core.plan import RowPlan
    from vllm_episodic.core.request import RequestMemory


def retrieve_rows(parts: list[tuple[RequestMemory, torch.Tensor, RowPlan, torch.Tensor]]) -> list[Selection]:
    """Retrieval for some layers of several requests in one call, one row per (request,
    layer) (:mod:`.retrieval`); moves their contiguity queues and records the selections.

    Args:
        parts: per request ``(memory, layers (n,), plan, scores [n, events])``.

    Returns:
        per part its layers' selection (a row each): exactly ``plan.memory_tokens`` tokens.
    """
    pad = torch.nn.functional.pad
    width = max(scores.shape[1] for *_, scores in parts)
    scores = torch.cat([pad(part[3], (0, width - part[3].shape[1]), value=float("-inf")) for part in parts])
    sizes = torch.cat([pad(plan.available, (0, width - plan.available.numel())).expand(len(layers), -1)
                       for _, layers, plan, _ in parts])
    budget = torch.cat([torch.full((len(layers),), plan.memory_tokens) for _, layers, plan, _ in parts])
    queues = stack_queues([memory.contiguity[layers] for memory, layers, *_ in parts])
    share = parts[0][0].settings.contiguity_share
    most = max(most_events(plan.available, plan.memory_tokens) for _, _, plan, _ in parts)
    # each row's contiguity share of its own budget (a step's budget depends on its kind)
    chosen, queues = retrieve(scores, sizes, budget, queues, (share * budget).long(), most)
    selection = fill_budget(chosen, scores, sizes, budget, most)
    out, first = [], 0
    for memory, layers, plan, _ in parts:
        rows = slice(first, first + len(layers))
        first = rows.stop
        mine = selection.rows(rows)
        memory._store_queues(layers, queues[rows])
        memory._retain(layers, plan, mine)
        events = mine.events[mine.events >= 0]
        memory.stats.inc("events_retrieved", events.numel())
        memory.store.touch(events, plan.end)
        out.append(mine)
    return out


def select_layer(layer: int, rows: list[tuple[RowPlan, torch.Tensor]]) -> list[Selection]:
    """One layer's selection (one row each) for several batch rows, from each row's
    queries of this step (``[q, num_heads, head_size]``): the rows that retrieve do so
    in one call."""
    chosen = [plan.memory._unchanged(layer, plan) for plan, _ in rows]
    only = torch.tensor([layer])
    parts = [(plan.memory, only, plan, plan.memory.score_chunk(layer, plan, query))
             for (plan, query), selection in zip(rows, chosen) if selection is None]
    fresh = iter(retrieve_rows(parts) if parts else ())
    return [selection if selection is not None else next(fresh) for selection in chosen]


def select_ahead(plans: list[RowPlan]) -> list[Selection]:
    """Every layer's selection (a row per layer) for the decode rows of a step, before
    the layers run, from the queries of each row's previous token (rows that
    :meth:`RequestMemory.can_select_ahead`): one scoring call per request, one
    retrieval for every layer of every row.

    A decode step keeps its selection for ``retrieval_interval`` steps anyway; scoring
    with the previous token's queries ages it by one more step, and lets the whole
    step's retrieval and slot filling happen in a few batched calls.
    """
    parts = []
    for plan in plans:
        memory = plan.memory
        parts.append((memory, torch.arange(memory.shape.num_layers), plan, memory.score_ahead(plan)))
        plan.refresh, plan.selected_ahead = False, True
    selections = retrieve_rows(parts)
    for plan in plans:
        plan.memory.ahead_key = plan.selection_key
    return selections

