"""Reading tokens out of vLLM's CPU paged KV cache.

A layer's cache is ``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` in shape;
per (block, KV head) the first ``block_size * head_size`` elements hold keys and the
rest values. *Inside* those halves the C++ op lays elements out for its SIMD kernels,
and the layout depends on the ISA it picked (measured: ``vec``/``vec16`` store keys
transposed, ``[head_size, block_size]``; ``amx`` interleaves pairs of features in
16-token tiles; values are row-major). Rather than hard-coding layouts, the runtime
*probes* once at start-up: it writes index-coded keys and values with vLLM's own
``cpu_attn_reshape_and_cache`` and records where each (token, feature) landed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockLayout:
    """Where (token, feature) of a block half lives: flat index ``[block_size * head_size]``
    into the half, in (token, feature) order."""

    key_index: torch.Tensor
    value_index: torch.Tensor
    block_size: int
    head_size: int


def probe_layout(isa: str, dtype: torch.dtype, block_size: int, head_size: int) -> BlockLayout:
    """Discover the op's in-block layout by writing coded keys/values through it."""
    from vllm import _custom_ops as ops

    index = []
    for half in (0, 1):
        coords = []
        # two passes with small integers (exact even in bfloat16): token, then feature
        for code in (torch.arange(block_size)[:, None].expand(block_size, head_size),
                     torch.arange(head_size)[None, :].expand(block_size, head_size)):
            cache = torch.full((1, 1, block_size, 2 * head_size), -1.0, dtype=dtype)
            view = cache.view(1, 1, 2 * block_size, head_size)
            key_cache, value_cache = view.chunk(2, dim=2)
            data = code.to(dtype).reshape(block_size, 1, head_size).contiguous()
            zeros = torch.zeros_like(data)
            keys, values = (data, zeros) if half == 0 else (zeros, data)
            ops.cpu_attn_reshape_and_cache(
                keys, values, key_cache, value_cache, torch.arange(block_size), isa,
                k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto",
            )
            coords.append(cache.view(2, block_size * head_size)[half].float().round().long())
        token, feature = coords
        flat = token * head_size + feature  # logical (t, d) stored at each offset
        if sorted(flat.tolist()) != list(range(block_size * head_size)):
            raise ValueError(f"could not map the CPU KV cache layout of ISA {isa!r}")
        where = torch.empty_like(flat)
        where[flat] = torch.arange(flat.numel())
        index.append(where)
    return BlockLayout(index[0], index[1], block_size, head_size)


def slot_offsets(layout: BlockLayout, slots: torch.Tensor, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat element offsets of the keys and values of token ``slots`` (absolute slot =
    block * block_size + offset) in a layer's cache viewed as 1-D.

    Returns:
        two ``[n, num_kv_heads, head_size]`` int64 tensors.
    """
    bs, d = layout.block_size, layout.head_size
    block, within = slots // bs, slots % bs
    head = torch.arange(num_kv_heads)
    # element (block, head, half, *) starts at ((block * kvH + head) * 2 + half) * bs * d
    base = (block[:, None] * num_kv_heads + head[None, :]) * 2 * bs * d  # [n, kvH]
    feature = within[:, None] * d + torch.arange(d)[None, :]  # [n, d] logical (t, d)
    keys = base[:, :, None] + layout.key_index[feature][:, None, :]
    values = base[:, :, None] + bs * d + layout.value_index[feature][:, None, :]
    return keys, values


def write_slots(kv_cache: torch.Tensor, isa: str, slots: torch.Tensor, keys: torch.Tensor,
                values: torch.Tensor) -> None:
    """Write ``keys``/``values`` ``[n, num_kv_heads, head_size]`` at token ``slots`` with
    vLLM's own cache-write op (it knows the layout)."""
    from vllm import _custom_ops as ops

    num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
    view = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, -1)
    key_cache, value_cache = view.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(
        keys.to(kv_cache.dtype).contiguous(), values.to(kv_cache.dtype).contiguous(),
        key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto",
    )
