"""Slot bookkeeping of the device event cache, checked against a simulated device."""

import random

import torch

from vllm_episodic.core.event_cache import EMPTY, SlotTable


class Device:
    """Slots of every layer holding token codes; applies changes like the backend does."""

    def __init__(self, layers, n):
        self.slots = [[None] * n for _ in range(layers)]

    def apply(self, changes):
        moved = [self.slots[layer][src] for layer, src in
                 zip(changes.move_layer.tolist(), changes.move_from.tolist())]  # all reads first
        for layer, dst, value in zip(changes.move_layer.tolist(), changes.move_to.tolist(), moved):
            self.slots[layer][dst] = value
        for layer, dst, code in zip(changes.load_layer.tolist(), changes.load_to.tolist(),
                                    changes.load_code.tolist()):
            self.slots[layer][dst] = code


def check(table, device, layers, wanted):
    for layer, row in zip(layers, wanted.tolist()):
        # the attended slots hold exactly the wanted tokens, in any order
        assert sorted(device.slots[layer][: table.attended]) == sorted(row)
        # what the table says each slot holds is what the slot holds
        for slot, code in enumerate(table.codes[layer].tolist()):
            if code != EMPTY:
                assert device.slots[layer][slot] == code


def choose(rng, sizes, attended):
    """Codes of a random selection of events' first tokens, ``attended`` in all."""
    pool = list(sizes)
    rng.shuffle(pool)
    codes = []
    for event in pool:
        take = min(sizes[event], attended - len(codes))
        codes += [event * 1000 + rank for rank in range(take)]
        if len(codes) == attended:
            return codes
    return None


def test_random_selections_keep_every_layers_slots_exact():
    rng = random.Random(0)
    sizes = {e: rng.randint(1, 20) for e in range(60)}
    layers = 3
    table, device = SlotTable(layers), Device(layers, 400)
    attended, hits, moves = 64, 0, 0
    for step in range(300):
        if step % 50 == 49:
            attended = min(attended + 32, 200)
        if step == 170:
            attended = 48  # a smaller budget starts over
        rows = [choose(rng, sizes, attended) for _ in range(layers)]
        # prefill chunks update one layer at a time, decode steps all layers at once
        which = [step % layers] if step % 4 == 0 else list(range(layers))
        wanted = torch.tensor([rows[i] for i in which])
        changes = table.update(torch.tensor(which), wanted, 400)
        device.apply(changes)
        check(table, device, which, wanted)
        assert changes.hits + changes.misses == wanted.numel()
        assert changes.misses == changes.load_code.numel()
        hits, moves = hits + changes.hits, moves + changes.move_layer.numel()
    assert hits > 0 and moves > 0


def test_reserve_turns_a_reload_into_a_move():
    table, device = SlotTable(1), Device(1, 40)
    layer = torch.tensor([0])
    first, second, third = list(range(10)), list(range(100, 110)), list(range(200, 210))
    changes = table.update(layer, torch.tensor([first + second]), 40)
    device.apply(changes)
    assert changes.misses == 20 and changes.move_layer.numel() == 0
    changes = table.update(layer, torch.tensor([third + second]), 40)  # `first` goes to the reserve
    device.apply(changes)
    assert changes.misses == 10 and changes.hits == 10 and changes.move_layer.numel() == 10
    assert (table.codes[0, 20:] >= 0).sum() == 10
    changes = table.update(layer, torch.tensor([first + second]), 40)  # back from the reserve: moves
    device.apply(changes)
    assert changes.misses == 0 and changes.hits == 20 and changes.load_code.numel() == 0
    check(table, device, [0], torch.tensor([first + second]))


def test_without_a_reserve_dropped_tokens_are_forgotten():
    table, device = SlotTable(2), Device(2, 16)
    layers = torch.tensor([0, 1])
    device.apply(table.update(layers, torch.arange(32).view(2, 16), 16))
    changes = table.update(layers, torch.arange(8, 40).view(2, 16), 16)
    device.apply(changes)
    # per layer 8 tokens stay, 8 are new; nothing moves, nothing is kept aside
    assert changes.hits == 16 and changes.misses == 16 and changes.move_layer.numel() == 0
    assert changes.load_layer.tolist() == [0] * 8 + [1] * 8
    check(table, device, [0, 1], torch.arange(8, 40).view(2, 16))
    assert table.resident_tokens() == 32


def test_the_reserve_keeps_the_latest_dropped_tokens():
    table, device = SlotTable(1), Device(1, 8)
    layer = torch.tensor([0])
    for batch in ([1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]):
        device.apply(table.update(layer, torch.tensor([batch]), 8))
    # 4 reserve slots: the tokens dropped last (5..8) evicted the earlier ones (1..4)
    assert sorted(table.codes[0, 4:].tolist()) == [5, 6, 7, 8]
    changes = table.update(layer, torch.tensor([[5, 6, 1, 2]]), 8)
    device.apply(changes)
    assert changes.hits == 2 and changes.misses == 2
    check(table, device, [0], torch.tensor([[5, 6, 1, 2]]))
