"""Retrieval: a planted key is found, neighbours join, the budget holds."""

import torch

from vllm_episodic.core.retrieval import ContiguityBuffer, retrieve, similarity_scores, top_within_budget


def _events(num, heads=4, dim=32, seed=42):
    torch.manual_seed(seed)
    reps = torch.randn(num, heads, dim)
    sizes = torch.randint(8, 129, (num,))
    return reps, sizes


def test_planted_key_is_retrieved():
    reps, sizes = _events(200)
    query = torch.randn(4, 32)
    reps[137] = query * 3  # the event whose keys match the query
    scores = similarity_scores(query, reps)
    chosen = retrieve(scores, sizes, budget=600, contiguity_share=0.3, buffer=ContiguityBuffer(180))
    assert 137 in chosen


def test_neighbours_are_added_and_persist():
    reps, sizes = _events(100)
    sizes[:] = 16
    buffer = ContiguityBuffer(capacity_tokens=64)
    query = torch.randn(4, 32)
    reps[40] = query * 5
    # similarity takes one event (16 tokens), the queue holds four neighbours
    first = retrieve(similarity_scores(query, reps), sizes, 80, 0.8, buffer)
    assert {39, 40, 41} <= set(first)
    # the next step prefers event 70: 39/41 stay in the queue while there is room
    reps[40] = -query * 5
    reps[70] = query * 5
    second = retrieve(similarity_scores(query, reps), sizes, 80, 0.8, buffer)
    assert {69, 70, 71} <= set(second)
    assert set(second) == {39, 41, 69, 70, 71}
    third = retrieve(similarity_scores(query, reps), sizes, 80, 0.8, buffer)
    assert set(third) == {39, 41, 69, 70, 71}  # nothing new: the queue keeps its events


def test_budget_respected_and_sorted():
    reps, sizes = _events(500)
    for seed in range(5):
        torch.manual_seed(seed)
        query = torch.randn(4, 32)
        buffer = ContiguityBuffer(300)
        for _ in range(3):
            chosen = retrieve(similarity_scores(query, reps), sizes, 1000, 0.3, buffer)
            assert chosen == sorted(chosen) and len(set(chosen)) == len(chosen)
            assert int(sizes[chosen].sum()) <= 1000
            query = query + 0.3 * torch.randn(4, 32)


def test_everything_fits_means_everything():
    _, sizes = _events(10)
    assert retrieve(torch.zeros(10), sizes, int(sizes.sum()), 0.3, ContiguityBuffer(10)) == list(range(10))
    assert retrieve(torch.zeros(10), sizes, 0, 0.3, ContiguityBuffer(0)) == []


def test_top_within_budget_is_a_score_ordered_prefix():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7])
    sizes = torch.tensor([10, 10, 100, 10])
    assert top_within_budget(scores, sizes, 25).tolist() == [1, 3]
    assert top_within_budget(scores, sizes, 1000).tolist() == [1, 3, 2, 0]
