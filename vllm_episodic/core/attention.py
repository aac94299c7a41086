"""Attention over explicit key/value lists, with log-sum-exp, and exact merging.

The episodic backend attends over two parts per query: the local window (exact
relative positions, causal) and the global part (sinks + retrieved events). Each
part returns its output and log-sum-exp; :func:`merge_partials` combines them into
exactly the result of one softmax over the union of the keys.
"""

from __future__ import annotations

import torch

# bound on the float32 score matrix of one slice of queries: 32 MiB
_SCORE_BYTES = 32 << 20


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q`` over ``k``/``v`` (GQA), optionally causal by position.

    Args:
        q: ``[tokens, num_heads, head_size]``.
        k, v: ``[keys, num_kv_heads, head_size]``; query head h reads KV head
            ``h // (num_heads // num_kv_heads)``.
        q_pos, k_pos: ``(tokens,)`` and ``(keys,)`` positions; when given, a query only
            sees keys with ``k_pos <= q_pos``.

    Returns:
        ``out [tokens, num_heads, head_size]`` and ``lse [tokens, num_heads]``, float32.
        A query that sees no key gets ``out = 0`` and ``lse = -inf``.
    """
    tokens, num_heads, head_size = q.shape
    num_keys, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    out = torch.zeros(tokens, num_heads, head_size, dtype=torch.float32)
    lse = torch.full((tokens, num_heads), float("-inf"), dtype=torch.float32)
    if num_keys == 0 or tokens == 0:
        return out, lse
    kf = k.float().permute(1, 2, 0)  # [kvH, D, keys]
    vf = v.float().transpose(0, 1)  # [kvH, keys, D]
    rows = max(1, _SCORE_BYTES // (4 * num_heads * num_keys))
    for start in range(0, tokens, rows):
        end = min(start + rows, tokens)
        # [kvH, group * rows, D]: queries of one KV head side by side
        qs = q[start:end].float().view(end - start, num_kv_heads, group, head_size)
        qs = qs.permute(1, 2, 0, 3).reshape(num_kv_heads, group * (end - start), head_size)
        scores = torch.bmm(qs, kf).mul_(scale)  # [kvH, group*rows, keys]
        if q_pos is not None:
            visible = k_pos[None, :] <= q_pos[start:end, None]  # [rows, keys]
            scores = scores.view(num_kv_heads, group, end - start, num_keys)
            scores.masked_fill_(~visible, float("-inf"))
            scores = scores.view(num_kv_heads, group * (end - start), num_keys)
        part_lse = torch.logsumexp(scores, dim=-1)  # [kvH, group*rows]
        probs = torch.exp(scores - part_lse.unsqueeze(-1).clamp(min=-1e30))
        part = torch.bmm(probs, vf)  # [kvH, group*rows, D]
        out[start:end] = part.view(num_kv_heads, group, end - start, head_size).permute(2, 0, 1, 3).reshape(
            end - start, num_heads, head_size
        )
        lse[start:end] = part_lse.view(num_kv_heads, group, end - start).permute(2, 0, 1).reshape(
            end - start, num_heads
        )
    return out, lse


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """Combine two partial attentions over disjoint key sets into one softmax.

    Args:
        out_a, out_b: ``[tokens, heads, head_size]``.
        lse_a, lse_b: ``[tokens, heads]`` (``-inf`` where a part saw no key).

    Returns:
        ``[tokens, heads, head_size]`` float32.
    """
    top = torch.maximum(lse_a, lse_b)
    # a row where both parts are empty would give NaN: it stays 0
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    wa = torch.exp(lse_a - top)
    wb = torch.exp(lse_b - top)
    total = (wa + wb).clamp(min=1e-30)
    return (out_a * (wa / total).unsqueeze(-1)) + (out_b * (wb / total).unsqueeze(-1))
