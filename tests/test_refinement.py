"""Boundary refinement against brute-force graph metrics on small graphs."""

import itertools

import pytest
import torch

from vllm_episodic.core.refinement import key_similarity, refine_boundaries, split_scores


def _modularity(a, communities):
    total = a.sum()
    degree = a.sum(1)
    q = 0.0
    for c in communities:
        idx = torch.tensor(c)
        q += a[idx][:, idx].sum() - degree[idx].sum() ** 2 / total
    return float(q / total)


def _conductance(a, left, right):
    li, ri = torch.tensor(left), torch.tensor(right)
    cut = a[li][:, ri].sum()
    degree = a.sum(1)
    return float(cut / min(degree[li].sum(), degree[ri].sum()))


@pytest.mark.parametrize("n", [5, 9, 16])
def test_split_scores_match_brute_force(n):
    torch.manual_seed(42)
    x = torch.rand(n, n, dtype=torch.float64)
    a = x + x.T
    mod = split_scores(a, "modularity")
    cond = split_scores(a, "conductance")
    for t in range(1, n):
        left, right = list(range(t)), list(range(t, n))
        assert mod[t].item() == pytest.approx(_modularity(a, [left, right]), rel=1e-9, abs=1e-12)
        assert cond[t].item() == pytest.approx(_conductance(a, left, right), rel=1e-9)


def _block_graph(sizes, strength=5.0, seed=0):
    """Tokens in the same block are similar: keys = block direction + noise."""
    torch.manual_seed(seed)
    keys = []
    for size in sizes:
        direction = torch.randn(32)
        keys.append(direction + 0.3 * torch.randn(size, 32))
    return key_similarity(torch.cat(keys)[None])


@pytest.mark.parametrize("metric", ["modularity", "conductance"])
def test_refinement_moves_a_boundary_to_the_true_split(metric):
    sim = _block_graph([20, 30])  # true boundary at 20
    refined = refine_boundaries([0, 27, 50], sim, offset=0, min_size=4, max_size=40, metric=metric)
    assert refined == [0, 20, 50]


@pytest.mark.parametrize("metric", ["modularity", "conductance"])
def test_refinement_equals_exhaustive_search_per_boundary(metric):
    sim = _block_graph([7, 11, 9, 13], seed=3)
    bounds = [100, 109, 116, 129, 140]
    refined = refine_boundaries(bounds, sim, offset=100, min_size=3, max_size=16, metric=metric)
    # exhaustive: each boundary in turn, given the already refined left neighbour
    expected = list(bounds)
    for i in range(1, len(bounds) - 1):
        left, right = expected[i - 1], expected[i + 1]
        a = sim[left - 100 : right - 100, left - 100 : right - 100].double()
        best, best_t = None, None
        for t in range(max(left + 3, right - 16), min(left + 16, right - 3) + 1):
            l, r = list(range(t - left)), list(range(t - left, right - left))
            value = _modularity(a, [l, r]) if metric == "modularity" else _conductance(a, l, r)
            if best is None or (value > best + 1e-12 if metric == "modularity" else value < best - 1e-12):
                best, best_t = value, t
        expected[i] = best_t
    assert refined == expected
    sizes = [b - a for a, b in itertools.pairwise(refined)]
    assert all(3 <= s <= 16 for s in sizes)
