"""Triton kernels against their torch references over random shapes: GQA groups 1–8,
head sizes 64/128, ragged event counts, odd lengths, the dtypes the backend uses.

On CPU the kernels run under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1); with ``TRITON_INTERPRET=0`` on a GPU machine they run compiled
on CUDA tensors (benchmarks/gpu_check.sh)."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

triton = pytest.importorskip("triton")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@pytest.fixture(scope="module")
def kernels():
    """The kernel modules (tests/conftest.py switched the interpreter on, unless told not to)."""
    if DEVICE == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1", "on CPU, Triton kernels need TRITON_INTERPRET=1"
    return {n: importlib.import_module(f"vllm_episodic.kernels.{n}") for n in ("score", "gather", "block_attention")}


def _on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


def _ragged_events(gen, rows):
    counts = torch.randint(0, 40, (rows,), generator=gen)
    counts[torch.randint(0, rows, (1,), generator=gen)] += 1  # at least one event
    owner = torch.repeat_interleave(torch.arange(rows), counts)
    offsets = torch.cat((torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)))
    return owner, offsets


@pytest.mark.parametrize("seed", range(6))
def test_score_matches_reference(kernels, seed):
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[seed % 3]
    head_size = (64, 128)[seed % 2]
    num_heads = int(torch.randint(1, 9, (1,), generator=gen)) * 2
    rows = int(torch.randint(1, 6, (1,), generator=gen))
    owner, _ = _ragged_events(gen, rows)
    query = torch.randn(rows, num_heads, head_size, generator=gen).to(dtype)
    reps = torch.randn(owner.numel(), num_heads, head_size, generator=gen).to(dtype)
    available = torch.randint(0, 3, (owner.numel(),), generator=gen)
    got = kernels["score"].score_events_triton(*_on_device(query, reps, owner, available)).cpu()
    want = kernels["score"].score_events_reference(query, reps, owner, available)
    assert torch.equal(torch.isinf(got), available == 0)
    finite = available != 0
    torch.testing.assert_close(got[finite], want[finite], rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * head_size)


@pytest.mark.parametrize("seed", range(3))
def test_layer_batched_scoring_matches_per_layer_scoring(kernels, seed):
    """One request's events scored for every layer at once (the decode step's retrieval
    ahead of the layers) give each layer's own scores, on both paths."""
    from vllm_episodic.kernels import score_layer_events

    gen = torch.Generator().manual_seed(50 + seed)
    dtype = DTYPES[seed]
    layers, events, num_heads, head_size = 5, 37, 6, 64
    query = torch.randn(layers, num_heads, head_size, generator=gen).to(dtype)
    # a slice of a larger store, as the memory passes it (not contiguous over layers)
    reps = torch.randn(layers, events + 11, num_heads, head_size, generator=gen)[:, :events]
    available = torch.randint(0, 3, (events,), generator=gen)
    owner = torch.zeros(events, dtype=torch.int32)
    want = torch.stack([kernels["score"].score_events_reference(query[i : i + 1], reps[i], owner, available)
                        for i in range(layers)])
    got = score_layer_events(query, reps, available)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    flat_owner = torch.arange(layers).repeat_interleave(events)
    compiled = kernels["score"].score_events_triton(
        *_on_device(query, reps.reshape(layers * events, num_heads, head_size), flat_owner, available.repeat(layers))
    ).cpu().view(layers, events)
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(compiled))
    torch.testing.assert_close(compiled[finite], want[finite], rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * head_size)


def test_budget_selection_matches_per_row_greedy():
    from vllm_episodic.kernels import select_within_budget

    gen = torch.Generator().manual_seed(0)
    owner, offsets = _ragged_events(gen, 7)
    scores = torch.randn(owner.numel(), generator=gen)
    sizes = torch.randint(8, 129, (owner.numel(),), generator=gen)
    order, taken = select_within_budget(scores, sizes, offsets, 700)
    # the same with the row length and event size the caller knows (no device→host reads),
    # including a longest larger than any row and a smallest below the true one
    longest = int((offsets[1:] - offsets[:-1]).max())
    hinted = select_within_budget(scores, sizes, offsets, 700, longest=longest + 3, smallest=4)
    for row in range(7):
        lo, hi = int(offsets[row]), int(offsets[row + 1])
        want, used = [], 0
        for event in sorted(range(hi - lo), key=lambda e: -float(scores[lo + e])):
            if used + int(sizes[lo + event]) > 700:
                break
            want.append(event)
            used += int(sizes[lo + event])
        assert order[row][taken[row]].tolist() == want
        assert hinted[0][row][hinted[1][row]].tolist() == want


@pytest.mark.parametrize("seed", range(6))
def test_gather_rotate_matches_reference(kernels, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    dtype = DTYPES[seed % 3]
    head_size = (64, 128)[seed % 2]
    neox = seed < 3
    rotary_dim = head_size if seed != 4 else head_size // 2  # partial rotary keeps a tail
    num_kv_heads = int(torch.randint(1, 5, (1,), generator=gen))
    n, source_rows, slots = 37, 61, 83  # odd sizes
    src_k = torch.randn(source_rows, num_kv_heads, head_size, generator=gen).to(dtype)
    src_v = torch.randn(source_rows, num_kv_heads, head_size, generator=gen).to(dtype)
    src_index = torch.randint(0, source_rows, (n,), generator=gen)
    dst_slot = torch.randperm(slots, generator=gen)[:n]
    position = torch.randint(-500, 5000, (n,), generator=gen)
    inv = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    angles = torch.arange(5000).float()[:, None] * inv[None, :]
    cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1)
    outs = []
    for fn, device in ((kernels["gather"].gather_rotate_triton, DEVICE), (kernels["gather"].gather_rotate_reference, "cpu")):
        dst_k = torch.zeros(slots, num_kv_heads, head_size, dtype=dtype, device=device)
        dst_v = torch.zeros_like(dst_k)
        args = [t.to(device) for t in (src_k, src_v, src_index, dst_k, dst_v, dst_slot, cos_sin, position)]
        args[3], args[4] = dst_k, dst_v
        fn(*args, neox)
        outs.append((dst_k.cpu(), dst_v.cpu()))
    (got_k, got_v), (want_k, want_v) = outs
    torch.testing.assert_close(got_k.float(), want_k.float(), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    assert torch.equal(got_v, want_v)
    untouched = torch.ones(slots, dtype=torch.bool)
    untouched[dst_slot] = False
    assert not got_k[untouched].any()


def test_gather_reference_matches_the_rope_frames():
    """The reference rotates exactly as the memory's RoPE does (one convention)."""
    from vllm_episodic.kernels import gather_rotate

    from vllm_episodic.core.rope import Rope, rope_table

    rope = Rope(rope_table(4096, 64, 10000.0), 64, is_neox_style=True)
    keys = torch.randn(20, 2, 64)
    position = torch.arange(-10, 10) * 97
    dst_k, dst_v = torch.zeros(20, 2, 64), torch.zeros(20, 2, 64)
    gather_rotate(keys, keys, torch.arange(20), dst_k, dst_v, torch.arange(20), rope.table, position, True)
    torch.testing.assert_close(dst_k, rope.rotate(keys, position), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(DEVICE != "cuda", reason="zero-copy reads of pinned host memory need a GPU")
def test_gather_reads_the_pinned_host_store(kernels):
    """On CUDA the gather kernel reads selected tokens straight from pinned host memory."""
    gen = torch.Generator().manual_seed(7)
    src_k = torch.randn(500, 8, 128, generator=gen).to(torch.bfloat16).pin_memory()
    src_v = torch.randn(500, 8, 128, generator=gen).to(torch.bfloat16).pin_memory()
    index = torch.randint(0, 500, (77,), generator=gen)
    slot = torch.randperm(100, generator=gen)[:77]
    position = torch.randint(-300, 3000, (77,), generator=gen)
    inv = 1.0 / (10000 ** (torch.arange(0, 128, 2).float() / 128))
    angles = torch.arange(4096).float()[:, None] * inv[None, :]
    cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1)
    got_k, got_v = torch.zeros(100, 8, 128, dtype=torch.bfloat16, device="cuda"), torch.zeros(
        100, 8, 128, dtype=torch.bfloat16, device="cuda")
    kernels["gather"].gather_rotate_triton(src_k, src_v, index.cuda(), got_k, got_v, slot.cuda(), cos_sin.cuda(),
                                           position.cuda(), True)
    want_k, want_v = torch.zeros(100, 8, 128, dtype=torch.bfloat16), torch.zeros(100, 8, 128, dtype=torch.bfloat16)
    kernels["gather"].gather_rotate_reference(src_k, src_v, index, want_k, want_v, slot, cos_sin, position, True)
    torch.testing.assert_close(got_k.cpu(), want_k, rtol=5e-2, atol=5e-2)
    assert torch.equal(got_v.cpu(), want_v)


@pytest.mark.parametrize("seed", range(6))
def test_block_attention_matches_reference(kernels, seed):
    gen = torch.Generator().manual_seed(200 + seed)
    dtype = DTYPES[seed % 3]
    head_size = (64, 128)[seed % 2]
    group = (1, 2, 4, 8, 3, 5)[seed]
    num_kv_heads = 1 + seed % 2
    block_size, num_blocks, rows = 16, 40, 3
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_size, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_size, generator=gen).to(dtype)
    block_table = torch.stack([torch.randperm(num_blocks, generator=gen)[:12] for _ in range(rows)]).int()
    # a decode row, a prefill chunk (causal), a row whose first query sees nothing
    row_of = torch.tensor([0, 1, 1, 1, 1, 2, 2])
    visible = torch.tensor([171, 60, 61, 62, 63, 0, 5])
    q = torch.randn(row_of.numel(), group * num_kv_heads, head_size, generator=gen).to(dtype)
    scale = head_size ** -0.5
    want_out, want_lse = kernels["block_attention"].block_attention_reference(q, k_cache, v_cache, block_table,
                                                                              row_of, visible, scale)
    tol = TOLERANCE[dtype]
    # one program per row, the automatic split, and splits that leave some programs no keys
    for splits in (1, None, 5, 12):
        got_out, got_lse = kernels["block_attention"].block_attention_triton(
            *_on_device(q, k_cache, v_cache, block_table, row_of, visible), scale, splits=splits)
        got_out, got_lse = got_out.cpu(), got_lse.cpu()
        torch.testing.assert_close(got_out, want_out, rtol=tol, atol=tol)
        torch.testing.assert_close(got_lse, want_lse, rtol=tol, atol=tol)
        assert torch.isinf(got_lse[5]).all() and not got_out[5].any()


def test_block_attention_reference_is_plain_attention():
    """The reference over a block list equals attention over the listed keys in order."""
    from vllm_episodic.kernels import block_attention

    gen = torch.Generator().manual_seed(3)
    k_cache = torch.randn(10, 16, 2, 64, generator=gen)
    v_cache = torch.randn(10, 16, 2, 64, generator=gen)
    table = torch.tensor([[7, 2, 9, 0]])
    q = torch.randn(1, 8, 64, generator=gen)
    out, lse = block_attention(q, k_cache, v_cache, table, torch.tensor([0]), torch.tensor([50]), 0.125)
    keys = k_cache[table[0]].reshape(-1, 2, 64)[:50]
    values = v_cache[table[0]].reshape(-1, 2, 64)[:50]
    # plain softmax over the listed keys, query head h reading KV head h // 4
    scores = torch.einsum("thd,khd->thk", q, keys.repeat_interleave(4, dim=1)) * 0.125
    want_lse = scores.logsumexp(-1)
    want_out = torch.einsum("thk,khd->thd", scores.softmax(-1), values.repeat_interleave(4, dim=1))
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


def test_prefetcher_moves_the_selected_tokens():
    from vllm_episodic.kernels import Prefetcher

    keys, values = torch.randn(100, 2, 64), torch.randn(100, 2, 64)
    prefetcher = Prefetcher("cpu", max_tokens=32, num_kv_heads=2, head_size=64, dtype=torch.float32)
    first, second = torch.tensor([5, 9, 11]), torch.arange(40, 72)
    prefetcher.submit(0, keys, values, first)
    prefetcher.submit(1, keys, values, second)
    k0, v0 = prefetcher.wait(0)
    k1, v1 = prefetcher.wait(1)
    assert torch.equal(k0, keys[first]) and torch.equal(v0, values[first])
    assert torch.equal(k1, keys[second]) and torch.equal(v1, values[second])
    with pytest.raises(ValueError, match="staging size"):
        prefetcher.submit(0, keys, values, torch.arange(33))


def test_ranking_key_orders_like_the_scores_and_breaks_ties_by_column():
    from vllm_episodic.kernels import ranking_key

    scores = torch.tensor([[0.5, float("-inf"), -2.0, 0.0, -0.0, 3.0, 0.5, -2.0, float("inf"), 1e-30]])
    order = torch.argsort(ranking_key(scores)[0], descending=True).tolist()
    want = sorted(range(scores.shape[1]), key=lambda e: (-float(scores[0, e]), -e))
    assert order == want == [8, 5, 6, 0, 9, 4, 3, 7, 2, 1]
