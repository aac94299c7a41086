"""Everything the backend holds for one request (:class:`RequestMemory`): its
segmentation, host store, retrieval state and device event cache; its tokens as the
device cache and the torch path of its attention read them come from :mod:`.codes`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vllm_episodic.core.codes import FrameKeys, event_tokens
from vllm_episodic.core.event_cache import SlotTable
from vllm_episodic.core.plan import (
    NATURAL,
    OBSERVATION_QUERIES,
    REANCHOR,
    Frame,
    Layout,
    Mode,
    ModelShape,
    RowPlan,
    Settings,
    StatsSink,
)
from vllm_episodic.core.representatives import mean_keys, representatives
from vllm_episodic.core.retrieval import Selection, empty_queues
from vllm_episodic.core.rope import Rope
from vllm_episodic.core.segmentation import Segmenter
from vllm_episodic.core.select import select_layer
from vllm_episodic.core.store import HostStore
from vllm_episodic.kernels import event_mass, score_layer_events, token_mass

#: float32 elements of attention scores computed at once for representatives (16 MiB)
REPS_SCRATCH = 1 << 22


@dataclass
class RequestMemory(FrameKeys):
    """Everything the backend holds for one request."""

    req_id: str
    settings: Settings
    shape: ModelShape
    layout: Layout
    capacity: int
    stats: StatsSink
    rope: Rope
    num_tokens: int = 0
    store: HostStore | None = None
    frame: Frame | None = None
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
    attached: tuple | None = None
    """``(weak reference to a kept memory, h)``: where this request's first ``h`` tokens
    came from (:func:`.kept.attach`); its kept tail shares that one's where they are the
    same, if that one is still kept"""

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

    def plan(self, frame: Frame, num_computed: int, num_scheduled: int, reference: bool) -> tuple:
        """(mode, local_start, memory_tokens, cache_slots, anchor, rewrite) for the step."""
        lay, s = self.layout, self.settings
        rewrite = frame != self.frame
        if frame is Frame.BOUNDED:
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
            return Mode.NATURAL, 0, 0, 0, anchor, rewrite
        # the cache's blocks below local_start no longer hold needed tokens
        cache_slots = min(local_start, lay.cache_end) - lay.sinks
        memory_tokens = min(lay.budget(frame, num_scheduled), local_start - lay.sinks, cache_slots)
        if reference:
            mode = Mode.REFERENCE
        elif frame is Frame.EXACT and self.open_start < lay.cache_end:
            # memory tokens still sit in their own blocks: plain attention reads them
            return Mode.NATURAL, 0, 0, 0, anchor, rewrite
        else:
            mode = Mode.ASSEMBLED
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
        return whole_selection(self.available_tokens(plan.local_start))

    def attended_in_torch(self, layer: int, plan: RowPlan, query: torch.Tensor) -> Selection:
        """What the torch path attends for a row (one row): every memory token when the
        chunk ends the prompt (:attr:`RowPlan.all_memory`), else the layer's selection.
        A reference row selects in any case, as the op path does before filling slots,
        so that retrieval state (contiguity queues, kept selections) stays the same."""
        selection = self.select(layer, plan, query) if plan.mode is Mode.REFERENCE else None
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
            positions, which = event_tokens(self.store.starts[events], available[events])
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


def whole_selection(available: torch.Tensor) -> Selection:
    """One row selecting every event with available tokens ``(events,)``, all of them."""
    events = available.nonzero().flatten()
    return Selection(events[None], available[events][None])
