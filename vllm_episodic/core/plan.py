"""What a step does for each batch row: the model's shape, the token layout of a
request (:class:`Layout`), a row as the scheduler hands it over (:class:`BatchRow`) and
the plan :meth:`~vllm_episodic.core.memory.EpisodicMemory.plan_step` makes for it
(:class:`RowPlan`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Protocol

import torch

from vllm_episodic.core.constants import NATURAL, OBSERVATION_QUERIES, REANCHOR
from vllm_episodic.core.retrieval import Selection

if TYPE_CHECKING:
    from vllm_episodic.core.request import RequestMemory

__all__ = ["NATURAL", "OBSERVATION_QUERIES", "REANCHOR", "BatchRow", "Frame", "Layout", "Mode", "ModelShape", "RowPlan",
           "Settings", "StatsSink", "TokenReader"]


class Mode(str, Enum):
    """How a row attends in a step."""

    NATURAL = "natural"
    """its own blocks through the platform op, as stock vLLM (no memory yet, or memory
    still in its own blocks)"""
    ASSEMBLED = "assembled"
    """the platform op over sinks + the event-cache blocks holding the retrieved tokens +
    the local blocks"""
    REFERENCE = "reference"
    """in torch over the host store (a debug toggle, or the bounded frame before the
    event cache is free)"""


class Frame(str, Enum):
    """Where memory sits for a row's queries."""

    EXACT = "exact"
    """every token at its true position (within the model's trained length)"""
    BOUNDED = "bounded"
    """memory at trained distances behind the window (past the trained length)"""


class StatsSink(Protocol):
    """Where the memory counts what it does (``metrics.Stats`` in the engine): the core
    knows this much of the metrics, not their module."""

    def inc(self, name: str, amount: float = 1.0) -> None: ...

    def set(self, name: str, value: float) -> None: ...


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

    def budget(self, frame: Frame, num_scheduled: int) -> int:
        """Memory tokens a step of ``num_scheduled`` tokens attends in ``frame``: the
        larger bounded budget is for decode steps only (a prefill chunk pays it for every
        one of its queries, and it changed no answer there)."""
        return self.max_memory if frame is Frame.BOUNDED and num_scheduled == 1 else self.decode_memory


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
    mode: Mode
    local_start: int
    """first token of the local part (block aligned; 0 in natural mode)"""
    memory_tokens: int
    """memory tokens attended per layer (0 in natural mode)"""
    cache_slots: int
    """event-cache slots usable now (the cache's blocks free up as memory forms)"""
    frame: Frame
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
        return NATURAL if self.frame is Frame.EXACT else self.anchor

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
