"""Surprise thresholds and incremental event segmentation."""

import random

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_episodic.core.segmentation import Segmenter, surprise_boundaries


def _reference_boundaries(surprise, start, end, window, gamma):
    out = []
    for t in range(max(start, 1), end):
        prev = surprise[max(1, t - window) : t]
        if len(prev) < 2:
            continue
        if surprise[t] > prev.mean() + gamma * prev.std():
            out.append(t)
    return out


def test_threshold_matches_a_direct_computation():
    torch.manual_seed(42)
    s = torch.rand(500) * 3
    s[[50, 120, 121, 300]] += 10
    got = surprise_boundaries(s, 10, 480, window=32, gamma=1.0).tolist()
    assert got == _reference_boundaries(s.double(), 10, 480, 32, 1.0)
    assert {50, 120, 300} <= set(got)


def test_spikes_become_event_starts_within_size_bounds():
    s = torch.full((1000,), 1.0) + torch.rand(1000) * 0.1
    for spike in (200, 203, 350, 600):
        s[spike] = 20.0
    seg = Segmenter(first_token=128, min_size=8, max_size=128, mode="surprise", window=64, gamma=3.0)
    events = seg.advance(900, s)
    starts = [a for a, _ in events]
    assert 200 in starts and 350 in starts and 600 in starts
    assert 203 not in starts  # 3 tokens after 200: below min_size, dropped
    assert all(8 <= b - a <= 128 for a, b in events)


def test_fixed_mode_cuts_blocks():
    seg = Segmenter(first_token=64, min_size=128, max_size=128, mode="fixed")
    assert seg.advance(64 + 300) == [(64, 192), (192, 320)]
    assert seg.open_start == 320
    assert seg.advance(500) == [(320, 448)]


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    min_size=st.integers(1, 16),
    extra=st.integers(0, 100),
    mode=st.sampled_from(["surprise", "fixed"]),
    gamma=st.floats(0.0, 2.0),
)
def test_every_token_that_left_the_window_is_in_exactly_one_event(seed, min_size, extra, mode, gamma):
    """Random surprise, random chunkings: a partition in order, and the same partition
    whatever the chunking."""
    rng = random.Random(seed)
    max_size = min_size + extra
    n = 2000
    surprise = torch.tensor([rng.expovariate(1.0) for _ in range(n)])
    first = rng.randint(0, 64)

    def run(limits):
        seg = Segmenter(first, min_size, max_size, mode, window=50, gamma=gamma)
        events = []
        for limit in limits:
            events += seg.advance(limit, surprise)
        return events, seg.open_start

    cuts = sorted(rng.sample(range(first, n - 1), rng.randint(1, 40)))
    one_chunk, open_a = run([cuts[-1]])
    many_chunks, open_b = run(cuts)
    assert one_chunk == many_chunks and open_a == open_b
    covered = [t for a, b in many_chunks for t in range(a, b)]
    assert covered == list(range(first, open_b))  # each token once, in order
    assert all(min_size <= b - a <= max_size for a, b in many_chunks)
    assert cuts[-1] - open_b < max_size  # the open event stays below max_size
