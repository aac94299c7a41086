"""The host event store of one request: every memory token's K/V, the events, and
their representative keys, for all layers.

Layout (token t of the request sits at index ``t - first_token``)::

    keys, values  [num_layers, num_kv_heads, capacity, head_size]   un-rotated keys
    reps          [num_layers, max_events, num_heads, head_size]     representatives
    starts, ends  [max_events]                                       event token ranges

The tensors are sized once for the request's largest possible length and left
uninitialised: on Linux, untouched pages of a large allocation cost no memory, so
host use grows with the tokens actually written (which is what ``nbytes`` counts)
and returns to the OS when the request is released. With ``pin_memory`` (CUDA) the
pages are committed up front instead.
"""

from __future__ import annotations

import torch


class HostStore:
    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        num_kv_heads: int,
        head_size: int,
        dtype: torch.dtype,
        first_token: int,
        capacity: int,
        min_event_tokens: int,
        pin_memory: bool = False,
    ):
        self.first_token = first_token
        self.capacity = max(capacity, 0)
        self.max_events = self.capacity // max(min_event_tokens, 1) + 1
        shape = (num_layers, num_kv_heads, self.capacity, head_size)
        self.keys = torch.empty(shape, dtype=dtype, pin_memory=pin_memory)
        self.values = torch.empty(shape, dtype=dtype, pin_memory=pin_memory)
        self.reps = torch.empty(
            (num_layers, self.max_events, num_heads, head_size), dtype=dtype, pin_memory=pin_memory
        )
        self.starts = torch.empty(self.max_events, dtype=torch.long)
        self.ends = torch.empty(self.max_events, dtype=torch.long)
        self.num_events = 0
        self.end_token = first_token  # tokens [first_token, end_token) are stored
        self._token_bytes = 2 * num_layers * num_kv_heads * head_size * dtype.itemsize
        self._event_bytes = num_layers * num_heads * head_size * dtype.itemsize

    @property
    def num_tokens(self) -> int:
        return self.end_token - self.first_token

    @property
    def nbytes(self) -> int:
        """Bytes written: keys and values of stored tokens plus representatives."""
        return self.num_tokens * self._token_bytes + self.num_events * self._event_bytes

    def bytes_for(self, tokens: int, events: int) -> int:
        return tokens * self._token_bytes + events * self._event_bytes

    def write(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store un-rotated ``keys``/``values`` ``[num_kv_heads, n, head_size]`` of
        tokens ``[start, start + n)`` for ``layer``."""
        a = start - self.first_token
        b = a + keys.shape[1]
        if a < 0 or b > self.capacity:
            raise IndexError(f"tokens [{start}, {start + keys.shape[1]}) outside the store")
        self.keys[layer, :, a:b].copy_(keys)
        self.values[layer, :, a:b].copy_(values)

    def add_events(self, spans: list[tuple[int, int]]) -> range:
        """Append events (token ranges); tokens up to the last end count as stored."""
        first = self.num_events
        if first + len(spans) > self.max_events:
            raise IndexError("event table full")
        for i, (start, end) in enumerate(spans):
            self.starts[first + i] = start
            self.ends[first + i] = end
        self.num_events += len(spans)
        if spans:
            self.end_token = max(self.end_token, spans[-1][1])
        return range(first, self.num_events)

    def sizes(self) -> torch.Tensor:
        """``(num_events,)`` tokens per event."""
        return self.ends[: self.num_events] - self.starts[: self.num_events]

    def token_index(self, event_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store indices and absolute positions of all tokens of ``event_ids``, in order.

        Returns:
            ``(index, positions)``, both ``(total_tokens,)`` int64.
        """
        starts, ends = self.starts[event_ids], self.ends[event_ids]
        lengths = ends - starts
        total = int(lengths.sum())
        # position of every token: its event's start + its rank within the event
        owner = torch.repeat_interleave(torch.arange(len(event_ids)), lengths)
        first = torch.cumsum(lengths, 0) - lengths
        positions = starts[owner] + torch.arange(total) - first[owner]
        return positions - self.first_token, positions

    def gather(self, layer: int, event_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """K/V of the tokens of ``event_ids`` for ``layer``.

        Returns:
            ``keys, values [num_kv_heads, n, head_size]`` (un-rotated), token positions
            ``(n,)`` and per-event lengths ``(len(event_ids),)``.
        """
        index, positions = self.token_index(event_ids)
        lengths = self.ends[event_ids] - self.starts[event_ids]
        return (
            self.keys[layer].index_select(1, index),
            self.values[layer].index_select(1, index),
            positions,
            lengths,
        )
