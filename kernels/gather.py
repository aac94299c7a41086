"""Copy selected event tokens into device cache slots, rotating keys on the way.

The host store keeps keys un-rotated; attention needs them rotated at the position
the frame gives them (their true position, or one relative to the anchor). One launch
moves every selected token of a layer and step::

    dst_k[dst_slot[i]] = rope(src_k[src_index[i]], position[i])
    dst_v[dst_slot[i]] = src_v[src_index[i]]

``src`` is the staging buffer the prefetcher filled (or any device tensor),
``dst`` the cache viewed as ``[slots, num_kv_heads, head_size]``. ``cos_sin`` is
vLLM's rotary table ``[max_position, rotary_dim]`` (cos half, then sin half);
negative positions rotate backwards.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference needs no Triton
    triton = None


def rotate_reference(x: torch.Tensor, cos_sin: torch.Tensor, position: torch.Tensor, is_neox_style: bool) -> torch.Tensor:
    """``x [n, heads, head_size]`` rotated by ``position (n,)``; float32."""
    rotary_dim = cos_sin.shape[1]
    half = rotary_dim // 2
    rows = cos_sin[position.abs().long()].float()
    cos = rows[:, None, :half]
    sin = rows[:, None, half:] * position.sign().float()[:, None, None]
    x = x.float()
    rot, tail = x[..., :rotary_dim], x[..., rotary_dim:]
    if is_neox_style:
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat((out, tail), dim=-1)


def gather_rotate_reference(src_k, src_v, src_index, dst_k, dst_v, dst_slot, cos_sin, position,
                            is_neox_style: bool) -> None:
    """See the module docstring; writes ``dst_k``/``dst_v`` in place."""
    src_index, dst_slot = src_index.long(), dst_slot.long()
    keys = rotate_reference(src_k[src_index], cos_sin, position, is_neox_style)
    dst_k[dst_slot] = keys.to(dst_k.dtype)
    dst_v[dst_slot] = src_v[src_index].to(dst_v.dtype)


if triton is not None:

    @triton.jit
    def _gather_rotate_kernel(src_k, src_v, src_index, dst_k, dst_v, dst_slot, cos_sin, position,
                              src_stride_tok, src_stride_head, dst_stride_tok, dst_stride_head, table_stride,
                              HEAD_SIZE: tl.constexpr, HALF: tl.constexpr, NEOX: tl.constexpr,
                              BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr):
        # one program per (token, kv head)
        i = tl.program_id(0)
        head = tl.program_id(1)
        src_row = tl.load(src_index + i).to(tl.int64)
        dst_row = tl.load(dst_slot + i).to(tl.int64)
        pos = tl.load(position + i).to(tl.int64)
        sign = tl.where(pos < 0, -1.0, 1.0)
        table = cos_sin + tl.abs(pos) * table_stride
        s_base = src_row * src_stride_tok + head * src_stride_head
        d_base = dst_row * dst_stride_tok + head * dst_stride_head

        pair = tl.arange(0, BLOCK_HALF)
        pair_ok = pair < HALF
        cos = tl.load(table + pair, mask=pair_ok, other=1.0)
        sin = tl.load(table + HALF + pair, mask=pair_ok, other=0.0) * sign
        if NEOX:
            first, second = pair, pair + HALF
        else:
            first, second = 2 * pair, 2 * pair + 1
        x1 = tl.load(src_k + s_base + first, mask=pair_ok, other=0.0).to(tl.float32)
        x2 = tl.load(src_k + s_base + second, mask=pair_ok, other=0.0).to(tl.float32)
        tl.store(dst_k + d_base + first, (x1 * cos - x2 * sin).to(dst_k.dtype.element_ty), mask=pair_ok)
        tl.store(dst_k + d_base + second, (x2 * cos + x1 * sin).to(dst_k.dtype.element_ty), mask=pair_ok)

        dims = tl.arange(0, BLOCK_D)
        # dimensions past the rotary part are copied as they are
        tail = (dims >= 2 * HALF) & (dims < HEAD_SIZE)
        k_tail = tl.load(src_k + s_base + dims, mask=tail, other=0.0)
        tl.store(dst_k + d_base + dims, k_tail.to(dst_k.dtype.element_ty), mask=tail)
        dim_ok = dims < HEAD_SIZE
        v = tl.load(src_v + s_base + dims, mask=dim_ok, other=0.0)
        tl.store(dst_v + d_base + dims, v.to(dst_v.dtype.element_ty), mask=dim_ok)


def gather_rotate_triton(src_k, src_v, src_index, dst_k, dst_v, dst_slot, cos_sin, position,
                         is_neox_style: bool) -> None:
    """:func:`gather_rotate_reference` in one Triton launch."""
    n = src_index.numel()
    if n == 0:
        return
    num_kv_heads, head_size = src_k.shape[1], src_k.shape[2]
    assert src_k.stride() == src_v.stride() and dst_k.stride() == dst_v.stride(), "K and V must share a layout"
    assert src_k.stride(2) == 1 and dst_k.stride(2) == 1, "head_size must be contiguous"
    cos_sin = cos_sin.float().contiguous()
    half = cos_sin.shape[1] // 2
    _gather_rotate_kernel[(n, num_kv_heads)](
        src_k, src_v, src_index.contiguous(), dst_k, dst_v, dst_slot.contiguous(), cos_sin,
        position.contiguous(), src_k.stride(0), src_k.stride(1), dst_k.stride(0), dst_k.stride(1),
        cos_sin.stride(0), HEAD_SIZE=head_size, HALF=half, NEOX=is_neox_style,
        BLOCK_HALF=triton.next_power_of_2(half), BLOCK_D=triton.next_power_of_2(head_size),
    )
