"""The episodic memory of a worker: one :class:`RequestMemory` per request.

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
from dataclasses import dataclass, field
from typing import Protocol

import torch

from vllm_episodic.core.attention import attention
from vllm_episodic.core.event_cache import SlotTable
from vllm_episodic.core.kept import KeptMemories, attach, keep, tail_start
from vllm_episodic.core.refinement import key_similarity, refine_boundaries
from vllm_episodic.core.representatives import mean_keys, representatives
from vllm_episodic.core.retrieval import Selection, empty_queues, fill_budget, most_events, retrieve, stack_queues
from vllm_episodic.core.rope import Rope
from vllm_episodic.core.scoring import prompt_end_tokens, scoring_rows
from vllm_episodic.core.segmentation import Segmenter
from vllm_episodic.core.store import HostStore, held_bytes
from vllm_episodic.kernels import event_mass, gather_rotate, score_layer_events, token_mass
from vllm_episodic.metrics import Stats

#: recent queries per layer that decide an event's representatives
OBSERVATION_QUERIES = 32
#: how far (in tokens) queries may drift past the bounded anchor before it moves
REANCHOR = 128
#: float32 elements of attention scores computed at once for representatives (16 MiB)
REPS_SCRATCH = 1 << 22
#: the rotation code of keys at their true positions (the exact frame); no anchor has it
NATURAL = -(1 << 63)


class Settings(Protocol):
    """What the memory reads from its configuration (``EpisodicConfig`` has it all)."""

    sink_tokens: int
    window_tokens: int
    retrieval_budget_tokens: int
    bounded_budget_tokens: int | None
    retrieval_interval: int
    min_event_tokens: int
    max_event_tokens: int
    segmentation: str
    surprise_gamma: float
    surprise_window: int
    contiguity_share: float
    retrieval_scoring: str
    prefill_query_tokens: int
    refinement: bool
    refinement_metric: str
    representatives_per_event: int
    representatives_dtype: str
    device_event_cache_tokens: int
    positions: str
    host_memory_gib: float
    host_memory_policy: str
    full_memory_at_prompt_end: bool
    prompt_end_queries: int


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype
    trained_len: int
    """context length the model was trained for"""
    block_size: int
    """paged-KV block size: sinks, cache and local part are aligned to it"""


def _align_up(n: int, block: int) -> int:
    return -(-n // block) * block


@dataclass(frozen=True)
class Layout:
    """Token boundaries shared by all requests (see the module docstring)."""

    sinks: int
    cache_end: int
    max_memory: int
    """largest number of memory tokens attended per step (the largest budget, whole blocks):
    what a decode step attends with bounded positions"""
    decode_memory: int
    """memory tokens a step attends with exact positions, and a prefill chunk (whole blocks)"""

    @classmethod
    def of(cls, settings: Settings, block_size: int) -> Layout:
        sinks = _align_up(settings.sink_tokens, block_size)
        decode = settings.retrieval_budget_tokens // block_size * block_size
        bounded = (settings.bounded_budget_tokens or 0) // block_size * block_size
        max_memory = max(decode, bounded)
        slots = _align_up(max(settings.device_event_cache_tokens, max_memory), block_size)
        return cls(sinks=sinks, cache_end=sinks + slots, max_memory=max_memory, decode_memory=decode)

    def budget(self, frame: str, num_scheduled: int) -> int:
        """Memory tokens a step of ``num_scheduled`` tokens attends in ``frame``: the
        larger bounded budget is for decode steps only (a prefill chunk pays it for every
        one of its queries, and it changed no answer there)."""
        return self.max_memory if frame == "bounded" and num_scheduled == 1 else self.decode_memory


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
    prompt_tokens: int = 0
    """the request's prompt length (0: unknown)"""


@dataclass
class RowPlan:
    """What the layers do for one batch row in this step."""

    memory: RequestMemory
    first_query: int
    """index of the row's first query in the step's flattened tokens"""
    num_computed: int
    num_scheduled: int
    mode: str
    """``natural``, ``assembled`` or ``reference`` (module docstring)"""
    local_start: int
    """first token of the local part (block aligned; 0 in natural mode)"""
    memory_tokens: int
    """memory tokens attended per layer (0 in natural mode)"""
    cache_slots: int
    """event-cache slots usable now (the cache's blocks free up as memory forms)"""
    frame: str
    """``exact`` or ``bounded``"""
    anchor: int
    """bounded frame: where memory sits"""
    rewrite: bool
    """the event cache's keys must be rewritten (new frame or anchor)"""
    block_row: torch.Tensor | None
    """(max_blocks,) the row's paged-KV block table"""
    observe: bool
    """keep this step's queries for future representatives"""
    available: torch.Tensor | None = None
    """(events,) tokens of each event that memory may attend this step (shared by layers)"""
    score_rows: torch.Tensor | None = None
    """which of the step's queries score events (:func:`~vllm_episodic.core.scoring.scoring_rows`)"""
    score_angles: tuple[torch.Tensor, torch.Tensor] | None = None
    """RoPE angles that put the step's scoring queries ``window`` tokens after memory,
    one row per scoring query"""
    everything: Selection | None = None
    """when all of memory fits the budget: every event (and its available tokens)"""
    refresh: bool = True
    """retrieve in this step (else layers keep their last selection when still valid)"""
    all_memory: bool = False
    """the step's chunk holds some of the prompt's end (:attr:`prompt_end`), which attends
    every memory token, in torch after the op (``full_memory_at_prompt_end``; exact frame)"""
    prompt_end: int = 0
    """how many of the step's last queries are among the prompt's last
    ``prompt_end_queries`` tokens (0 with none; the chunk that ends the prompt: all of
    it when prompt_end_queries is 0). A question split over two chunks counts in both."""
    torch_queries: int = 0
    """how many of the step's last queries are attended in torch after the op (all of
    them in reference mode; the prompt's last ``prompt_end_queries`` with all_memory)"""
    selected_ahead: bool = False
    """every layer's selection was made (and its slots filled) before the layers ran: in
    this step, or in the decode step that last retrieved (the steps up to the next
    retrieval keep it, so the layers have nothing to select or copy)"""

    @property
    def end(self) -> int:
        return self.num_computed + self.num_scheduled

    @property
    def rotation(self) -> int:
        """Where the step's memory keys are rotated for, as one int: the anchor in the
        bounded frame, :data:`NATURAL` in the exact one."""
        return NATURAL if self.frame == "exact" else self.anchor

    @property
    def selection_key(self) -> tuple[int, int]:
        """What a selection is valid for: budget and rotation (a kept selection is
        reused only while these stay the same)."""
        return self.memory_tokens, self.rotation

    @property
    def query_positions(self) -> torch.Tensor:
        return torch.arange(self.num_computed, self.end)

    @property
    def query_rows(self) -> slice:
        """The row's queries in the step's flattened tokens."""
        return slice(self.first_query, self.first_query + self.num_scheduled)

    @property
    def scores_tokens(self) -> bool:
        """Whether the step's retrieval scores every memory token's key: a chunk with the
        prompt's end (``full_memory_at_prompt_end``), whose scores the decode steps keep
        adding (:meth:`RequestMemory._with_question`)."""
        return bool(self.prompt_end) and self.memory.settings.full_memory_at_prompt_end

    @property
    def torch_rows(self) -> slice:
        """The row's queries attended in torch (its last :attr:`torch_queries`)."""
        end = self.first_query + self.num_scheduled
        return slice(end - self.torch_queries, end)


# reads tokens [start, end) of one batch row from layers' paged KV caches:
# (plan, layers (L,), start, end) -> keys, values [L, end - start, num_kv_heads, head_size]; keys rotated
TokenReader = Callable[["RowPlan", torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class RequestMemory:
    """Everything the backend holds for one request."""

    req_id: str
    settings: Settings
    shape: ModelShape
    layout: Layout
    capacity: int
    stats: Stats
    rope: Rope
    num_tokens: int = 0
    store: HostStore | None = None
    frame: str | None = None
    anchor: int | None = None
    carry_logits: torch.Tensor | None = None
    """``[1, vocab]`` logits of the last computed token: they give the surprise of the
    next token once it is known"""
    surprise: torch.Tensor = field(init=False)
    segmenter: Segmenter = field(init=False)
    contiguity: torch.Tensor = field(init=False)
    """``[num_layers, width]`` each layer's contiguity queue, -1 padded (:mod:`.retrieval`)"""
    observations: torch.Tensor | None = None
    """``[num_layers, OBSERVATION_QUERIES, num_heads, head_size]`` a ring of the latest
    queries of every layer (:meth:`keep_queries`); the first ``observed`` are filled"""
    observed: int = 0
    slots: SlotTable = field(init=False)
    """the device event cache's slots, every layer (engine-side)"""
    filled: Selection = field(init=False)
    """one row per layer: the selection its attended slots hold (:meth:`unfilled`)"""
    filled_known: torch.Tensor = field(init=False)
    """``(num_layers,)`` bool: whether the layer's row of ``filled`` is known"""
    sink_rotation: torch.Tensor = field(init=False)
    """``(num_layers,)`` int64: the rotation (:attr:`RowPlan.rotation`) of the sink
    tokens' keys in each layer's paged cache (engine-side)"""
    retained: Selection = field(init=False)
    """one row per layer: the selection of its last retrieval"""
    retained_for: torch.Tensor = field(init=False)
    """``[num_layers, 2]`` int64: the :attr:`RowPlan.selection_key` each layer's row of
    ``retained`` was made for (budget -1: none yet)"""
    engine_state: dict = field(default_factory=dict)
    """what the engine adapter keeps per request (freed with it)"""
    last_queries: torch.Tensor | None = None
    """``[num_layers, num_heads, head_size]`` every layer's latest query (:meth:`keep_queries`)"""
    last_query_position: int = -1
    decode_steps: int = 0
    question: torch.Tensor | None = None
    """``[num_layers, events]`` the event scores of the prompt's end (:meth:`_keep_question`)"""
    ahead_key: tuple | None = None
    """the :attr:`RowPlan.selection_key` of the last :func:`select_ahead` while every layer
    still keeps the selection it made (None once a layer retrieves on its own)"""

    def __post_init__(self):
        s = self.settings
        self.surprise = torch.zeros(self.capacity + 1, dtype=torch.float32)
        self.segmenter = Segmenter(
            self.layout.sinks, s.min_event_tokens, s.max_event_tokens, s.segmentation,
            window=s.surprise_window, gamma=s.surprise_gamma,
        )
        self.contiguity = empty_queues(self.shape.num_layers)
        self._ring_next = 0
        self.slots = SlotTable(self.shape.num_layers)
        self.filled = Selection.empty(self.shape.num_layers)
        self.filled_known = torch.zeros(self.shape.num_layers, dtype=torch.bool)
        self.sink_rotation = torch.full((self.shape.num_layers,), NATURAL)
        self.retained = Selection.empty(self.shape.num_layers)
        self.retained_for = torch.tensor([-1, NATURAL]).repeat(self.shape.num_layers, 1)

    @property
    def open_start(self) -> int:
        return self.segmenter.open_start

    def record_surprise(self, first: int, values: torch.Tensor) -> None:
        end = min(first + values.numel(), self.surprise.numel())
        if end > first:
            self.surprise[first:end] = values[: end - first]

    # ---- per step -------------------------------------------------------------------

    def refreshes(self, num_scheduled: int, rewrite: bool) -> bool:
        """Whether this step retrieves: every prefill chunk, every ``retrieval_interval``-th
        decode step (the first one included), counted from the last one that moved the
        frame (``rewrite``). A new frame invalidates every layer's kept selection; as a
        refresh its decode step retrieves for all layers in one batched call ahead of
        them (:func:`select_ahead`) instead of once per layer."""
        if num_scheduled > 1:
            self.decode_steps = 0
            return True
        if rewrite:
            self.decode_steps = 0
        due = self.decode_steps % self.settings.retrieval_interval == 0
        self.decode_steps += 1
        return due

    def plan(self, frame: str, num_computed: int, num_scheduled: int, reference: bool) -> tuple:
        """(mode, local_start, memory_tokens, cache_slots, anchor, rewrite) for the step."""
        lay, s = self.layout, self.settings
        rewrite = frame != self.frame
        if frame == "bounded":
            last = num_computed + num_scheduled - 1
            if rewrite or self.anchor is None or last - self.anchor > s.window_tokens + REANCHOR + num_scheduled:
                self.anchor = num_computed - s.window_tokens
                rewrite = True
        self.frame = frame
        if rewrite:
            self.slots.clear()
            self.filled_known[:] = False
            self.ahead_key = None
        anchor = self.anchor or 0
        local_start = self.open_start // self.shape.block_size * self.shape.block_size
        if self.store is None or self.store.num_events == 0 or local_start <= lay.sinks:
            return "natural", 0, 0, 0, anchor, rewrite
        # the cache's blocks below local_start no longer hold needed tokens
        cache_slots = min(local_start, lay.cache_end) - lay.sinks
        memory_tokens = min(lay.budget(frame, num_scheduled), local_start - lay.sinks, cache_slots)
        if reference:
            mode = "reference"
        elif frame == "exact" and self.open_start < lay.cache_end:
            # memory tokens still sit in their own blocks: plain attention reads them
            return "natural", 0, 0, 0, anchor, rewrite
        else:
            mode = "assembled"
        return mode, local_start, memory_tokens, cache_slots, anchor, rewrite

    def segment(self, limit: int, refine: Callable[[list[int]], list[int]] | None) -> range:
        """Close the events whose tokens all left the window (``< limit``).

        Returns:
            the ids of the new events (they tile ``[old open_start, new open_start)``).
        """
        events = self.segmenter.advance(limit, self.surprise)
        if not events:
            return range(0)
        if refine is not None and len(events) > 1:
            bounds = refine([a for a, _ in events] + [events[-1][1]])
            events = list(zip(bounds[:-1], bounds[1:]))
        if self.store is None:
            m = self.shape
            # mean keys are one per KV head; chosen keys one per query head
            rep_heads = m.num_kv_heads if self.settings.representatives_per_event == 0 else m.num_heads
            self.store = HostStore(m.num_layers, rep_heads, m.num_kv_heads, m.head_size, m.dtype,
                                   reps_dtype=getattr(torch, self.settings.representatives_dtype))
        return self.store.add_events(events)

    # ---- per layer ------------------------------------------------------------------

    def absorb(self, start: int, keys_rotated: torch.Tensor, values: torch.Tensor, rope: Rope,
               events: range | None = None) -> None:
        """Store tokens ``[start, start + n)`` of every layer (un-rotated), and the
        representatives of ``events`` (which tile them).

        Args:
            keys_rotated, values: ``[num_layers, n, num_kv_heads, head_size]`` read from the
                paged KV cache (keys rotated by vLLM).
        """
        layers, n, kv_heads, head_size = keys_rotated.shape
        positions = torch.arange(start, start + n)
        # one rotation for all layers: [n, layers * kv_heads, head_size]
        flat = keys_rotated.transpose(0, 1).reshape(n, layers * kv_heads, head_size)
        keys = rope.rotate(flat, positions, inverse=True).view(n, layers, kv_heads, head_size).transpose(0, 1)
        self.store.write(slice(None), start, keys.transpose(1, 2), values.transpose(1, 2))
        if not events:
            return
        ids = torch.arange(events.start, events.stop)
        lengths = self.store.ends[ids] - self.store.starts[ids]
        if self.settings.representatives_per_event == 0:
            self.store.set_reps(slice(None), ids, mean_keys(keys, lengths))
            return
        seen = self.observed
        if seen:
            obs = self.observations[:, :seen]
        else:
            obs = keys_rotated.new_empty((layers, 0, self.shape.num_heads, head_size))
        # layers in groups: their attention scores [layers, heads, m, events, longest] stay
        # under REPS_SCRATCH elements (a prefill chunk makes ~100 events at once)
        per_layer = self.shape.num_heads * max(seen, 1) * ids.numel() * int(lengths.max())
        group = max(1, REPS_SCRATCH // per_layer)
        for first in range(0, layers, group):
            part = slice(first, first + group)
            self.store.set_reps(part, ids, representatives(
                obs[part], keys_rotated[part], keys[part], lengths, self.settings.representatives_per_event
            ))

    def available_tokens(self, local_start: int) -> torch.Tensor:
        """``(events,)`` tokens of each stored event that memory may attend when the
        local part starts at ``local_start`` (0 for evicted events)."""
        store = self.store
        count = store.num_events
        available = (store.ends[:count].clamp(max=local_start) - store.starts[:count]).clamp(min=0)
        return available.masked_fill(~store.alive[:count], 0)

    def all_of_memory(self, plan: RowPlan) -> Selection:
        """Every event before the row's local part, whole (one row): full attention over
        memory, the exact frame's answer to a chunk that must see all of it."""
        return _whole(self.available_tokens(plan.local_start))

    def attended_in_torch(self, layer: int, plan: RowPlan, query: torch.Tensor) -> Selection:
        """What the torch path attends for a row (one row): every memory token when the
        chunk ends the prompt (:attr:`RowPlan.all_memory`), else the layer's selection.
        A reference row selects in any case, as the op path does before filling slots,
        so that retrieval state (contiguity queues, kept selections) stays the same."""
        selection = self.select(layer, plan, query) if plan.mode == "reference" else None
        return self.all_of_memory(plan) if plan.all_memory else selection

    def select(self, layer: int, plan: RowPlan, query: torch.Tensor) -> Selection:
        """Events (and how many of their first tokens) this layer attends: exactly
        ``plan.memory_tokens`` tokens, all before ``plan.local_start`` (one row of
        :func:`select_layer`).

        Args:
            query: ``[q, num_heads, head_size]`` the row's queries (rotated at their positions).
        """
        return select_layer(layer, [(plan, query)])[0]

    def _unchanged(self, layer: int, plan: RowPlan) -> Selection | None:
        """The layer's selection (one row) when it needs no retrieval in this step, else None."""
        budget = plan.memory_tokens
        if budget <= 0:
            return Selection.empty(1)
        if plan.everything is not None:
            self.store.touch(plan.everything.events[0], plan.end)
            self.ahead_key = None  # the slots will hold everything, not the retained selection
            return plan.everything
        if not plan.refresh and self.retained_for[layer].tolist() == list(plan.selection_key):
            return self.retained.row(layer)
        return None

    def score_chunk(self, layer: int, plan: RowPlan, query: torch.Tensor) -> torch.Tensor:
        """``[1, events]`` the layer's event scores for this step's queries ``[q,
        num_heads, head_size]`` (its :attr:`RowPlan.score_rows`) as seen from memory at
        distance ``window``: from every memory token's key at the prompt's end
        (:attr:`RowPlan.scores_tokens`, kept as the layer's question scores), else from
        the representatives (plus the question scores, once there are some)."""
        available = plan.available
        cos, sin = plan.score_angles
        scoring = self.rope.apply(query[plan.score_rows], cos, sin)  # [m, heads, head_size]
        if plan.scores_tokens:
            # every memory token's key, read from the host store (un-rotated, as the
            # representatives: the queries see them `window` tokens back)
            events = available.nonzero().flatten()
            positions, which = _tokens_of(self.store.starts[events], available[events])
            keys, _ = self.store.gather(layer, positions)
            scores = token_mass(scoring, keys, events[which], available.numel())
            self._keep_question(layer, scores)
            return scores[None].masked_fill(available == 0, float("-inf"))
        reps = self.store.reps[layer : layer + 1, : available.numel()]
        if self.settings.retrieval_scoring == "mass":
            return self._with_question(event_mass(scoring[None], reps, available), torch.tensor([layer]))
        return score_layer_events(self._per_rep_head(scoring.mean(0)[None]), reps, available)

    def _per_rep_head(self, query: torch.Tensor) -> torch.Tensor:
        """``query [n, num_heads, head_size]`` for a dot product with representatives: as
        is when they are per query head, summed over each KV group when they are per KV
        head (Σ_h q_h · rep_kv(h) = (Σ_group q_h) · rep_kv)."""
        rep_heads = self.store.reps.shape[2]
        if rep_heads == query.shape[1]:
            return query
        return query.view(query.shape[0], rep_heads, -1, query.shape[2]).sum(2)

    def _keep_question(self, layer: int, scores: torch.Tensor) -> None:
        """Keep a layer's event scores ``(events,)`` from the prompt's end: what the
        question read, for the decode steps that answer it (a later prompt chunk with
        some of the question replaces them)."""
        if self.question is None or self.question.shape[1] < scores.numel():
            grown = scores.new_zeros(self.shape.num_layers, scores.numel())
            if self.question is not None:
                grown[:, : self.question.shape[1]] = self.question
            self.question = grown
        self.question[layer, : scores.numel()] = scores

    def _with_question(self, scores: torch.Tensor, layers: torch.Tensor) -> torch.Tensor:
        """``scores [len(layers), events]`` plus the layers' question scores: a decode
        step keeps what the question read within reach, whatever its own queries look
        at (both are attention shares summed over heads; events formed after the
        prompt score 0 from the question)."""
        if self.question is None:
            return scores
        width = min(scores.shape[1], self.question.shape[1])
        scores[:, :width] += self.question[layers, :width]
        return scores

    def keep_queries(self, queries: torch.Tensor, position: int) -> None:
        """Keep a step's latest queries of every layer, ``[num_layers, q, num_heads,
        head_size]``, the last one at ``position``: the ring of the latest
        ``OBSERVATION_QUERIES`` decides the representatives of the next events (their
        order does not matter), the last query the next decode step's retrieval for
        every layer at once (:func:`select_ahead`)."""
        recent = queries[:, -OBSERVATION_QUERIES:]
        if self.observations is None:
            self.observations = recent.new_empty((recent.shape[0], OBSERVATION_QUERIES, *recent.shape[2:]))
            self.last_queries = recent.new_empty((recent.shape[0], *recent.shape[2:]))
        n = recent.shape[1]
        # filled in order from slot 0, so the first `observed` slots are the filled ones
        self.observations.index_copy_(1, (self._ring_next + torch.arange(n)) % OBSERVATION_QUERIES, recent)
        self._ring_next = (self._ring_next + n) % OBSERVATION_QUERIES
        self.observed = min(OBSERVATION_QUERIES, self.observed + n)
        self.last_queries.copy_(recent[:, -1])
        self.last_query_position = position

    def can_select_ahead(self, plan: RowPlan) -> bool:
        """Whether this step's retrieval can run for all layers before they do: a decode
        step that retrieves, with every layer's query of the step before it at hand."""
        return (plan.num_scheduled == 1 and plan.refresh and plan.everything is None
                and plan.memory_tokens > 0 and self.last_query_position == plan.num_computed - 1)

    def score_ahead(self, plan: RowPlan) -> torch.Tensor:
        """``[num_layers, events]`` every layer's event scores for a decode step, from the
        queries of the previous token (one batched scoring call for all layers)."""
        available = plan.available
        reps = self.store.reps[:, : available.numel()]
        if self.settings.retrieval_scoring == "mass":
            # the queries since the last retrieval, newest first: ring slots before
            # _ring_next, at positions counting down from the last query's
            back = torch.arange(min(self.settings.retrieval_interval, self.observed))
            queries = self.observations[:, (self._ring_next - 1 - back) % OBSERVATION_QUERIES]
            angles = self.rope.angles(self.settings.window_tokens - (self.last_query_position - back))
            scores = event_mass(self.rope.apply(queries, *angles), reps, available)
            return self._with_question(scores, torch.arange(self.shape.num_layers))
        angles = self.rope.angles(torch.tensor([self.settings.window_tokens - plan.num_computed + 1]))
        return score_layer_events(self._per_rep_head(self.rope.apply(self.last_queries, *angles)), reps, available)

    def _store_queues(self, layers: torch.Tensor, queues: torch.Tensor) -> None:
        """Keep the new contiguity queues ``[len(layers), width]`` of these layers."""
        width = max(self.contiguity.shape[1], queues.shape[1])
        pad = torch.nn.functional.pad
        self.contiguity = pad(self.contiguity, (0, width - self.contiguity.shape[1]), value=-1)
        self.contiguity[layers] = pad(queues, (0, width - queues.shape[1]), value=-1)

    def _retain(self, layers: torch.Tensor, plan: RowPlan, selection: Selection) -> None:
        """Record the ``layers``' selections (a row each) for the steps that do not retrieve."""
        self.retained = self.retained.with_rows(layers, selection)
        self.retained_for[layers] = torch.tensor(plan.selection_key)
        self.ahead_key = None

    def unfilled(self, layers: torch.Tensor, selection: Selection) -> torch.Tensor:
        """Which rows of ``selection`` (one per layer of ``layers (n,)``) the layers'
        attended slots do not hold yet, ascending."""
        held = self.filled.rows(layers).same_rows(selection) & self.filled_known[layers]
        return (~held).nonzero().flatten()

    def mark_filled(self, layers: torch.Tensor, selection: Selection) -> None:
        """The ``layers``' attended slots now hold ``selection`` (one row per layer)."""
        self.filled = self.filled.with_rows(layers, selection)
        self.filled_known[layers] = True

    @property
    def code_span(self) -> int:
        """Codes per position in :meth:`token_codes`: a run spans at most the budget plus
        one event (its last, cut event's untaken tail), so ``back`` stays below this."""
        return self.layout.max_memory + self.settings.max_event_tokens

    def token_codes(self, selection: Selection, frame: str) -> torch.Tensor:
        """``[rows, tokens]`` the selected tokens of each row (a layer) as codes of the
        device cache (:class:`SlotTable`): ``position · span + back``, ``back`` being how
        far before the anchor the token's key is rotated to (0 in the exact frame), so
        that a code says everything its slot holds. Every row of ``selection``
        attends equally many tokens.

        In the bounded frame an event sits ``lag`` tokens before the end of its *run*
        (module docstring): it continues the run of the event after it when that one is
        selected too and it is selected whole (no gap between their tokens). The cache
        keys its slots by the codes, so an event whose run changes is rotated anew.
        """
        present = selection.events >= 0
        if not bool(present.any()):
            return torch.empty((len(selection), 0), dtype=torch.long)
        # every row's events, rows in order, each row's ascending: (layer, event) order
        ids, counts = selection.events[present], selection.tokens[present]
        store, span = self.store, self.code_span
        starts, ends = store.starts[ids], store.ends[ids]
        lags = torch.zeros_like(ids)
        if frame != "exact":
            # a run is a stretch of events of one row, each whole but the last
            row = torch.arange(len(selection))[:, None].expand_as(present)[present]
            follows = torch.zeros(ids.numel(), dtype=torch.bool)
            follows[:-1] = (row[1:] == row[:-1]) & (ids[1:] == ids[:-1] + 1)
            whole = counts == ends - starts
            # the last event of each one's run: the first at or after it that does not continue
            index = torch.arange(ids.numel())
            last = torch.where(follows & whole, ids.numel(), index).flip(0).cummin(0).values.flip(0)
            lags = ends[last] - ends
        positions, owner = _tokens_of(starts, counts)
        if frame == "exact":
            return (positions * span).view(len(selection), -1)
        # every run ends at the anchor: an event ends `lag` tokens before it
        back = (ends + lags)[owner] - 1 - positions
        if int(back.max()) >= span:
            raise ValueError(f"a run of {int(back.max()) + 1} tokens exceeds the code span {span}")
        return (positions * span + back).view(len(selection), -1)

    def code_keys(self, layer: int | torch.Tensor, codes: torch.Tensor, frame: str, anchor: int,
                  rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of the tokens named by ``codes (tokens,)`` (:meth:`token_codes`), keys
        rotated for attention: ``keys, values [tokens, num_kv_heads, head_size]``.

        Args:
            layer: the layer, or ``(tokens,)`` each token's layer (several in one gather).
        """
        positions, back = codes // self.code_span, codes % self.code_span
        target = positions if frame == "exact" else anchor - back
        return _rotated(self.store, layer, positions, target, rope)

    def sink_keys(self, layers: torch.Tensor, frame: str, anchor: int, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V ``[len(layers) * sinks, num_kv_heads, head_size]`` (layer-major) of the
        sinks rotated for the frame: true positions, or A − budget − max_event − S + i."""
        sinks = self.layout.sinks
        positions = torch.arange(sinks).repeat(len(layers))
        shift = anchor - self.layout.max_memory - self.settings.max_event_tokens - sinks
        target = positions if frame == "exact" else positions + shift
        return _rotated(self.store, layers.repeat_interleave(sinks), positions, target, rope)

    def reference_attention(self, layer: int, plan: RowPlan, query: torch.Tensor,
                            selection: Selection, local_keys: torch.Tensor,
                            local_values: torch.Tensor, scale: float, rope: Rope) -> torch.Tensor:
        """The assembled attention in torch: sinks + selection + local part, one softmax.

        Args:
            query: ``[q, num_heads, head_size]`` the step's last q queries (all, or its
                :attr:`RowPlan.torch_queries`).
            local_keys, local_values: tokens ``[plan.local_start, plan.end)`` from the paged cache.

        Returns:
            ``[q, num_heads, head_size]`` float32.
        """
        parts = [self.sink_keys(torch.tensor([layer]), plan.frame, plan.anchor, rope)]
        if selection.num_events:
            codes = self.token_codes(selection, plan.frame)[0]
            parts.append(self.code_keys(layer, codes, plan.frame, plan.anchor, rope))
        parts.append((local_keys, local_values))
        keys, values = (torch.cat([t.to(query.dtype) for t in kind]) for kind in zip(*parts))
        # only the local part is causal: sinks and memory precede every query
        before = keys.shape[0] - local_keys.shape[0]
        positions = torch.cat((torch.full((before,), plan.local_start - 1), torch.arange(plan.local_start, plan.end)))
        return attention(query, keys, values, scale, plan.query_positions[-query.shape[0]:], positions)


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


def _tokens_of(starts: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``counts[i]`` tokens of each event ``i`` starting at ``starts[i]``, in
    order: their positions and the index ``i`` each belongs to."""
    owner = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    rank = torch.arange(owner.numel()) - (torch.cumsum(counts, 0) - counts)[owner]
    return starts[owner] + rank, owner


def _whole(available: torch.Tensor) -> Selection:
    """One row selecting every event with available tokens ``(events,)``, all of them."""
    events = available.nonzero().flatten()
    return Selection(events[None], available[events][None])


def _rotated(store: HostStore, layer: int | torch.Tensor, positions: torch.Tensor, target: torch.Tensor,
             rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored tokens at ``positions`` (of ``layer``, or of each token's layer) with keys
    rotated to ``target`` positions: ``keys, values [tokens, num_kv_heads, head_size]``."""
    keys, values = store.gather(layer, positions)
    fused = rope.rotate_keys(keys, target)
    if fused is not None:
        return fused, values
    out_k, out_v = torch.empty_like(keys), torch.empty_like(values)
    rows = torch.arange(positions.numel())
    gather_rotate(keys, values, rows, out_k, out_v, rows, rope.table, target, rope.is_neox_style)
    return out_k, out_v


class EpisodicMemory:
    """The requests of one worker, created on first sight and freed on release."""

    def __init__(self, settings: Settings, shape: ModelShape, rope: Rope, stats: Stats,
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
            if mode != "natural" and memory_tokens > 0:
                self._plan_retrieval(plan)
                # between decode retrievals every layer keeps what select_ahead chose
                # for it (and the slots hold that): the layers skip selection entirely
                plan.selected_ahead = (not plan.refresh and plan.everything is None
                                       and memory.ahead_key == plan.selection_key)
            # the chunk that ends the prompt sees all of memory (exact frame), unless its
            # budget already holds all of it
            plan.all_memory = (s.full_memory_at_prompt_end and mode != "natural" and plan.frame == "exact"
                               and plan.prompt_end > 0 and plan.everything is None)
            if mode == "reference":
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
            plan.everything = _whole(plan.available)
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
        return held_bytes(stores) + sum(kept.own_bytes for kept in self.kept.memories.values())

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
