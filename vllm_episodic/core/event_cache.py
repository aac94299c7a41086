"""The device event cache of one request: which event tokens sit in which slots.

The cache is a fixed set of token slots per layer (on vLLM: KV blocks that the
request owns). Attention reads the first ``attended`` slots, which must hold exactly
the tokens retrieved for this step; the slots after them are a reserve that keeps
recently dropped events (least recently used go first), so that an event retrieved
again is a device-side move instead of a host→device copy.

Event tokens are cached as prefixes: ``count`` tokens of event e are its first
``count`` tokens (a retrieval can take part of an event to fill the budget exactly).
This class only does the bookkeeping; the caller copies the K/V it is told to.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class SlotPlan:
    """What to copy into one layer's slots before it attends."""

    loads: list[tuple[int, int, int, list[int]]] = field(default_factory=list)
    """(event, first rank, count, slots): tokens to bring from the host store"""
    moves: list[tuple[list[int], list[int]]] = field(default_factory=list)
    """(from slots, to slots): tokens already on the device that change slot"""
    hits: int = 0
    misses: int = 0


class EventSlots:
    """Slot bookkeeping of one request, one instance per layer."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.attended = 0
        # event -> slots holding its first len(slots) tokens, for attended events
        self.active: dict[int, list[int]] = {}
        # reserve: event -> slots, least recently used first
        self.reserve: OrderedDict[int, list[int]] = OrderedDict()
        self._free_active: list[int] = []
        self._free_reserve: list[int] = list(range(num_slots - 1, -1, -1))
        self._applied: dict[int, int] | None = None  # the selection the slots hold now

    def clear(self) -> None:
        """Forget everything (the keys' rotation changed); the slot count stays."""
        self.active.clear()
        self.reserve.clear()
        self.attended = 0
        self._free_active = []
        self._free_reserve = list(range(self.num_slots - 1, -1, -1))
        self._applied = None

    def resident_tokens(self) -> int:
        return sum(map(len, self.active.values())) + sum(map(len, self.reserve.values()))

    def update(self, selection: dict[int, int], attended: int, num_slots: int | None = None) -> SlotPlan:
        """Make the first ``attended`` slots hold exactly ``selection`` (event -> count).

        ``sum(selection.values())`` must equal ``attended``. ``num_slots`` grows the cache
        (slots become usable as the request's blocks are vacated).
        """
        if selection is self._applied and attended == self.attended:
            # the very selection the slots already hold (a step that did not retrieve)
            return SlotPlan(hits=len(selection))
        if num_slots is not None and num_slots > self.num_slots:
            self._free_reserve[:0] = range(num_slots - 1, self.num_slots - 1, -1)
            self.num_slots = num_slots
        if sum(selection.values()) != attended or attended > self.num_slots:
            raise ValueError(f"selection of {sum(selection.values())} tokens for {attended} slots")
        plan = SlotPlan()
        if attended != self.attended:
            self._resize(attended)
        # 1. shrink or drop active events that are no longer (fully) selected
        for event in list(self.active):
            slots = self.active[event]
            keep = selection.get(event, 0)
            if keep >= len(slots):
                continue
            dropped = slots[keep:]
            if keep == 0:
                del self.active[event]
                self._to_reserve(event, slots, plan)
            else:
                self.active[event] = slots[:keep]
                self._free_active.extend(dropped)
        # 2. grow or add selected events
        for event, count in selection.items():
            have = self.active.get(event, [])
            if len(have) >= count:
                if have:
                    plan.hits += 1
                continue
            need = count - len(have)
            slots = [self._free_active.pop() for _ in range(need)]
            cached = self.reserve.pop(event, None)
            if cached is not None and len(have) == 0:
                usable = cached[:need]
                plan.moves.append((usable, slots[: len(usable)]))
                self._free_reserve.extend(cached)
                if len(usable) < need:
                    plan.loads.append((event, len(usable), need - len(usable), slots[len(usable):]))
                plan.hits += 1
            else:
                if cached is not None:
                    self._free_reserve.extend(cached)
                plan.loads.append((event, len(have), need, slots))
                plan.misses += 1
            self.active[event] = have + slots
        self._applied = selection
        return plan

    def _resize(self, attended: int) -> None:
        """Grow the attended region ``[0, attended)`` into the reserve (or restart)."""
        if attended < self.attended:
            self.clear()
        for event in [e for e, slots in self.reserve.items() if min(slots) < attended]:
            self._free_reserve.extend(self.reserve.pop(event))
        newly = [s for s in self._free_reserve if s < attended]
        self._free_reserve = [s for s in self._free_reserve if s >= attended]
        self._free_active.extend(newly)
        self.attended = attended

    def _to_reserve(self, event: int, slots: list[int], plan: SlotPlan) -> None:
        """An event leaves the attended slots: keep it in the reserve if there is room."""
        self._free_active.extend(slots)
        capacity = self.num_slots - self.attended
        if len(slots) > capacity:
            return
        while len(self._free_reserve) < len(slots) and self.reserve:
            _, old = self.reserve.popitem(last=False)
            self._free_reserve.extend(old)
        target = [self._free_reserve.pop() for _ in range(len(slots))]
        plan.moves.append((list(slots), target))
        self.reserve[event] = target
