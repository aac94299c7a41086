"""The episodic memory of a worker: one :class:`RequestMemory` per request
(:mod:`.request`), the plan of each step's rows (:mod:`.plan`) and retrieval for many
rows at once (:mod:`.select`).

Token layout of a request with ``L`` computed tokens (``bs``: paged-KV block size)::

    [0, S)                   sinks (S = sink_tokens rounded up to whole blocks)
    [S, C)                   first memory tokens; later their KV blocks become the
                             request's device event cache (C − S slots)
    [S, open)                closed events (host store)
    [open, L)                the event being formed + the local window

A step has three phases:

1. :meth:`EpisodicMemory.plan_step` (before the layers run) decides each row's *mode*:
   ``natural`` – nothing is in memory yet, or the memory tokens are still in their
   own KV blocks: plain causal attention over the natural block table (identical to
   stock vLLM); ``assembled`` – attention over sinks + the event cache's attended
   slots + local blocks from ``local_start = ⌊open / bs⌋·bs``, one softmax (the
   platform op over an assembled block table); ``reference`` – the same attention in
   torch (a fallback, and the reference the op path is tested against).
2. per layer: :meth:`RequestMemory.select` retrieves events for exactly
   ``memory_tokens`` tokens (similarity top-k + contiguity, the last event possibly
   cut), the caller fills the slots, attends, and :meth:`EpisodicMemory.record_queries`
   gathers the queries the rows keep (one gather per layer for the whole batch).
3. :meth:`EpisodicMemory.end_step` (after the model forward, once the step's surprise
   is known): each row keeps its recorded queries of every layer at once
   (:meth:`RequestMemory.keep_queries`), then tokens that left the window become
   events and move from the paged KV cache to the host store, before the scheduler
   frees their blocks.

Positions: vLLM hands over queries and keys rotated at their absolute positions; the
local part is attended as is (exact relative distances). Memory keys are rotated to:

- ``exact``: their true positions (with every event retrieved: full attention);
- ``bounded`` (InfLLM/EM-LLM): retrieved events are placed so that they *end* at one
  anchor position A, and A = (first query) − window. Events that follow each other in
  the context (a *run*: each fully retrieved but the last) are laid out contiguously,
  the run's last token at A, so that text crossing an event boundary (a number cut by
  a surprise boundary, typically) reads in order; separate runs overlap at A. Sinks sit
  before every run (sink i at A − budget − max_event − S + i). Memory thus sits
  ``window`` tokens before the queries (up to ``window + REANCHOR + chunk`` as queries
  advance; past that A moves and the cache is rewritten) and spans at most the budget
  plus one event: the model never sees a distance beyond its trained range.

``auto`` uses ``exact`` while the context fits the model's trained length.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vllm_episodic.core.kept import KeptMemories, attach, keep, tail_start, tensor_bytes
from vllm_episodic.core.plan import (
    OBSERVATION_QUERIES,
    BatchRow,
    Frame,
    Layout,
    Mode,
    ModelShape,
    RowPlan,
    Settings,
    StatsSink,
    TokenReader,
)
from vllm_episodic.core.refinement import key_similarity, refine_boundaries
from vllm_episodic.core.request import RequestMemory, whole_selection
from vllm_episodic.core.rope import Rope
from vllm_episodic.core.scoring import prompt_end_tokens, scoring_rows
from vllm_episodic.core.store import held_bytes


class EpisodicMemory:
    """The requests of one worker, created on first sight and freed on release."""

    def __init__(self, settings: Settings, shape: ModelShape, rope: Rope, stats: StatsSink,
                 reference: bool = False):
        self.settings = settings
        self.shape = shape
        self.rope = rope
        self.stats = stats
        self.reference = reference
        self.layout = Layout.of(settings, shape.block_size)
        self.requests: dict[str, RequestMemory] = {}
        self.kept = KeptMemories()
        # the step's rows that keep queries, as (memory, queries kept, last position), the
        # index of those queries in the step's flattened tokens, and what each layer gathered
        self._keeping: list[tuple[RequestMemory, int, int]] = []
        self._kept_index: torch.Tensor | None = None
        self._recorded: list[torch.Tensor | None] = []

    def frame_for(self, context_len: int) -> Frame:
        positions = self.settings.positions
        if positions == "auto":
            return Frame.EXACT if context_len <= self.shape.trained_len else Frame.BOUNDED
        return Frame(positions)

    def plan_step(self, rows: list[BatchRow], block_rows: torch.Tensor | None = None) -> list[RowPlan]:
        """What each batch row does in the step about to run.

        Args:
            rows: the batch, in row order.
            block_rows: ``[rows, max_blocks]`` paged-KV block table of the batch.
        """
        s = self.settings
        plans, first_query = [], 0
        for index, row in enumerate(rows):
            memory = self.requests.get(row.req_id)
            if memory is None or row.num_computed < memory.num_tokens:
                # new, or recomputed from scratch after preemption
                if row.num_computed > 0:
                    raise ValueError(f"request {row.req_id} starts at token {row.num_computed} "
                                     "without a kept memory to attach to")
                memory = self.requests[row.req_id] = self._new_request(row)
            end = row.num_computed + row.num_scheduled
            mode, local_start, memory_tokens, cache_slots, anchor, rewrite = memory.plan(
                self.frame_for(end), row.num_computed, row.num_scheduled, self.reference
            )
            memory.num_tokens = end
            self.stats.inc("tokens_processed", row.num_scheduled)
            plan = RowPlan(
                memory=memory, first_query=first_query, num_computed=row.num_computed,
                num_scheduled=row.num_scheduled, mode=mode, local_start=local_start,
                memory_tokens=memory_tokens, cache_slots=cache_slots, frame=memory.frame,
                anchor=anchor, rewrite=rewrite,
                block_row=None if block_rows is None else block_rows[index],
                observe=end + OBSERVATION_QUERIES + row.num_scheduled > self.layout.sinks + s.window_tokens,
                refresh=memory.refreshes(row.num_scheduled, rewrite),
            )
            plan.prompt_end = prompt_end_tokens(row.num_computed, row.num_scheduled, row.prompt_tokens, s.prompt_end_queries)
            if mode is not Mode.NATURAL and memory_tokens > 0:
                self._plan_retrieval(plan)
                # between decode retrievals every layer keeps what select_ahead chose
                # for it (and the slots hold that): the layers skip selection entirely
                plan.selected_ahead = (not plan.refresh and plan.everything is None
                                       and memory.ahead_key == plan.selection_key)
            # the chunk that ends the prompt sees all of memory (exact frame), unless its
            # budget already holds all of it
            plan.all_memory = (s.full_memory_at_prompt_end and mode is not Mode.NATURAL and plan.frame is Frame.EXACT
                               and plan.prompt_end > 0 and plan.everything is None)
            if mode is Mode.REFERENCE:
                plan.torch_queries = row.num_scheduled
            elif plan.all_memory:
                plan.torch_queries = plan.prompt_end
            plans.append(plan)
            first_query += row.num_scheduled
        self._begin_recording(plans)
        self.update_gauges()
        return plans

    def _new_request(self, row: BatchRow) -> RequestMemory:
        return RequestMemory(row.req_id, self.settings, self.shape, self.layout,
                             max(row.capacity, row.num_computed + row.num_scheduled), self.stats, self.rope)

    def keep(self, req_id: str, kept_id: str, token_ids: torch.Tensor,
             read_tail: Callable[[RequestMemory, int, int], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep a finished request's memory as ``kept_id`` (:mod:`.kept`).

        Args:
            token_ids: its computed tokens.
            read_tail: ``(memory, start, end)`` -> keys (rotated) and values ``[num_layers,
                end - start, num_kv_heads, head_size]`` of its tokens from the paged cache.
        """
        memory = self.requests.pop(req_id)
        self.kept.add(kept_id, keep(memory, token_ids, read_tail(memory, tail_start(memory), memory.num_tokens)))
        self.update_gauges()

    def attach(self, row: BatchRow, kept_id: str, next_token: int | None) -> RequestMemory:
        """A new request whose first ``row.num_computed`` tokens are those of a kept
        memory: its memory as the kept one's at that token (:func:`.kept.attach`)."""
        memory = self._new_request(row)
        attach(memory, self.kept.get(kept_id), row.num_computed, next_token)
        self.requests[row.req_id] = memory
        self.stats.inc("tokens_reused", row.num_computed)
        return memory

    def drop_kept(self, kept_ids) -> None:
        self.kept.drop(kept_ids)
        self.update_gauges()

    def _begin_recording(self, plans: list[RowPlan]) -> None:
        """Which queries of the step :meth:`record_queries` gathers: the last
        ``OBSERVATION_QUERIES`` of each row that observes."""
        keeping = [(plan, min(plan.num_scheduled, OBSERVATION_QUERIES)) for plan in plans if plan.observe]
        self._keeping = [(plan.memory, n, plan.end - 1) for plan, n in keeping]
        self._kept_index = torch.cat([
            torch.arange(plan.query_rows.stop - n, plan.query_rows.stop) for plan, n in keeping
        ]) if keeping else None
        self._recorded = [None] * self.shape.num_layers

    def record_queries(self, layer: int, query: torch.Tensor) -> None:
        """Gather the queries the step's rows keep from one layer's ``query [num_tokens,
        num_heads, head_size]`` (the batch's rows, flattened): one gather for all rows;
        :meth:`end_step` hands them to the rows."""
        if self._kept_index is not None:
            self._recorded[layer] = query.index_select(0, self._kept_index)

    def _keep_recorded(self) -> None:
        """Give each row its recorded queries of every layer (one stack for the step).
        A step that not every layer recorded (the memory driven by hand) keeps none: the
        ring holds the same steps in every layer."""
        recorded, keeping = self._recorded, self._keeping
        self._recorded, self._keeping, self._kept_index = [], [], None
        if not keeping or any(queries is None for queries in recorded):
            return
        queries = torch.stack(recorded)  # [num_layers, kept, num_heads, head_size]
        first = 0
        for memory, n, position in keeping:
            memory.keep_queries(queries[:, first : first + n], position)
            first += n

    def _plan_retrieval(self, plan: RowPlan) -> None:
        """What every layer's retrieval shares in this step."""
        plan.available = plan.memory.available_tokens(plan.local_start)
        if int(plan.available.sum()) <= plan.memory_tokens:
            plan.everything = whole_selection(plan.available)
        else:
            if plan.scores_tokens:
                plan.score_rows = torch.arange(plan.num_scheduled - plan.prompt_end, plan.num_scheduled)
            else:
                plan.score_rows = scoring_rows(plan.num_scheduled, self.settings.prefill_query_tokens, self.settings.retrieval_scoring)
            scoring = plan.query_positions[plan.score_rows]
            plan.score_angles = self.rope.angles(self.settings.window_tokens - scoring)

    def end_step(self, plans: list[RowPlan], read_tokens: TokenReader) -> None:
        """Keep the step's recorded queries, then cut the tokens that left each row's
        window into events and store them."""
        self._keep_recorded()
        s = self.settings
        for plan in plans:
            memory = plan.memory
            refine = None
            if s.refinement and s.segmentation == "surprise":
                refine = lambda bounds, p=plan: self._refine(bounds, p, read_tokens)  # noqa: E731
            first_time = memory.store is None
            events = memory.segment(plan.end - s.window_tokens, refine)
            if not events:
                continue
            self.stats.inc("events_created", len(events))
            start = int(memory.store.starts[events.start])
            end = int(memory.store.ends[events.stop - 1])
            store = memory.store
            needed = store.pages_needed(0 if first_time else start, end) * store.page_bytes()
            if not self._make_host_room(needed + len(events) * store.event_bytes()):
                # over the cap even after eviction: these events are not kept
                store.drop_events(events)
                self.stats.inc("events_evicted", len(events))
                if not first_time:
                    continue
                start = end = self.layout.sinks  # the sinks are always kept
            if first_time:
                memory.absorb(0, *self._read_layers(plan, read_tokens, 0, self.layout.sinks), self.rope)
            if end > start:
                memory.absorb(start, *self._read_layers(plan, read_tokens, start, end), self.rope, events)
        self.update_gauges()

    def _read_layers(self, plan: RowPlan, read_tokens: TokenReader, start: int, end: int):
        """K/V ``[num_layers, end - start, num_kv_heads, head_size]`` of a row's tokens."""
        return read_tokens(plan, torch.arange(self.shape.num_layers), start, end)

    def host_bytes(self) -> int:
        """Host bytes of every live request's and kept memory (a shared page counts once)."""
        stores = [m.store for m in self.requests.values()] + self.kept.stores()
        return held_bytes(stores) + tensor_bytes(self.kept.tensors())

    def _make_host_room(self, needed: int) -> bool:
        """Stay under the host memory cap: drop the least recently retrieved pages of
        the request holding the most memory until ``needed`` more bytes fit. Returns
        whether they fit."""
        cap = int(self.settings.host_memory_gib * (1 << 30))
        while self.host_bytes() + needed > cap:
            stores = sorted((m.store for m in self.requests.values() if m.store is not None),
                            key=lambda st: st.nbytes, reverse=True)
            victim = next((st for st in stores if st.evictable_pages(protected=1)), None)
            if victim is None:
                return False
            self.stats.inc("events_evicted", victim.evict_page(victim.evictable_pages(protected=1)[0]))
        return True

    def _refine(self, bounds: list[int], plan: RowPlan, read_tokens: TokenReader) -> list[int]:
        """Refine boundaries with the similarity of un-rotated keys of the upper half of
        the layers (EM-LLM uses the upper layers too)."""
        s = self.settings
        positions = torch.arange(bounds[0], bounds[-1])
        layers = torch.arange(self.shape.num_layers // 2, self.shape.num_layers)
        keys, _ = read_tokens(plan, layers, bounds[0], bounds[-1])  # [layers, n, kv_heads, head_size]
        n, head_size = keys.shape[1], keys.shape[-1]
        # one rotation for all layers; the graph takes [layers * kv_heads, n, head_size]
        flat = self.rope.rotate(keys.transpose(0, 1).reshape(n, -1, head_size), positions, inverse=True)
        similarity = key_similarity(flat.transpose(0, 1))
        return refine_boundaries(bounds, similarity, bounds[0], s.min_event_tokens, s.max_event_tokens,
                                 s.refinement_metric)

    def release(self, req_ids) -> None:
        """Free everything held for these requests (finished, aborted or preempted)."""
        for req_id in req_ids:
            self.requests.pop(req_id, None)
        self.update_gauges()

    def update_gauges(self) -> None:
        self.stats.set("requests_tracked", len(self.requests))
        stores = [m.store for m in self.requests.values() if m.store is not None]
        self.stats.set("tokens_held", sum(st.num_tokens for st in stores))
        self.stats.set("host_bytes", self.host_bytes())
        self.stats.set("kept_memories", len(self.kept))
        self.stats.set("kept_bytes", self.kept.nbytes())

    def update_slow_gauges(self) -> None:
        """Gauges that walk every cached event: call only before publishing."""
        self.stats.set("device_cache_tokens", sum(m.slots.resident_tokens() for m in self.requests.values()))
