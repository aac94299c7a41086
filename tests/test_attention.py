"""Attention over an explicit key list (torch's fused kernel), against plain softmax."""

import pytest
import torch

from vllm_episodic.core import attention as attention_module
from vllm_episodic.core.attention import attention


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
    out = attention(q, k, v, 0.125)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _reference(q, k, v, 0.125), atol=1e-5, rtol=1e-4)


def test_causal_by_position_in_slices_of_queries(monkeypatch):
    """Keys in any order, each seen by the queries at or after its position; the same
    in one slice of queries and in slices of 7 (the bound on the mask)."""
    torch.manual_seed(42)
    q = torch.randn(50, 6, 32)
    k, v = torch.randn(200, 2, 32), torch.randn(200, 2, 32)
    k_pos = torch.randperm(200)
    q_pos = torch.arange(150, 200)
    full = _reference(q, k, v, 0.2, q_pos, k_pos)
    torch.testing.assert_close(attention(q, k, v, 0.2, q_pos, k_pos).double(), full, atol=1e-5, rtol=1e-4)
    monkeypatch.setattr(attention_module, "_MASK_BYTES", 4 * 200 * 7)
    torch.testing.assert_close(attention(q, k, v, 0.2, q_pos, k_pos).double(), full, atol=1e-5, rtol=1e-4)


def test_no_keys_or_no_queries():
    q = torch.randn(3, 2, 16)
    assert torch.all(attention(q, torch.empty(0, 1, 16), torch.empty(0, 1, 16), 1.0) == 0)
    assert attention(q[:0], torch.randn(5, 1, 16), torch.randn(5, 1, 16), 1.0).shape == (0, 2, 16)


def test_bf16_inputs():
    """bfloat16 queries attend in bfloat16 (the model's dtype, as the stock op): within
    bfloat16 rounding of the float64 answer, and returned as float32."""
    torch.manual_seed(42)
    q, k, v = (torch.randn(9, 4, 64).bfloat16(), torch.randn(40, 2, 64).bfloat16(), torch.randn(40, 2, 64).bfloat16())
    out = attention(q, k, v, 0.125)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _reference(q.double(), k.double(), v.double(), 0.125), atol=1e-2, rtol=1e-2)
