"""The episodic memory of a worker: one :class:`RequestMemory` per request.

A step has three phases:

1. :meth:`EpisodicMemory.plan_step` (before the layers run): what each batch row does
   in this step: its local window, its position frame, whether memory is active.
2. per layer, :meth:`RequestMemory.attend` (retrieve events and attend over sinks +
   events + local window) and :meth:`RequestMemory.observe` (keep the latest queries).
3. :meth:`EpisodicMemory.end_step` (after the model forward, once the step's surprise
   is known): the tokens that left the local window are cut into events and move from
   the paged KV cache to the host store with their representatives. This happens
   before the scheduler frees their blocks at the start of the next step.

Token layout of a request with ``L`` computed tokens::

    [0, S)            sinks: always attended, stay in the paged KV cache
    [S, local_start)  memory: closed events, in the host store
    [local_start, L)  local window (+ the event still being formed): paged KV cache

Positions: vLLM hands over queries and keys rotated at their absolute positions.
The local window is attended as it is (exact relative distances, at most
window + one event + one prefill chunk). Memory is attended in one of two frames:

- ``exact``: event keys rotated at their true positions (equals full attention
  when every event is retrieved);
- ``bounded`` (InfLLM/EM-LLM): every memory token sits at position S and the query
  at S + window, so memory is always ``window`` tokens away, inside the trained range.

``auto`` uses ``exact`` while the context fits the model's trained length.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from vllm_episodic.core.attention import attention_with_lse, merge_partials
from vllm_episodic.core.event_cache import EventCache
from vllm_episodic.core.refinement import key_similarity, refine_boundaries
from vllm_episodic.core.representatives import representatives
from vllm_episodic.core.retrieval import ContiguityBuffer, retrieve, similarity_scores
from vllm_episodic.core.rope import Rope
from vllm_episodic.core.segmentation import Segmenter
from vllm_episodic.core.store import HostStore
from vllm_episodic.metrics import Stats

#: recent queries per layer that decide an event's representatives
OBSERVATION_QUERIES = 32
#: queries of a prefill chunk that share one retrieval (EM-LLM: 512)
RETRIEVAL_CHUNK = 512
#: token slots per block of the device event cache
CACHE_BLOCK = 16


class Settings(Protocol):
    """What the memory reads from its configuration (``EpisodicConfig`` has it all)."""

    sink_tokens: int
    window_tokens: int
    retrieval_budget_tokens: int
    min_event_tokens: int
    max_event_tokens: int
    segmentation: str
    surprise_gamma: float
    surprise_window: int
    contiguity_share: float
    refinement: bool
    refinement_metric: str
    representatives_per_event: int
    device_event_cache_tokens: int
    positions: str


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype
    trained_len: int
    """context length the model was trained for"""


@dataclass(frozen=True)
class BatchRow:
    """One request's share of an engine step."""

    req_id: str
    num_computed: int
    """tokens whose KV was computed before this step"""
    num_scheduled: int
    """tokens computed in this step"""
    capacity: int = 0
    """the request's largest possible length (prompt + max new tokens)"""


@dataclass
class RowPlan:
    """What the layers do for one batch row in this step."""

    memory: RequestMemory
    first_query: int
    """index of the row's first query in the step's flattened tokens"""
    num_computed: int
    num_scheduled: int
    local_start: int
    """first token attended in the local part"""
    block_row: torch.Tensor | None
    """(max_blocks,) the row's paged-KV block table"""
    frame: str
    """``exact`` or ``bounded``"""
    observe: bool
    """keep this step's queries for future representatives"""

    @property
    def active(self) -> bool:
        """Whether some of the context lives in memory (else: plain attention)."""
        return self.local_start > self.memory.settings.sink_tokens

    @property
    def end(self) -> int:
        return self.num_computed + self.num_scheduled


# reads tokens [start, end) of one batch row and layer from the paged KV cache:
# (plan, layer, start, end) -> keys, values [end - start, num_kv_heads, head_size]; keys rotated
TokenReader = Callable[["RowPlan", int, int, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class RequestMemory:
    """Everything the backend holds for one request."""

    req_id: str
    settings: Settings
    shape: ModelShape
    capacity: int
    stats: Stats
    num_tokens: int = 0
    store: HostStore | None = None
    cache: EventCache | None = None
    frame: str | None = None
    carry_logits: torch.Tensor | None = None
    """``[1, vocab]`` logits of the last computed token: they give the surprise of the
    next token once it is known"""
    surprise: torch.Tensor = field(init=False)
    segmenter: Segmenter = field(init=False)
    contiguity: list[ContiguityBuffer] = field(init=False)
    observations: list[torch.Tensor | None] = field(init=False)

    def __post_init__(self):
        s = self.settings
        self.surprise = torch.zeros(self.capacity + 1, dtype=torch.float32)
        self.segmenter = Segmenter(
            s.sink_tokens, s.min_event_tokens, s.max_event_tokens, s.segmentation,
            window=s.surprise_window, gamma=s.surprise_gamma,
        )
        contiguity_tokens = int(s.contiguity_share * s.retrieval_budget_tokens)
        self.contiguity = [ContiguityBuffer(contiguity_tokens) for _ in range(self.shape.num_layers)]
        self.observations = [None] * self.shape.num_layers

    @property
    def local_start(self) -> int:
        return self.segmenter.open_start

    @property
    def host_bytes(self) -> int:
        return self.store.nbytes if self.store is not None else 0

    def record_surprise(self, first: int, values: torch.Tensor) -> None:
        end = min(first + values.numel(), self.surprise.numel())
        if end > first:
            self.surprise[first:end] = values[: end - first]

    # ---- per step -------------------------------------------------------------------

    def segment(self, limit: int, refine: Callable[[list[int]], list[int]] | None) -> range:
        """Close the events whose tokens all left the window (``< limit``).

        Returns:
            the ids of the new events (they tile ``[old local_start, new local_start)``).
        """
        events = self.segmenter.advance(limit, self.surprise)
        if not events:
            return range(0)
        if refine is not None and len(events) > 1:
            bounds = refine([a for a, _ in events] + [events[-1][1]])
            events = list(zip(bounds[:-1], bounds[1:]))
        if self.store is None:
            self._activate()
        return self.store.add_events(events)

    def _activate(self) -> None:
        s, m = self.settings, self.shape
        self.store = HostStore(
            m.num_layers, m.num_heads, m.num_kv_heads, m.head_size, m.dtype,
            first_token=s.sink_tokens, capacity=self.capacity - s.sink_tokens,
            min_event_tokens=s.min_event_tokens,
        )
        if s.retrieval_budget_tokens > 0:
            self.cache = EventCache(
                m.num_layers, m.num_kv_heads, m.head_size, m.dtype,
                capacity_tokens=event_cache_tokens(s), block_size=CACHE_BLOCK,
            )

    def use_frame(self, frame: str) -> None:
        """Cached event keys are rotated for one frame: switching frames drops them."""
        if frame != self.frame and self.cache is not None:
            self.cache.clear()
        self.frame = frame

    # ---- per layer ------------------------------------------------------------------

    def absorb(self, layer: int, events: range, keys_rotated: torch.Tensor, values: torch.Tensor,
               rope: Rope) -> None:
        """Store the tokens of new ``events`` for ``layer`` with their representatives.

        Args:
            keys_rotated, values: ``[n, num_kv_heads, head_size]`` of the tokens the
                events tile, read from the paged KV cache (keys rotated by vLLM).
        """
        ids = torch.arange(events.start, events.stop)
        start = int(self.store.starts[ids[0]])
        positions = torch.arange(start, start + keys_rotated.shape[0])
        keys = rope.rotate(keys_rotated, positions, inverse=True)
        self.store.write(layer, start, keys.transpose(0, 1), values.transpose(0, 1))
        lengths = self.store.ends[ids] - self.store.starts[ids]
        obs = self.observations[layer]
        if obs is None:
            obs = keys_rotated.new_empty((0, self.shape.num_heads, self.shape.head_size))
        self.store.reps[layer, ids] = representatives(
            obs, keys_rotated, keys, lengths, self.settings.representatives_per_event
        )

    def attend(
        self,
        layer: int,
        plan: RowPlan,
        query: torch.Tensor,
        local_keys: torch.Tensor,
        local_values: torch.Tensor,
        sink_keys: torch.Tensor,
        sink_values: torch.Tensor,
        scale: float,
        rope: Rope,
    ) -> torch.Tensor:
        """Attention of this row's queries over sinks + retrieved events + local window.

        Args:
            query: ``[q, num_heads, head_size]`` rotated at positions ``[L, L + q)``.
            local_keys, local_values: ``[L + q - local_start, num_kv_heads, head_size]``
                tokens ``[local_start, L + q)`` from the paged KV cache.
            sink_keys, sink_values: ``[S, num_kv_heads, head_size]`` tokens ``[0, S)``.

        Returns:
            ``[q, num_heads, head_size]`` float32.
        """
        s = self.settings
        q_pos = torch.arange(plan.num_computed, plan.end)
        k_pos = torch.arange(plan.local_start, plan.end)
        out_local, lse_local = attention_with_lse(query, local_keys, local_values, scale, q_pos, k_pos)
        out_global = torch.empty_like(out_local)
        lse_global = torch.empty_like(lse_local)
        window = s.window_tokens
        for a in range(0, query.shape[0], RETRIEVAL_CHUNK):
            b = min(a + RETRIEVAL_CHUNK, query.shape[0])
            q, pos = query[a:b], q_pos[a:b]
            keys, values = self._global_part(layer, plan, q, pos, window, rope)
            keys = torch.cat((sink_keys, keys)) if keys is not None else sink_keys
            values = torch.cat((sink_values, values)) if values is not None else sink_values
            if plan.frame == "bounded":
                q = rope.rotate(q, s.sink_tokens + window - pos)
            out_global[a:b], lse_global[a:b] = attention_with_lse(q, keys, values, scale)
        return merge_partials(out_local, lse_local, out_global, lse_global)

    def _global_part(self, layer, plan, query, positions, window, rope):
        """Retrieve events for these queries; their K/V from the device event cache."""
        s, store = self.settings, self.store
        if self.cache is None or store is None or store.num_events == 0:
            return None, None
        # the query as seen from memory at distance `window` (un-rotated keys at 0)
        q_score = rope.rotate(query, window - positions).float().mean(0)
        scores = similarity_scores(q_score, store.reps[layer, : store.num_events])
        chosen = retrieve(scores, store.sizes(), s.retrieval_budget_tokens, s.contiguity_share,
                          self.contiguity[layer])
        if not chosen:
            return None, None
        began = time.perf_counter()
        slots, hits, misses = self.cache.fetch(layer, chosen, lambda l, ids: self._load(l, ids, plan.frame, rope))
        if misses:
            self.stats.observe("prefetch_latency_seconds", time.perf_counter() - began)
        self.stats.inc("events_retrieved", len(chosen))
        self.stats.inc("device_cache_hits", hits)
        self.stats.inc("device_cache_misses", misses)
        keys = self.cache.keys[layer].index_select(1, slots).transpose(0, 1)
        values = self.cache.values[layer].index_select(1, slots).transpose(0, 1)
        return keys, values

    def _load(self, layer: int, ids: torch.Tensor, frame: str, rope: Rope):
        """Host store -> device cache: keys rotated to their attention-time positions."""
        keys, values, positions, lengths = self.store.gather(layer, ids)
        target = positions if frame == "exact" else torch.tensor(self.settings.sink_tokens)
        keys = rope.rotate(keys.transpose(0, 1), target).transpose(0, 1)
        return keys, values, lengths

    def observe(self, layer: int, query: torch.Tensor) -> None:
        """Keep the latest queries ``[q, num_heads, head_size]`` of this layer."""
        recent = query[-OBSERVATION_QUERIES:]
        previous = self.observations[layer]
        if previous is not None and recent.shape[0] < OBSERVATION_QUERIES:
            recent = torch.cat((previous, recent))[-OBSERVATION_QUERIES:]
        self.observations[layer] = recent.clone()


def event_cache_tokens(settings: Settings) -> int:
    """Device cache size per request: the configured size, but at least what the worst
    selection needs (events of ``min_event_tokens`` each pad to whole blocks)."""
    budget, smallest = settings.retrieval_budget_tokens, settings.min_event_tokens
    blocks_per_event = -(-smallest // CACHE_BLOCK)
    worst = (-(-budget // smallest) + 2) * blocks_per_event * CACHE_BLOCK
    return max(settings.device_event_cache_tokens, worst)


class EpisodicMemory:
    """The requests of one worker, created on first sight and freed on release."""

    def __init__(self, settings: Settings, shape: ModelShape, rope: Rope, stats: Stats):
        self.settings = settings
        self.shape = shape
        self.rope = rope
        self.stats = stats
        self.requests: dict[str, RequestMemory] = {}

    def frame_for(self, context_len: int) -> str:
        mode = self.settings.positions
        if mode == "auto":
            return "exact" if context_len <= self.shape.trained_len else "bounded"
        return mode

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
                memory = self.requests[row.req_id] = RequestMemory(
                    row.req_id, s, self.shape,
                    max(row.capacity, row.num_computed + row.num_scheduled), self.stats,
                )
            end = row.num_computed + row.num_scheduled
            frame = self.frame_for(end)
            memory.use_frame(frame)
            memory.num_tokens = end
            self.stats.inc("tokens_processed", row.num_scheduled)
            plans.append(RowPlan(
                memory=memory, first_query=first_query, num_computed=row.num_computed,
                num_scheduled=row.num_scheduled, local_start=memory.local_start,
                block_row=None if block_rows is None else block_rows[index], frame=frame,
                observe=end + OBSERVATION_QUERIES + row.num_scheduled > s.sink_tokens + s.window_tokens,
            ))
            first_query += row.num_scheduled
        self.update_gauges()
        return plans

    def end_step(self, plans: list[RowPlan], read_tokens: TokenReader) -> None:
        """Cut the tokens that left each row's window into events and store them."""
        s = self.settings
        for plan in plans:
            memory = plan.memory
            refine = None
            if s.refinement and s.segmentation == "surprise":
                refine = lambda bounds, p=plan: self._refine(bounds, p, read_tokens)  # noqa: E731
            events = memory.segment(plan.end - s.window_tokens, refine)
            if not events:
                continue
            self.stats.inc("events_created", len(events))
            start = int(memory.store.starts[events.start])
            end = int(memory.store.ends[events.stop - 1])
            for layer in range(self.shape.num_layers):
                keys, values = read_tokens(plan, layer, start, end)
                memory.absorb(layer, events, keys, values, self.rope)
        self.update_gauges()

    def _refine(self, bounds: list[int], plan: RowPlan, read_tokens: TokenReader) -> list[int]:
        """Refine boundaries with the similarity of un-rotated keys of the upper half of
        the layers (EM-LLM uses the upper layers too)."""
        s = self.settings
        positions = torch.arange(bounds[0], bounds[-1])
        groups = []
        for layer in range(self.shape.num_layers // 2, self.shape.num_layers):
            keys, _ = read_tokens(plan, layer, bounds[0], bounds[-1])
            groups.append(self.rope.rotate(keys, positions, inverse=True).transpose(0, 1))
        similarity = key_similarity(torch.cat(groups))
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
        self.stats.set("host_bytes", sum(st.nbytes for st in stores))
        self.stats.set("device_cache_tokens", sum(
            m.cache.resident_tokens for m in self.requests.values() if m.cache is not None))
