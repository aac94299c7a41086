"""Slot bookkeeping of the device event cache, checked against a simulated device."""

import random

from vllm_episodic.core.event_cache import EventSlots


class Device:
    """Slots holding (event, rank) labels; applies plans like the backend does."""

    def __init__(self, n):
        self.slots = [None] * n

    def apply(self, plan):
        sources = [[self.slots[s] for s in src] for src, _ in plan.moves]
        for (_, dst), values in zip(plan.moves, sources):
            for s, v in zip(dst, values):
                self.slots[s] = v
        for event, first, count, dst in plan.loads:
            for i, s in enumerate(dst):
                self.slots[s] = (event, first + i)


def check(cache, device, selection):
    attended = sorted(device.slots[: cache.attended])
    expected = sorted((e, r) for e, c in selection.items() for r in range(c))
    assert attended == expected
    for event, slots in cache.reserve.items():
        assert all(s >= cache.attended for s in slots)
        assert [device.slots[s] for s in slots] == [(event, r) for r in range(len(slots))]


def test_random_selections_keep_slots_exact():
    rng = random.Random(0)
    sizes = {e: rng.randint(1, 20) for e in range(60)}
    cache, device = EventSlots(400), Device(400)
    attended = 64
    total_hits = 0
    for step in range(300):
        if step % 50 == 49:
            attended = min(attended + 32, 200)
        pool = list(range(60))
        rng.shuffle(pool)
        selection, used = {}, 0
        for e in pool:
            take = min(sizes[e], attended - used)
            if take <= 0:
                break
            selection[e] = take
            used += take
        if used < attended:
            continue
        plan = cache.update(selection, attended)
        device.apply(plan)
        check(cache, device, selection)
        total_hits += plan.hits
    assert total_hits > 0


def test_reserve_turns_a_reload_into_a_move():
    cache, device = EventSlots(40), Device(40)
    plan = cache.update({1: 10, 2: 10}, 20)
    device.apply(plan)
    assert plan.misses == 2 and not plan.moves
    plan = cache.update({3: 10, 2: 10}, 20)  # 1 goes to the reserve
    device.apply(plan)
    assert plan.misses == 1 and 1 in cache.reserve
    plan = cache.update({1: 10, 2: 10}, 20)  # 1 comes back from the reserve: a move
    device.apply(plan)
    assert plan.misses == 0 and plan.hits == 2
    check(cache, device, {1: 10, 2: 10})


def test_partial_events_grow_and_shrink():
    cache, device = EventSlots(50), Device(50)
    for selection in ({5: 4, 6: 12}, {5: 10, 6: 6}, {5: 16}, {7: 3, 5: 13}):
        device.apply(cache.update(selection, 16))
        check(cache, device, selection)
