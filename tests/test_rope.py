"""RoPE helper: inverse, composition, relative-position property, both layouts."""

import pytest
import torch

from vllm_episodic.core.rope import Rope, rope_table


@pytest.fixture(params=[True, False], ids=["neox", "gptj"])
def rope(request):
    return Rope(rope_table(4096, 48, 10000.0), head_size=64, is_neox_style=request.param)


def test_inverse_undoes_rotation(rope):
    torch.manual_seed(42)
    x = torch.randn(37, 3, 64)
    pos = torch.randint(0, 4096, (37,))
    back = rope.rotate(rope.rotate(x, pos), pos, inverse=True)
    torch.testing.assert_close(back, x, atol=1e-5, rtol=1e-5)


def test_rotations_compose_and_negative_offsets_invert(rope):
    torch.manual_seed(42)
    x = torch.randn(11, 2, 64)
    a, b = torch.randint(0, 2000, (11,)), torch.randint(0, 2000, (11,))
    torch.testing.assert_close(rope.rotate(rope.rotate(x, a), b), rope.rotate(x, a + b), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rope.rotate(rope.rotate(x, a), -a), x, atol=1e-5, rtol=1e-5)


def test_scores_depend_only_on_relative_position(rope):
    torch.manual_seed(42)
    q, k = torch.randn(1, 1, 64), torch.randn(1, 1, 64)
    def score(pq, pk):
        return (rope.rotate(q, torch.tensor([pq])) * rope.rotate(k, torch.tensor([pk]))).sum()
    torch.testing.assert_close(score(100, 40), score(3000, 2940), atol=1e-4, rtol=1e-4)


def test_features_past_rotary_dim_are_untouched(rope):
    x = torch.randn(5, 1, 64)
    y = rope.rotate(x, torch.arange(5) * 100)
    assert torch.equal(y[..., 48:], x[..., 48:])


def test_constant_offset_and_dtype(rope):
    x = torch.randn(4, 2, 64, dtype=torch.bfloat16)
    y = rope.rotate(x, torch.tensor(7))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, rope.rotate(x, torch.full((4,), 7)))
    assert rope.magnitude_error() < 1e-6


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vllms_fused_rotation_rotates_keys_as_rope_does(neox, dtype):
    """The engine's fused rotation (vLLM's CPU rotary op, ``Rope.native``) agrees with
    :meth:`Rope.rotate`; positions outside its table are left to the caller."""
    pytest.importorskip("vllm._custom_ops")
    from vllm_episodic.integration.rope_patch import _fused_rotation

    head_size, rotary_dim = 64, 32  # partial rotary: the tail is not rotated
    table = rope_table(2048, rotary_dim, 10000.0)
    rope = Rope(table, head_size, neox)
    rope.native = _fused_rotation(table, head_size, neox)
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(50, 3, head_size, generator=g).to(dtype)
    positions = torch.randint(0, 2048, (50,), generator=g)
    want = rope.rotate(keys, positions)
    got = rope.rotate_keys(keys.clone(), positions)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tolerance, rtol=tolerance)
    assert rope.rotate_keys(keys.clone(), positions - 100) is None  # negative positions
    assert rope.rotate_keys(keys.clone(), positions + 2048) is None  # past the table
