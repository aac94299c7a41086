"""Kept memories, scheduler side: a later request whose prompt starts with a finished
request's tokens prefills only what follows them.

Why not vLLM's own prefix caching for the device blocks: an episodic request's paged
blocks are not its tokens' KV. The sink blocks are re-rotated for the bounded frame and
the blocks after them hold the device event cache, rewritten at every retrieval; the
window's blocks are freed as tokens move to the host store. A hashed block that other
requests may hit must never be written afterwards, which these blocks are. The
memory itself (events, representatives, host K/V) lives in the worker's host store
anyway, so the worker keeps it whole (:mod:`vllm_episodic.core.kept`) and restores an
attached request's sinks and local window into fresh blocks; a KV connector would
add a transfer protocol for what is one in-process copy.

How (engine-core process; the worker may be another process):

1. ``Scheduler._free_request``: a finished (or aborted) request's computed tokens are
   registered in :class:`KeptIndex` under the chained hashes of their full blocks;
   least recently used kept memories are dropped beyond ``kept_memory_gib``, and
   whenever the running requests' host memory (estimated from their lengths) would
   not fit ``host_memory_gib`` beside them: kept memories yield to live requests.
2. ``KVCacheManager.get_computed_blocks``: a new request whose prompt starts with a
   kept memory's tokens (the longest match, block-aligned, at most prompt − 1) gets
   that many tokens as computed, as null blocks; :class:`SinkWindowManager` turns
   them into fresh blocks for the sinks and the window (``kv_spec.py``).
3. ``Scheduler.schedule``: the step's :class:`ReuseOps` (memories to keep, to drop, and
   which kept memory each newly scheduled request attaches to) ride on the
   ``SchedulerOutput`` to the worker, which applies them before the step's layers
   run (``runner_hooks.py``). The worker never drops a kept memory on its own, so
   every attach the scheduler decides finds its memory.

Removal: when vLLM's prefix caching lets a backend mark blocks as not shareable and
restore a request's computed blocks itself.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from vllm_episodic.core.store import PAGE_TOKENS


@dataclass
class ReuseOps:
    """What the worker does with kept memories before a step's layers run."""

    keep: list[str] = field(default_factory=list)
    """finished requests whose memory becomes a kept memory (kept id = request id)"""
    drop: list[str] = field(default_factory=list)
    """kept memories to free"""
    attach: dict[str, tuple[str, int]] = field(default_factory=dict)
    """request id -> (kept id, tokens): requests scheduled in this step whose first
    tokens come from a kept memory"""

    def __bool__(self) -> bool:
        return bool(self.keep or self.drop or self.attach)


@dataclass
class _Entry:
    tokens: np.ndarray
    hashes: list[int]
    nbytes: int


def block_hashes(tokens, block_size: int) -> list[int]:
    """Chained hashes of the full blocks of ``tokens``: hash i names tokens [0, (i+1)·bs)."""
    out, previous = [], 0
    for first in range(0, len(tokens) - block_size + 1, block_size):
        previous = hash((previous, tuple(tokens[first : first + block_size])))
        out.append(previous)
    return out


class KeptIndex:
    """The scheduler's view of the worker's kept memories, least recently used first."""

    def __init__(self, block_size: int, cap_bytes: int, bytes_per_token: int, local_tokens: int,
                 host_cap_bytes: int | None = None):
        self.block_size = block_size
        self.cap_bytes = cap_bytes
        """the most kept memories may hold (``kept_memory_gib``)"""
        self.host_cap_bytes = host_cap_bytes
        """the cap of live requests and kept memories together (``host_memory_gib``)"""
        self.bytes_per_token = bytes_per_token
        self.local_tokens = local_tokens
        self.entries: OrderedDict[str, _Entry] = OrderedDict()
        self.by_hash: dict[int, list[str]] = {}
        self.pending = ReuseOps()
        # request -> (kept id, tokens) found by get_computed_blocks, until it is scheduled
        self.found: dict[str, tuple[str, int]] = {}
        # scheduled requests -> (kept id, tokens) they attached to, until they finish
        self.attached: dict[str, tuple[str, int]] = {}

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self.entries.values())

    def register(self, req_id: str, tokens: list[int]) -> None:
        """A finished request's computed ``tokens`` become a kept memory."""
        parent = self.attached.pop(req_id, None)
        self.found.pop(req_id, None)
        hashes = block_hashes(tokens, self.block_size)
        if not hashes:
            return
        # what it shares with the kept memory it attached to is held once (shared pages,
        # and the part of its window that the parent's tail holds)
        kept_parent = parent is not None and parent[0] in self.entries
        shared = parent[1] if kept_parent else 0
        parent_len = len(self.entries[parent[0]].tokens) if kept_parent else 0
        nbytes = self._estimate(len(tokens), shared, parent_len)
        if nbytes > self.cap_bytes:
            return
        self._make_room(nbytes)
        self.entries[req_id] = _Entry(np.asarray(tokens, dtype=np.int64), hashes, nbytes)
        for h in hashes:
            self.by_hash.setdefault(h, []).append(req_id)
        self.pending.keep.append(req_id)

    def _estimate(self, tokens: int, shared: int, parent_len: int = 0) -> int:
        """Bytes the worker holds for a kept memory of ``tokens`` tokens, the first
        ``shared`` of them those of a kept memory of ``parent_len`` tokens: its tail (the
        local window, at most ``local_tokens``) less what of it the parent's tail holds
        (views of it, ``kept.py``), and the host pages of the rest (whole pages: an
        upper bound)."""
        tail = min(tokens, self.local_tokens)
        parent_tail_start = parent_len - min(parent_len, self.local_tokens)
        in_parent_tail = max(0, min(shared, tokens) - max(tokens - tail, parent_tail_start))
        stored = max(0, tokens - tail - shared)
        return (tail - in_parent_tail) * self.bytes_per_token + self._page_bytes(stored)

    def _page_bytes(self, tokens: int) -> int:
        """Bytes of the host pages that hold ``tokens`` stored tokens (whole pages)."""
        return -(-tokens // PAGE_TOKENS) * PAGE_TOKENS * self.bytes_per_token

    def _make_room(self, nbytes: int, cap: int | None = None) -> None:
        """Drop least recently used kept memories (not those a request is about to
        attach to) until ``nbytes`` more fit under ``cap`` (default ``cap_bytes``)."""
        cap = self.cap_bytes if cap is None else cap
        if self.nbytes + nbytes <= cap:
            return  # the common case, every step (yield_to_live): nothing to drop
        pinned = {kept for kept, _ in self.found.values()} | {kept for kept, _ in self.pending.attach.values()}
        for kept_id in list(self.entries):
            if self.nbytes + nbytes <= cap:
                return
            if kept_id not in pinned:
                self._drop(kept_id)

    def live_bytes(self, req_id: str, tokens: int) -> int:
        """Host bytes a running request of ``tokens`` tokens holds at most: its tokens
        past the window, in whole pages, less the pages it shares with the kept memory
        it attached to while that one is kept."""
        stored = max(0, tokens - self.local_tokens)
        parent = self.attached.get(req_id)
        if parent is not None and parent[0] in self.entries:
            stored = max(0, stored - parent[1] // PAGE_TOKENS * PAGE_TOKENS)
        return self._page_bytes(stored)

    def yield_to_live(self, live_bytes: int) -> None:
        """Drop kept memories (least recently used first) while they and the running
        requests' ``live_bytes`` exceed the host cap: a live request never has its pages
        evicted, nor is it rejected, for the sake of a kept memory."""
        if self.host_cap_bytes is not None:
            self._make_room(live_bytes, self.host_cap_bytes)

    def _drop(self, kept_id: str) -> None:
        entry = self.entries.pop(kept_id)
        for h in entry.hashes:
            owners = self.by_hash.get(h)
            if owners is not None:
                owners.remove(kept_id)
                if not owners:
                    del self.by_hash[h]
        if kept_id in self.pending.keep:
            # never reached the worker: nothing to free there
            self.pending.keep.remove(kept_id)
        else:
            self.pending.drop.append(kept_id)

    def lookup(self, req_id: str, tokens) -> int:
        """Tokens of this new request's prompt that a kept memory holds (block-aligned,
        leaving at least one token to compute); remembers which memory."""
        self.found.pop(req_id, None)
        limit = (len(tokens) - 1) // self.block_size * self.block_size
        best = None
        for i, h in enumerate(block_hashes(tokens[:limit], self.block_size)):
            owners = self.by_hash.get(h)
            if not owners:
                break
            best = (owners[-1], i + 1)
        if best is None:
            return 0
        kept_id, blocks = best
        h = blocks * self.block_size
        entry = self.entries[kept_id]
        if not np.array_equal(entry.tokens[:h], np.asarray(tokens[:h], dtype=np.int64)):
            return 0  # a hash collision
        self.entries.move_to_end(kept_id)
        self.found[req_id] = (kept_id, h)
        return h

    def take_ops(self, scheduled: set[str], live: set[str]) -> ReuseOps:
        """The ops for the step about to run: attaches of the requests it schedules."""
        ops, self.pending = self.pending, ReuseOps()
        for req_id in list(self.found):
            if req_id in scheduled:
                ops.attach[req_id] = self.attached[req_id] = self.found.pop(req_id)
            elif req_id not in live:
                del self.found[req_id]
        return ops


def install() -> None:
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler

    if getattr(Scheduler.schedule, "_episodic", False):
        return
    original_init = Scheduler.__init__
    original_schedule = Scheduler.schedule
    original_free = Scheduler._free_request
    original_computed = KVCacheManager.get_computed_blocks

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.kv_cache_manager._episodic_index = _index_for(self.vllm_config)

    @functools.wraps(original_free)
    def _free_request(self, request, *args, **kwargs):
        index = self.kv_cache_manager._episodic_index
        if index is not None:
            index.register(request.request_id, request.all_token_ids[: request.num_computed_tokens])
        return original_free(self, request, *args, **kwargs)

    @functools.wraps(original_computed)
    def get_computed_blocks(self, request):
        index = getattr(self, "_episodic_index", None)
        # prompt logprobs (and pooling) need every prompt token computed
        if index is None or request.skip_reading_prefix_cache:
            return original_computed(self, request)
        hit = index.lookup(request.request_id, request.prompt_token_ids or [])
        if not hit:
            return self.empty_kv_cache_blocks, 0, 0
        null = self.block_pool.null_block
        blocks = tuple([null] * (hit // index.block_size) for _ in self.kv_cache_config.kv_cache_groups)
        return self.create_kv_cache_blocks(blocks), hit, 0

    @functools.wraps(original_schedule)
    def schedule(self, *args, **kwargs):
        output = original_schedule(self, *args, **kwargs)
        index = self.kv_cache_manager._episodic_index
        if index is not None:
            # the running requests' host bytes once this step's tokens are computed
            # (schedule() has already counted them in num_computed_tokens)
            live = sum(index.live_bytes(req.request_id, req.num_computed_tokens) for req in self.running)
            index.yield_to_live(live)
            scheduled = {req.req_id for req in output.scheduled_new_reqs}
            scheduled.update(output.scheduled_cached_reqs.resumed_req_ids or ())
            ops = index.take_ops(scheduled, set(self.requests))
            if ops:
                output.episodic_ops = ops
        return output

    schedule._episodic = True
    Scheduler.__init__ = __init__
    Scheduler.schedule = schedule
    Scheduler._free_request = _free_request
    KVCacheManager.get_computed_blocks = get_computed_blocks


def _index_for(vllm_config) -> KeptIndex | None:
    """The index of an episodic engine that keeps memories; None otherwise."""
    from vllm_episodic.integration.selection import episodic_config, host_bytes_per_token, is_episodic

    if not is_episodic(vllm_config):
        return None
    config = episodic_config(vllm_config)
    if not config.kept_memory_gib:
        return None
    per_token = host_bytes_per_token(vllm_config.model_config)
    # a finished request's tail: sinks, window, the open event and the block alignment
    local = config.sink_tokens + config.window_tokens + config.max_event_tokens + 2 * vllm_config.cache_config.block_size
    return KeptIndex(vllm_config.cache_config.block_size, int(config.kept_memory_gib * (1 << 30)), per_token, local,
                     host_cap_bytes=int(config.host_memory_gib * (1 << 30)))
