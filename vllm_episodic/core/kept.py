"""Kept memories: a finished request's episodic memory, reused by every later request
whose prompt starts with its tokens (the next turn of a conversation, another question
on the same document).

A kept memory holds every one of its ``N`` tokens' K/V:

- the host store: the events, their representatives and tokens ``[0, open_start)``
  un-rotated (the request's own store, handed over when it finished);
- the *tail*: tokens ``[tail_start, N)`` still in the local window when the request
  finished, copied from the paged cache rotated as vLLM wrote them, so that a request
  attached while its context fits sinks + window reads exactly the keys stock vLLM
  would (``tail_start`` is 0 while the request had no events). A request that was
  attached to a kept memory restored most of its window from that one's tail: its own
  tail shares those tokens (views of the same tensors, where they are bitwise the same)
  and copies only the rest, so four conversations on one document hold its window once.

Attaching at token ``h`` (``0 < h <= N``) gives a new request the memory the building
request had after a step that ended at ``h``: segmentation does not depend on how the
tokens were chunked into steps (:mod:`.segmentation`; without boundary refinement), so
its events are the kept events that end at or before ``h - window``, with their
representatives (mean keys depend only on the event's own keys) and their host K/V. The
attached store shares the kept pages and copies one only when it writes to it
(:meth:`HostStore.shared_prefix`). The engine restores the attached request's local part
(and its sinks) into its paged blocks from :func:`kept_tokens`.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from vllm_episodic.core.rope import Rope
from vllm_episodic.core.store import HostStore, held_bytes

if TYPE_CHECKING:
    from vllm_episodic.core.request import RequestMemory


@dataclass(frozen=True)
class TailPart:
    """Tokens ``[start, start + n)`` of a kept tail: keys (rotated at their positions) and
    values ``[num_layers, n, num_kv_heads, head_size]``, possibly views of another kept
    memory's tail."""

    start: int
    keys: torch.Tensor
    values: torch.Tensor

    @property
    def end(self) -> int:
        return self.start + self.keys.shape[1]

    def cut(self, start: int, end: int) -> TailPart | None:
        """The part's tokens within ``[start, end)`` (views), or None."""
        lo, hi = max(start, self.start), min(end, self.end)
        if lo >= hi:
            return None
        at = slice(lo - self.start, hi - self.start)
        return TailPart(lo, self.keys[:, at], self.values[:, at])


@dataclass
class KeptMemory:
    token_ids: torch.Tensor
    """``(N,)`` int64: the tokens whose K/V it holds"""
    store: HostStore | None
    """events and host K/V of tokens ``[0, tail_start)`` (None: no events were formed)"""
    surprise: torch.Tensor
    """``(N,)`` each token's surprise"""
    next_logits: torch.Tensor | None
    """``[1, vocab]`` the logits at token N - 1: the surprise of whatever token N is"""
    tail_start: int
    tail: list[TailPart]
    """tokens ``[tail_start, N)`` in order"""

    @property
    def num_tokens(self) -> int:
        return self.token_ids.numel()

    def tensors(self) -> list[torch.Tensor]:
        """What it holds besides the store's pages (tail, surprise, token ids, logits)."""
        parts = [t for part in self.tail for t in (part.keys, part.values)]
        return parts + [t for t in (self.surprise, self.token_ids, self.next_logits) if t is not None]

    def tail_tokens(self, start: int, end: int) -> list[TailPart]:
        """The tail's parts within ``[start, end)`` (views)."""
        return [cut for part in self.tail if (cut := part.cut(start, end)) is not None]


def tensor_bytes(tensors) -> int:
    """Bytes of the storages behind these tensors, each storage once (tails share)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def keep(memory: RequestMemory, token_ids: torch.Tensor, tail: tuple[torch.Tensor, torch.Tensor]) -> KeptMemory:
    """A finished request's memory as a kept memory (it takes over the request's store).

    Args:
        token_ids: ``(N,)`` the request's computed tokens (``N = memory.num_tokens``).
        tail: keys (rotated) and values ``[num_layers, N - tail_start(memory), num_kv_heads,
            head_size]`` of the tokens the host store does not hold, from the paged cache.
    """
    n = memory.num_tokens
    if token_ids.numel() != n:
        raise ValueError(f"{token_ids.numel()} token ids for a memory of {n} tokens")
    start = tail_start(memory)
    return KeptMemory(
        token_ids=token_ids.long(), store=memory.store, surprise=memory.surprise[:n].clone(),
        next_logits=memory.carry_logits, tail_start=start,
        tail=_shared_tail(TailPart(start, *tail), memory.attached),
    )


def _shared_tail(tail: TailPart, attached: tuple | None) -> list[TailPart]:
    """The tail as parts: where the request's tokens are those of the kept memory it
    attached to and that one's tail holds the very same bits, views of it; copies of the
    rest (so that nothing keeps the whole read alive)."""
    parent, h = (attached[0](), attached[1]) if attached is not None else (None, 0)
    if parent is None:  # not attached, or its kept memory was dropped since
        return [tail]
    parts, at = [], tail.start
    for shared in parent.tail_tokens(tail.start, min(h, tail.end)):
        read = tail.cut(shared.start, shared.end)
        if not (torch.equal(read.keys, shared.keys) and torch.equal(read.values, shared.values)):
            continue
        if shared.start > at:
            parts.append(_copy(tail.cut(at, shared.start)))
        parts.append(shared)
        at = shared.end
    if at < tail.end:
        parts.append(_copy(tail.cut(at, tail.end)))
    return parts


def _copy(part: TailPart) -> TailPart:
    return TailPart(part.start, part.keys.clone(), part.values.clone())


def tail_start(memory: RequestMemory) -> int:
    """First token a finished request's host store does not hold."""
    return memory.open_start if memory.store is not None else 0


def attach(memory: RequestMemory, kept: KeptMemory, h: int, next_token: int | None) -> None:
    """Make a new request's ``memory`` the kept memory's state after token ``h`` (its
    ``h`` computed tokens are the kept memory's first ``h``).

    Args:
        next_token: the new request's token ``h`` (its surprise comes from the kept
            memory when the kept memory saw the same token there or ended at ``h``).
    """
    if not 0 < h <= kept.num_tokens:
        raise ValueError(f"cannot attach at token {h} of a kept memory of {kept.num_tokens} tokens")
    settings = memory.settings
    store = kept.store
    closed = 0
    if store is not None:
        closed = int((store.ends[: store.num_events] <= h - settings.window_tokens).sum())
    if closed:
        open_start = int(store.ends[closed - 1])
        memory.store = store.shared_prefix(closed, open_start, inherited=h)
        memory.segmenter.open_start = open_start
    memory.surprise[:h] = kept.surprise[:h]
    if h < kept.num_tokens and next_token == int(kept.token_ids[h]):
        memory.surprise[h] = kept.surprise[h]
    else:
        # unknown (the kept logits at h - 1 are gone): the recent mean, never a boundary
        memory.surprise[h] = kept.surprise[max(1, h - settings.surprise_window) : h].mean()
        if h == kept.num_tokens and kept.next_logits is not None:
            # known after all: the kept request's last logits are this token's, and the
            # request's first step records its surprise from them as every step does
            # from the logits kept at the step before (where the logits are: the last
            # pipeline stage, which sends the surprise to the others)
            memory.carry_logits = kept.next_logits
    memory.num_tokens = h
    # weakly: a kept memory the scheduler drops must not live on in its attached requests
    memory.attached = (weakref.ref(kept), h)


def kept_tokens(kept: KeptMemory, rope: Rope, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V ``[num_layers, end - start, num_kv_heads, head_size]`` of kept tokens ``[start,
    end)``, keys rotated at their positions (as the paged cache holds them): the tail's
    as copied, the host store's rotated back (tokens on an evicted page read as 0)."""
    parts = []
    if start < kept.tail_start:
        parts.append(_stored(kept.store, rope, start, min(end, kept.tail_start), kept.tail[0].keys))
    parts += [(part.keys, part.values) for part in kept.tail_tokens(start, end)]
    keys, values = zip(*parts)
    return torch.cat(keys, 1), torch.cat(values, 1)


def _stored(store: HostStore, rope: Rope, start: int, end: int, like: torch.Tensor):
    """Stored tokens ``[start, end)`` of every layer, keys rotated at their positions."""
    num_layers, _, kv_heads, head_size = like.shape
    keys = like.new_zeros((num_layers, end - start, kv_heads, head_size))
    values = torch.zeros_like(keys)
    positions = torch.arange(start, end)
    pages = positions // store.page_tokens
    last = int(pages[-1]) + 1
    held_page = torch.tensor([p < len(store.keys) and store.keys[p] is not None for p in range(last)])
    held = held_page[pages]
    at = positions[held]
    if at.numel():
        n = at.numel()
        layers = torch.arange(num_layers).repeat_interleave(n)
        k, v = store.gather(layers, at.repeat(num_layers))  # [layers * n, kv_heads, head_size]
        # one rotation for all layers: [n, layers * kv_heads, head_size]
        flat = k.view(num_layers, n, kv_heads, head_size).transpose(0, 1).reshape(n, -1, head_size)
        rotated = rope.rotate(flat, at).view(n, num_layers, kv_heads, head_size).transpose(0, 1)
        keys[:, held] = rotated.to(keys.dtype)
        values[:, held] = v.view(num_layers, n, kv_heads, head_size).to(values.dtype)
    return keys, values


class KeptMemories:
    """The kept memories of a worker by id, least recently used first. Which to keep,
    attach and drop is decided by the scheduler (``integration/prefix_reuse.py``): the
    worker only holds them."""

    def __init__(self):
        self.memories: OrderedDict[str, KeptMemory] = OrderedDict()

    def __len__(self) -> int:
        return len(self.memories)

    def add(self, kept_id: str, kept: KeptMemory) -> None:
        self.memories[kept_id] = kept

    def get(self, kept_id: str) -> KeptMemory:
        if kept_id not in self.memories:
            raise KeyError(f"no kept memory {kept_id!r} (the scheduler attached a request to it)")
        self.memories.move_to_end(kept_id)
        return self.memories[kept_id]

    def drop(self, kept_ids) -> None:
        for kept_id in kept_ids:
            self.memories.pop(kept_id, None)

    def stores(self) -> list[HostStore]:
        return [kept.store for kept in self.memories.values() if kept.store is not None]

    def tensors(self) -> list[torch.Tensor]:
        return [t for kept in self.memories.values() for t in kept.tensors()]

    def nbytes(self) -> int:
        """Bytes the kept memories hold (pages and tails they share once)."""
        return held_bytes(self.stores()) + tensor_bytes(self.tensors())
