"""Retrieval: a planted key is found, neighbours join, the budget holds."""

import pytest
import torch

from vllm_episodic.core.retrieval import ContiguityBuffer, retrieve_layers
from vllm_episodic.kernels import select_within_budget


def retrieve(query, reps, available, budget, buffer):
    """One layer's retrieval: chosen events and ``(events,)`` scores."""
    picked, scores = retrieve_layers(query[None], reps[None], available, budget, [buffer])
    return picked[0], scores[0]


def _events(num, heads=4, dim=32, seed=42):
    torch.manual_seed(seed)
    reps = torch.randn(num, heads, dim)
    sizes = torch.randint(8, 129, (num,))
    return reps, sizes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_planted_key_is_retrieved(dtype):
    reps, sizes = _events(200)
    query = torch.randn(4, 32)
    reps[137] = query * 3  # the event whose keys match the query
    chosen, scores = retrieve(query, reps.to(dtype), sizes, budget=600, buffer=ContiguityBuffer(180))
    assert chosen[0] == 137 and int(scores.argmax()) == 137 and scores.dtype == torch.float32


def test_bfloat16_scores_rank_events_as_float32_scores_do():
    """Scoring bfloat16 representatives (the default) rounds each score to bfloat16:
    the ranking stays that of float32 up to near-ties."""
    reps, sizes = _events(2000, heads=9, dim=64)
    query = torch.randn(9, 64)
    _, exact = retrieve(query, reps, sizes, budget=600, buffer=ContiguityBuffer(0))
    _, rounded = retrieve(query, reps.bfloat16(), sizes, budget=600, buffer=ContiguityBuffer(0))
    # inputs and result rounded to 8 significant bits: errors ~1% of the largest score
    torch.testing.assert_close(rounded, exact, rtol=0, atol=1e-2 * float(exact.abs().max()))
    top = set(exact.topk(50).indices.tolist())
    assert len(top & set(rounded.topk(50).indices.tolist())) >= 48


def test_neighbours_are_added_and_persist():
    reps, sizes = _events(100)
    sizes[:] = 16
    buffer = ContiguityBuffer(capacity_tokens=64)
    query = torch.randn(4, 32)
    reps[40] = query * 5
    # similarity takes one event (16 tokens), the queue holds four neighbours
    first, _ = retrieve(query, reps, sizes, 80, buffer)
    assert first[0] == 40 and {39, 41} <= set(first)
    # the next step prefers event 70: 39/41 stay in the queue while there is room
    reps[40] = -query * 5
    reps[70] = query * 5
    second, _ = retrieve(query, reps, sizes, 80, buffer)
    assert set(second) == {39, 41, 69, 70, 71}
    third, _ = retrieve(query, reps, sizes, 80, buffer)
    assert set(third) == {39, 41, 69, 70, 71}  # nothing new: the queue keeps its events


def test_budget_respected_and_unavailable_events_never_chosen():
    reps, sizes = _events(500)
    available = sizes.clone()
    available[::7] = 0  # evicted
    for seed in range(5):
        torch.manual_seed(seed)
        query = torch.randn(4, 32)
        buffer = ContiguityBuffer(300)
        for _ in range(3):
            chosen, scores = retrieve(query, reps, available, 1000, buffer)
            assert len(set(chosen)) == len(chosen)
            assert int(available[chosen].sum()) <= 1000
            assert all(e % 7 for e in chosen) and torch.isinf(scores[::7]).all()
            query = query + 0.3 * torch.randn(4, 32)


def test_budget_selection_is_a_score_ordered_prefix():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7])
    sizes = torch.tensor([10, 10, 100, 10])
    bounds = torch.tensor([0, 4])
    for budget, want in ((25, [1, 3]), (1000, [1, 3, 2, 0])):
        order, taken = select_within_budget(scores, sizes, bounds, budget)
        assert order[0][taken[0]].tolist() == want


def test_layers_retrieved_together_match_layers_retrieved_one_by_one():
    """One scoring and selection call for all layers chooses for each layer what a call
    for that layer alone chooses, and moves each layer's contiguity queue the same way."""
    torch.manual_seed(7)
    layers, num = 4, 120
    reps = torch.randn(layers, num, 4, 32)
    sizes = torch.randint(8, 65, (num,))
    sizes[::9] = 0  # unavailable events
    alone = [ContiguityBuffer(150) for _ in range(layers)]
    together = [ContiguityBuffer(150) for _ in range(layers)]
    for step in range(3):  # the queues persist across steps
        queries = torch.randn(layers, 4, 32)
        picked, scores = retrieve_layers(queries, reps, sizes, 500, together)
        for layer in range(layers):
            want, want_scores = retrieve(queries[layer], reps[layer], sizes, 500, alone[layer])
            assert picked[layer] == want, (step, layer)
            torch.testing.assert_close(scores[layer], want_scores)
            assert list(together[layer].events) == list(alone[layer].events)
            assert sum(int(sizes[e]) for e in picked[layer]) <= 500
