"""Partial attention with log-sum-exp and its exact merge, against plain softmax."""

import pytest
import torch

from vllm_episodic.core.attention import attention_with_lse, merge_partials


def _reference(q, k, v, scale, q_pos=None, k_pos=None):
    group = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(group, dim=1)
    vv = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,khd->htk", q.double(), kk) * scale
    if q_pos is not None:
        scores = scores.masked_fill(~(k_pos[None, None, :] <= q_pos[None, :, None]), float("-inf"))
    return torch.einsum("htk,khd->thd", scores.softmax(-1), vv)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (9, 3), (8, 1), (14, 2)])
@pytest.mark.parametrize("tokens, keys", [(1, 7), (33, 100), (300, 513)])
def test_matches_softmax_attention(heads, kv_heads, tokens, keys):
    torch.manual_seed(42)
    q, k, v = torch.randn(tokens, heads, 64), torch.randn(keys, kv_heads, 64), torch.randn(keys, kv_heads, 64)
    out, lse = attention_with_lse(q, k, v, 0.125)
    torch.testing.assert_close(out.double(), _reference(q, k, v, 0.125), atol=1e-5, rtol=1e-4)
    assert lse.shape == (tokens, heads)


def test_causal_by_position_and_split_merge_equals_one_softmax():
    torch.manual_seed(42)
    q = torch.randn(50, 6, 32)
    k, v = torch.randn(200, 2, 32), torch.randn(200, 2, 32)
    k_pos = torch.arange(200)
    q_pos = torch.arange(150, 200)
    full = _reference(q, k, v, 0.2, q_pos, k_pos)
    # split the keys in two arbitrary disjoint sets, attend separately, merge
    perm = torch.randperm(200)
    a, b = perm[:77], perm[77:]
    oa, la = attention_with_lse(q, k[a], v[a], 0.2, q_pos, k_pos[a])
    ob, lb = attention_with_lse(q, k[b], v[b], 0.2, q_pos, k_pos[b])
    torch.testing.assert_close(merge_partials(oa, la, ob, lb).double(), full, atol=1e-5, rtol=1e-4)


def test_empty_parts():
    q = torch.randn(3, 2, 16)
    out, lse = attention_with_lse(q, torch.empty(0, 1, 16), torch.empty(0, 1, 16), 1.0)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    k, v = torch.randn(5, 1, 16), torch.randn(5, 1, 16)
    ob, lb = attention_with_lse(q, k, v, 1.0)
    torch.testing.assert_close(merge_partials(out, lse, ob, lb), ob)


def test_bf16_inputs():
    torch.manual_seed(42)
    q, k, v = (torch.randn(9, 4, 64).bfloat16(), torch.randn(40, 2, 64).bfloat16(), torch.randn(40, 2, 64).bfloat16())
    out, _ = attention_with_lse(q, k, v, 0.125)
    torch.testing.assert_close(out.double(), _reference(q.float(), k.float(), v.float(), 0.125), atol=1e-4, rtol=1e-3)
