"""Chunked surprise equals a direct log-softmax over the full vocabulary."""

import torch

from vllm_episodic.core.surprise import surprise_from_logits, token_surprise


def test_chunked_surprise_equals_direct_computation():
    torch.manual_seed(42)
    hidden = torch.randn(1000, 16)
    head = torch.randn(16, 5000)
    ids = torch.randint(0, 5000, (1000,))
    calls = []

    def logits(h):
        calls.append(h.shape[0])
        return h @ head

    got = token_surprise(hidden, ids, logits, rows=128)
    expected = -torch.log_softmax(hidden @ head, -1)[torch.arange(1000), ids]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    assert max(calls) <= 128  # never the whole [tokens x vocab] at once


def test_bfloat16_logits():
    torch.manual_seed(42)
    logits = torch.randn(8, 1000) * 4
    ids = torch.randint(0, 1000, (8,))
    exact = surprise_from_logits(logits, ids)
    approx = surprise_from_logits(logits.bfloat16(), ids)
    assert approx.dtype == torch.float32
    torch.testing.assert_close(approx, exact, atol=0.1, rtol=0.02)
