"""The device event cache of one request: which memory token sits in which slot, for
every layer at once.

The cache is a fixed set of token slots per layer (on vLLM: KV blocks that the
request owns). Attention reads the first ``attended`` slots, which must hold exactly
the tokens retrieved for this step, in any order (positions live in the keys'
rotation, not in the slot order); the slots after them are a reserve that keeps
recently dropped tokens (those dropped longest ago are overwritten first), so that a
token retrieved again is a device-side move instead of a host→device copy.

A token is named by a *code*, a non-negative int64 that says what its slot holds
(the caller's choice: the memory encodes the token's position and the position its
key is rotated for). The table is bookkeeping in tensors, with no loop over layers,
events or tokens; the caller copies the K/V it is told to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EMPTY = -1


@dataclass
class SlotChanges:
    """Copies that make the slots hold a new selection, as ``(n,)`` int64 tensors.

    Apply ``moves`` first, all at once (every source is read before any slot is
    written: a reserve slot can be a move's source and another move's target), then
    ``loads``, whose tokens come from the host store.
    """

    move_layer: torch.Tensor
    move_from: torch.Tensor
    move_to: torch.Tensor
    load_layer: torch.Tensor
    load_to: torch.Tensor
    load_code: torch.Tensor
    hits: int
    """wanted tokens already on the device (in place or moved from the reserve)"""
    misses: int
    """wanted tokens loaded from the host store"""


def _stride(rows: int, *codes: torch.Tensor) -> int:
    """Row stride that keys code c of row r as ``r * stride + c + 1`` without two rows
    overlapping (``EMPTY`` keys as ``r * stride``, matching no code)."""
    stride = max(int(c.max()) for c in codes) + 2
    if stride * rows >= 1 << 62:
        raise ValueError(f"codes up to {stride} are too large for {rows} rows")
    return stride


def _row_matches(held: torch.Tensor, wanted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``held [rows, n]`` (codes, ``EMPTY`` allowed) and ``wanted [rows, n]``
    (codes), each unique within its row: which held codes are wanted and which wanted
    codes are held. One sort of both (two ``torch.isin`` calls would sort twice)."""
    rows = held.shape[0]
    if held.numel() == 0:
        return held.bool(), wanted.bool()
    stride = _stride(rows, held, wanted)
    offset = torch.arange(rows, dtype=torch.long)[:, None] * stride
    keyed = torch.cat(((held + 1 + offset).flatten(), (wanted + 1 + offset).flatten()))
    ordered, where = torch.sort(keyed)
    # equal neighbours are one held and one wanted code (or two EMPTY, masked below)
    pair = ordered[1:] == ordered[:-1]
    matched = torch.zeros_like(keyed, dtype=torch.bool)
    matched[where[:-1][pair]] = True
    matched[where[1:][pair]] = True
    held_found = matched[: held.numel()].view_as(held) & (held != EMPTY)
    return held_found, matched[held.numel():].view_as(wanted)


class SlotTable:
    """The slots of one request's event cache in every layer.

    ``codes [layers, slots]`` holds each slot's token code (``EMPTY``: nothing);
    ``dropped [layers, slots]`` the update count at which a reserve slot's token left
    the attended slots (the reserve keeps the latest).
    """

    def __init__(self, num_layers: int):
        self.codes = torch.full((num_layers, 0), EMPTY, dtype=torch.long)
        self.dropped = torch.zeros((num_layers, 0), dtype=torch.long)
        self.attended = 0
        self._updates = 0

    @property
    def num_slots(self) -> int:
        return self.codes.shape[1]

    def clear(self) -> None:
        """Forget every slot's content (the keys' rotation changed); the slot count stays."""
        self.codes.fill_(EMPTY)
        self.attended = 0

    def resident_tokens(self) -> int:
        return int((self.codes != EMPTY).sum())

    def update(self, layers: torch.Tensor, wanted: torch.Tensor, num_slots: int) -> SlotChanges:
        """Make the first ``attended`` slots of these layers hold exactly ``wanted``.

        Args:
            layers: ``(n,)`` the layers to update.
            wanted: ``[n, attended]`` each layer's token codes (unique within a row).
            num_slots: slots usable now (the cache grows as the request's blocks are
                vacated; it never shrinks).
        """
        attended = wanted.shape[1]
        if num_slots > self.num_slots:
            grow = num_slots - self.num_slots
            self.codes = torch.cat((self.codes, self.codes.new_full((self.codes.shape[0], grow), EMPTY)), 1)
            self.dropped = torch.cat((self.dropped, self.dropped.new_zeros((self.dropped.shape[0], grow))), 1)
        if attended > self.num_slots:
            raise ValueError(f"{attended} tokens wanted in a cache of {self.num_slots} slots")
        if attended < self.attended:
            self.clear()
        # reserve slots that become attended lose their tokens
        self.codes[:, self.attended : attended] = EMPTY
        self.attended = attended
        self._updates += 1
        table, age = self.codes[layers], self.dropped[layers]  # [n, slots] copies, written back
        held = table[:, :attended]
        # [n, attended] slots that already hold a wanted token; wanted tokens already attended
        keep, present = _row_matches(held, wanted)
        # per row as many free attended slots as missing tokens, both in row-major order
        free_row, free_slot = (~keep).nonzero(as_tuple=True)
        need_row, need_rank = (~present).nonzero(as_tuple=True)
        need = wanted[need_row, need_rank]

        # missing tokens that sit in the reserve move from there
        source = _locate(table[:, attended:], need_row, need)
        moved = source >= 0
        move_row, move_from, move_to = need_row[moved], source[moved] + attended, free_slot[moved]

        # tokens dropped from the attended slots go to the reserve: first into slots that
        # the moves vacate, then into empty ones, then over the tokens dropped longest ago
        drop_row, drop_slot = (~keep & (held != EMPTY)).nonzero(as_tuple=True)
        rank = age[:, attended:].clone()
        rank[table[:, attended:] == EMPTY] = -1
        rank[move_row, move_from - attended] = -2
        stash_row, stash_from, stash_to = _stash(rank, drop_row, drop_slot)
        stash_to = stash_to + attended

        stashed = held[stash_row, stash_from]
        table[move_row, move_from] = EMPTY
        table[stash_row, stash_to] = stashed
        age[stash_row, stash_to] = self._updates
        table[free_row, free_slot] = need
        self.codes[layers], self.dropped[layers] = table, age
        loaded = ~moved
        return SlotChanges(
            move_layer=layers[torch.cat((move_row, stash_row))],
            move_from=torch.cat((move_from, stash_from)), move_to=torch.cat((move_to, stash_to)),
            load_layer=layers[need_row[loaded]], load_to=free_slot[loaded], load_code=need[loaded],
            hits=wanted.numel() - int(loaded.sum()), misses=int(loaded.sum()),
        )


def _locate(slots: torch.Tensor, rows: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Index ``(n,)`` of each (row, code) in ``slots [rows, width]``, -1 where absent."""
    missing = torch.full_like(codes, -1)
    width = slots.shape[1]
    if width == 0 or codes.numel() == 0:
        return missing
    stride = _stride(slots.shape[0], slots, codes)
    keyed = (slots + 1 + torch.arange(slots.shape[0])[:, None] * stride).flatten()
    ordered, where = torch.sort(keyed)
    probe = codes + 1 + rows * stride
    at = torch.searchsorted(ordered, probe).clamp(max=ordered.numel() - 1)
    found = ordered[at] == probe
    return torch.where(found, where[at] % width, missing)


def _stash(rank: torch.Tensor, drop_row: torch.Tensor, drop_slot: torch.Tensor):
    """Reserve slots for dropped tokens: per row, the lowest ``rank [rows, width]`` first
    (those that do not fit are not kept). Returns (row, from slot, reserve index)."""
    width = rank.shape[1]
    if width == 0 or drop_row.numel() == 0:
        return drop_row[:0], drop_slot[:0], drop_slot[:0]
    order = torch.argsort(rank, dim=1, stable=True)  # [rows, width] best targets first
    counts = torch.bincount(drop_row, minlength=rank.shape[0])
    nth = torch.arange(drop_row.numel()) - (torch.cumsum(counts, 0) - counts)[drop_row]
    fits = nth < width
    return drop_row[fits], drop_slot[fits], order[drop_row[fits], nth[fits]]
