"""Attention over an assembled block list: sinks + event-cache blocks + local blocks,
one softmax, for platforms whose own paged attention op cannot take the list.

The caches are vLLM's flash layout ``[num_blocks, block_size, num_kv_heads, head_size]``
with keys already rotated for the frame (the gather kernel wrote them so). A batch row
``r`` reads blocks ``block_table[r, :]`` in order; query token ``t`` belongs to row
``row_of[t]`` and sees the first ``visible[t]`` keys of its row (the local part is
causal, so during a prefill chunk each query sees one key more than the previous).

Returns ``out [tokens, num_heads, head_size]`` and ``lse [tokens, num_heads]`` in
float32, so that a caller may merge it with another part exactly.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference needs no Triton
    triton = None


def block_attention_reference(q, k_cache, v_cache, block_table, row_of, visible, scale: float):
    """See the module docstring. Pads every query to the longest visible length."""
    tokens, num_heads, head_size = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    longest = int(visible.max()) if tokens else 0
    j = torch.arange(longest, device=q.device)
    blocks = block_table[row_of.long()][:, j // block_size].long()  # [tokens, longest]
    slots = blocks * block_size + j % block_size
    keys = k_cache.reshape(-1, num_kv_heads, head_size)[slots].float()  # [tokens, longest, kvH, D]
    values = v_cache.reshape(-1, num_kv_heads, head_size)[slots].float()
    qg = q.float().view(tokens, num_kv_heads, group, head_size)
    scores = torch.einsum("tkgd,tnkd->tkgn", qg, keys) * scale
    seen = j[None, :] < visible[:, None].long()  # [tokens, longest]
    scores = scores.masked_fill(~seen[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [tokens, kvH, group]
    probs = torch.exp(scores - lse.unsqueeze(-1).clamp(min=-1e30))
    out = torch.einsum("tkgn,tnkd->tkgd", probs, values)
    return out.reshape(tokens, num_heads, head_size), lse.reshape(tokens, num_heads)


if triton is not None:

    @triton.jit
    def _block_attention_kernel(q_ptr, k_ptr, v_ptr, table_ptr, row_ptr, visible_ptr, out_ptr, lse_ptr, scale,
                                blocks_per_split,
                                q_stride_tok, q_stride_head, cache_stride_block, cache_stride_tok, cache_stride_head,
                                table_stride, out_stride_tok, out_stride_split, out_stride_head,
                                lse_stride_tok, lse_stride_split,
                                GROUP: tl.constexpr, HEAD_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                                BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
        # one program per (query token, KV head, split of the block list): the GROUP query
        # heads sharing that KV head stream its keys once, with an online softmax over the
        # split's blocks; splits are merged by their log-sum-exp afterwards (flash-decoding),
        # so that one decode row still fills the GPU
        t = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        row = tl.load(row_ptr + t).to(tl.int64)
        seen = tl.load(visible_ptr + t)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        g_ok = g < GROUP
        d_ok = d < HEAD_SIZE
        heads = kv_head * GROUP + g
        q = tl.load(q_ptr + t * q_stride_tok + heads[:, None] * q_stride_head + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32) * scale
        m = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
        denom = tl.zeros((BLOCK_G,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
        offs = tl.arange(0, BLOCK_SIZE)
        first = split * blocks_per_split
        last = tl.minimum(first + blocks_per_split, tl.cdiv(seen, BLOCK_SIZE))
        for i in range(first, last):
            block = tl.load(table_ptr + row * table_stride + i).to(tl.int64)
            key_ok = i * BLOCK_SIZE + offs < seen
            base = block * cache_stride_block + offs[:, None] * cache_stride_tok + kv_head * cache_stride_head + d[None, :]
            kv_mask = key_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + base, mask=kv_mask, other=0.0).to(tl.float32)  # [BS, D]
            v = tl.load(v_ptr + base, mask=kv_mask, other=0.0).to(tl.float32)
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [G, BS]
            s = tl.where(key_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            denom = denom * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m = m_new
        has = denom > 0
        out = acc / tl.where(has, denom, 1.0)[:, None]
        lse = tl.where(has, m + tl.log(tl.where(has, denom, 1.0)), float("-inf"))
        tl.store(out_ptr + t * out_stride_tok + split * out_stride_split + heads[:, None] * out_stride_head
                 + d[None, :], out, mask=g_ok[:, None] & d_ok[None, :])
        tl.store(lse_ptr + t * lse_stride_tok + split * lse_stride_split + heads, lse, mask=g_ok)


def merge_splits(out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of partial softmaxes: ``out [tokens, splits, heads, D]`` and
    ``lse [tokens, splits, heads]`` (``-inf`` = the split saw no key) → one output and LSE."""
    total = torch.logsumexp(lse, dim=1)  # [tokens, heads]; -inf where no split saw a key
    weight = torch.exp(lse - total[:, None]).nan_to_num_(0.0)  # -inf - -inf is nan: no keys, no weight
    return (weight[..., None] * out).sum(dim=1), total


def block_attention_triton(q, k_cache, v_cache, block_table, row_of, visible, scale: float,
                           splits: int | None = None):
    """:func:`block_attention_reference` in one Triton launch (plus an exact merge when the
    block list is split across programs; ``splits`` defaults to enough programs for a GPU)."""
    tokens, num_heads, head_size = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    if tokens == 0:
        return (torch.empty(0, num_heads, head_size, dtype=torch.float32, device=q.device),
                torch.empty(0, num_heads, dtype=torch.float32, device=q.device))
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1, "K/V caches must share a layout"
    columns = block_table.shape[1]
    if splits is None:  # ~512 programs, at least 4 blocks each
        splits = min(triton.cdiv(columns, 4), triton.cdiv(512, tokens * num_kv_heads))
    splits = max(1, min(splits, columns))
    blocks_per_split = triton.cdiv(columns, splits)
    splits = triton.cdiv(columns, blocks_per_split)
    out = torch.empty(tokens, splits, num_heads, head_size, dtype=torch.float32, device=q.device)
    lse = torch.empty(tokens, splits, num_heads, dtype=torch.float32, device=q.device)
    q = q.contiguous()
    block_table = block_table.to(torch.int32).contiguous()
    _block_attention_kernel[(tokens, num_kv_heads, splits)](
        q, k_cache, v_cache, block_table, row_of.to(torch.int32).contiguous(),
        visible.to(torch.int32).contiguous(), out, lse, scale, blocks_per_split,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_table.stride(0), out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        GROUP=group, HEAD_SIZE=head_size, BLOCK_SIZE=block_size,
        BLOCK_G=max(triton.next_power_of_2(group), 1), BLOCK_D=triton.next_power_of_2(head_size),
    )
    if splits == 1:
        return out[:, 0], lse[:, 0]
    return merge_splits(out, lse)
