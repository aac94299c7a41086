"""The device event cache of one request: an LRU of events per layer.

Each layer has a pool of ``num_blocks`` blocks of ``block_size`` token slots::

    keys, values  [num_layers, num_kv_heads, num_blocks * block_size, head_size]

An event occupies ``ceil(len / block_size)`` blocks (not necessarily adjacent). Its
keys are stored *rotated to their attention-time positions*, so a hit costs no
work. When a retrieval needs more room, the least recently retrieved events that
are not part of the current selection are evicted. ``fetch`` returns the slot
index of every token of the selected events, which attention gathers in one op.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

# loader(layer, event_ids) -> (keys, values [kvH, n, D] rotated, lengths (k,))
Loader = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class EventCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_size: int,
        dtype: torch.dtype,
        capacity_tokens: int,
        block_size: int = 16,
        device: torch.device | str = "cpu",
    ):
        self.block_size = block_size
        self.num_blocks = max(1, capacity_tokens // block_size)
        shape = (num_layers, num_kv_heads, self.num_blocks * block_size, head_size)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        # per layer: event id -> slot index of its tokens, in least-recently-used order
        self.resident: list[OrderedDict[int, torch.Tensor]] = [OrderedDict() for _ in range(num_layers)]
        self.free: list[list[int]] = [list(range(self.num_blocks)) for _ in range(num_layers)]
        self._slot_offsets = torch.arange(block_size)
        # event tokens resident, summed over layers
        self.resident_tokens = 0

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def clear(self) -> None:
        """Drop every event (their rotation frame changed)."""
        for layer, resident in enumerate(self.resident):
            resident.clear()
            self.free[layer] = list(range(self.num_blocks))
        self.resident_tokens = 0

    def fetch(self, layer: int, event_ids: list[int], loader: Loader) -> tuple[torch.Tensor, int, int]:
        """Make ``event_ids`` resident in ``layer``'s pool.

        Returns:
            ``(slots, hits, misses)``: ``slots`` is the ``(tokens,)`` slot index of every
            token of the events, in the order of ``event_ids``.
        """
        resident = self.resident[layer]
        missing = [e for e in event_ids if e not in resident]
        hits = len(event_ids) - len(missing)
        if missing:
            keys, values, lengths = loader(layer, torch.tensor(missing, dtype=torch.long))
            needed = [-(-int(n) // self.block_size) for n in lengths.tolist()]
            self._make_room(layer, sum(needed), keep=set(event_ids))
            free = self.free[layer]
            slot_lists = []
            for event, length, blocks_needed in zip(missing, lengths.tolist(), needed):
                blocks = torch.tensor([free.pop() for _ in range(blocks_needed)], dtype=torch.long)
                slots = (blocks[:, None] * self.block_size + self._slot_offsets).flatten()[:length]
                resident[event] = slots
                slot_lists.append(slots)
                self.resident_tokens += length
            all_slots = torch.cat(slot_lists)
            self.keys[layer].index_copy_(1, all_slots, keys)
            self.values[layer].index_copy_(1, all_slots, values)
        for event in event_ids:
            resident.move_to_end(event)
        if not event_ids:
            return torch.empty(0, dtype=torch.long), 0, 0
        return torch.cat([resident[e] for e in event_ids]), hits, len(missing)

    def _make_room(self, layer: int, blocks: int, keep: set[int]) -> None:
        resident, free = self.resident[layer], self.free[layer]
        if blocks > self.num_blocks:
            raise ValueError(
                f"device event cache of {self.capacity_tokens} tokens cannot hold "
                f"{blocks * self.block_size} tokens of retrieved events"
            )
        for event in list(resident):
            if len(free) >= blocks:
                break
            if event in keep:
                continue
            slots = resident.pop(event)
            self.resident_tokens -= int(slots.numel())
            free.extend(torch.unique(slots // self.block_size).tolist())
        if len(free) < blocks:
            raise ValueError("device event cache too small for the current selection")
