"""All layers' paged KV caches written and read as one (``StackedCaches``), against
vLLM's own cache-write op layer by layer, on caches laid out as vLLM allocates them."""

from __future__ import annotations

import pytest
import torch

from vllm_episodic.integration.paged_kv import StackedCaches, probe_layout, slot_offsets, write_slots

LAYERS, BLOCKS, KV_HEADS, BLOCK, DIM = 3, 6, 2, 16, 64


def _caches(dtype):
    """Per-layer caches ``[blocks, kv_heads, block, 2 * dim]`` as views of one buffer,
    layer after layer, with a gap of two blocks between layers (what the stacked view
    must cope with)."""
    page = KV_HEADS * BLOCK * 2 * DIM
    buffer = torch.zeros(LAYERS * (BLOCKS + 2) * page, dtype=dtype)
    return [buffer[i * (BLOCKS + 2) * page : (i * (BLOCKS + 2) + BLOCKS) * page].view(BLOCKS, KV_HEADS, BLOCK, 2 * DIM)
            for i in range(LAYERS)]


@pytest.mark.parametrize("dtype, isa", [(torch.float32, "vec"), (torch.bfloat16, "vec16")])
def test_stacked_write_and_read_match_per_layer(dtype, isa):
    g = torch.Generator().manual_seed(0)
    stacked_caches, expected = _caches(dtype), _caches(dtype)
    stacked = StackedCaches.of(stacked_caches)
    layout = probe_layout(isa, dtype, BLOCK, DIM)
    # each token: a layer and a slot of that layer's cache (slots repeat across layers)
    layers = torch.tensor([0, 2, 1, 2, 0, 1, 1])
    slots = torch.tensor([3, 3, 17, 40, 95, 0, 50])
    keys = torch.randn(7, KV_HEADS, DIM, generator=g).to(dtype)
    values = torch.randn(7, KV_HEADS, DIM, generator=g).to(dtype)
    stacked.write(isa, layers, slots, keys, values)
    for i in range(7):
        layer = int(layers[i])
        write_slots(expected[layer], isa, slots[i : i + 1], keys[i : i + 1], values[i : i + 1])
    for mine, theirs in zip(stacked_caches, expected):
        assert torch.equal(mine, theirs)
    # reading back: one layer per token, and every token in every layer
    key_at, value_at = slot_offsets(layout, slots, KV_HEADS)
    got_k, got_v = stacked.read(layers.view(-1, 1, 1), key_at, value_at)
    assert torch.equal(got_k, keys) and torch.equal(got_v, values)
    grid_k, _ = stacked.read(torch.arange(LAYERS).view(-1, 1, 1, 1), key_at, value_at)
    assert grid_k.shape == (LAYERS, 7, KV_HEADS, DIM)
    for i in range(7):
        assert torch.equal(grid_k[layers[i], i], keys[i])


def test_caches_outside_one_allocation_are_refused():
    separate = [torch.zeros(BLOCKS, KV_HEADS, BLOCK, 2 * DIM) for _ in range(2)]
    with pytest.raises(ValueError, match="one allocation"):
        StackedCaches.of(separate)
