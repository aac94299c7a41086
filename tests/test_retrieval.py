"""Retrieval: a planted key is found, neighbours join, the budget holds, and the
batched tensor version makes the choices the rules describe, row by row."""

import random

import pytest
import torch

from vllm_episodic.core.retrieval import (
    Selection, empty_queues, fill_budget, greedy_fit, most_events, retrieve, stack_queues,
)
from vllm_episodic.kernels import score_layer_events, select_within_budget


class Queue:
    """One row's contiguity queue in a test: ``events [1, width]`` carried across steps."""

    def __init__(self, capacity_tokens):
        self.capacity = capacity_tokens
        self.events = empty_queues(1)


def retrieve_one(query, reps, available, budget, buffer):
    """One layer's retrieval: chosen events and ``(events,)`` scores."""
    scores = score_layer_events(query[None], reps[None], available)
    chosen, buffer.events = retrieve(scores, available[None], torch.tensor([budget]), buffer.events,
                                     buffer.capacity)
    return [e for e in chosen[0].tolist() if e >= 0], scores[0]


def _events(num, heads=4, dim=32, seed=42):
    torch.manual_seed(seed)
    reps = torch.randn(num, heads, dim)
    sizes = torch.randint(8, 129, (num,))
    return reps, sizes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_planted_key_is_retrieved(dtype):
    reps, sizes = _events(200)
    query = torch.randn(4, 32)
    reps[137] = query * 3  # the event whose keys match the query
    chosen, scores = retrieve_one(query, reps.to(dtype), sizes, budget=600, buffer=Queue(180))
    assert chosen[0] == 137 and int(scores.argmax()) == 137 and scores.dtype == torch.float32


def test_bfloat16_scores_rank_events_as_float32_scores_do():
    """Scoring bfloat16 representatives rounds each score to bfloat16:
    the ranking stays that of float32 up to near-ties."""
    reps, sizes = _events(2000, heads=9, dim=64)
    query = torch.randn(9, 64)
    _, exact = retrieve_one(query, reps, sizes, budget=600, buffer=Queue(0))
    _, rounded = retrieve_one(query, reps.bfloat16(), sizes, budget=600, buffer=Queue(0))
    # inputs and result rounded to 8 significant bits: errors ~1% of the largest score
    torch.testing.assert_close(rounded, exact, rtol=0, atol=1e-2 * float(exact.abs().max()))
    top = set(exact.topk(50).indices.tolist())
    assert len(top & set(rounded.topk(50).indices.tolist())) >= 48


def test_float16_scores_rank_closer_to_float32_than_bfloat16_and_never_overflow():
    """float16 representatives keep 11 significant bits (bfloat16 8): their scores stay
    within 0.2% of float32's. Keys and queries in the hundreds (queries of real models
    reach them) would overflow a float16 score; the scaled query keeps every score
    finite and as exact."""
    reps, sizes = _events(2000, heads=9, dim=64)
    query = torch.randn(9, 64)
    for magnitude in (1.0, 300.0):
        exact = score_layer_events((query * magnitude)[None], (reps * magnitude)[None], sizes)[0]
        half = score_layer_events((query * magnitude)[None], (reps * magnitude).half()[None], sizes)[0]
        assert torch.isfinite(half).all() and float(exact.abs().max()) > 65504 * (magnitude > 1)
        torch.testing.assert_close(half, exact, rtol=0, atol=2e-3 * float(exact.abs().max()))
    top = set(exact.topk(50).indices.tolist())
    assert len(top & set(half.topk(50).indices.tolist())) >= 49


def test_neighbours_are_added_and_persist():
    reps, sizes = _events(100)
    sizes[:] = 16
    buffer = Queue(capacity_tokens=64)
    query = torch.randn(4, 32)
    reps[40] = query * 5
    # similarity takes one event (16 tokens), the queue holds four neighbours
    first, _ = retrieve_one(query, reps, sizes, 80, buffer)
    assert first[0] == 40 and {39, 41} <= set(first)
    # the next step prefers event 70: 39/41 stay in the queue while there is room
    reps[40] = -query * 5
    reps[70] = query * 5
    second, _ = retrieve_one(query, reps, sizes, 80, buffer)
    assert set(second) == {39, 41, 69, 70, 71}
    third, _ = retrieve_one(query, reps, sizes, 80, buffer)
    assert set(third) == {39, 41, 69, 70, 71}  # nothing new: the queue keeps its events


def test_budget_respected_and_unavailable_events_never_chosen():
    reps, sizes = _events(500)
    available = sizes.clone()
    available[::7] = 0  # evicted
    for seed in range(5):
        torch.manual_seed(seed)
        query = torch.randn(4, 32)
        buffer = Queue(300)
        for _ in range(3):
            chosen, scores = retrieve_one(query, reps, available, 1000, buffer)
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


class RulesByHand:
    """The retrieval rules of :mod:`vllm_episodic.core.retrieval` for one row, written
    out event by event in plain Python."""

    def __init__(self, capacity):
        self.capacity, self.queue = capacity, []

    def step(self, scores, sizes, budget):
        ranked = sorted((e for e in range(len(scores)) if sizes[e] > 0 and scores[e] > float("-inf")),
                        key=lambda e: (-scores[e], -e))  # ties: the later event first
        top, used = [], 0
        for e in ranked:  # similarity: a prefix of the ranking
            if used + sizes[e] > max(budget - self.capacity, 0):
                break
            top.append(e)
            used += sizes[e]
        if self.capacity > 0:
            seen, fresh = set(top), []
            for e in top:
                for n in (e + 1, e - 1):
                    if 0 <= n < len(scores) and n not in seen:
                        seen.add(n)
                        fresh.append(n)
            queue, held = [], 0
            for e in fresh + [e for e in self.queue if e not in seen and e < len(scores)]:
                if sizes[e] > 0 and held + sizes[e] <= self.capacity:
                    queue.append(e)
                    held += sizes[e]
            self.queue = queue
            for e in queue:
                if used + sizes[e] <= budget:
                    top.append(e)
                    used += sizes[e]
        selection = {e: sizes[e] for e in top}
        for e in sorted((e for e in range(len(scores)) if sizes[e] > 0 and e not in selection),
                        key=lambda e: (scores[e], e)):
            if used >= budget:
                break
            selection[e] = min(sizes[e], budget - used)
            used += selection[e]
        return top, selection


@pytest.mark.parametrize("per_row", [False, True], ids=["one-capacity", "capacity-per-row"])
@pytest.mark.parametrize("seed", range(6))
def test_batched_retrieval_follows_the_rules_row_by_row(seed, per_row):
    """Rows of different lengths, budgets and queues, over several steps (the queues
    persist): every row chooses what the rules written out by hand choose, whether the
    rankings are read in full or only as deep as the budgets can need, also when many
    scores tie (seeds 3-5: scores on a coarse grid, as bfloat16 rounding makes them),
    with one queue capacity for all rows or each row its own."""
    rng = random.Random(seed)
    counts = [rng.randint(5, 60) for _ in range(5)]
    capacities = [rng.choice([0, 40, 90]) for _ in counts] if per_row else [rng.choice([0, 40, 90])] * len(counts)
    capacity = torch.tensor(capacities) if per_row else capacities[0]
    hands = [RulesByHand(c) for c in capacities]
    queues = empty_queues(len(counts))
    width = max(counts)
    for _ in range(4):
        sizes = torch.zeros(len(counts), width, dtype=torch.long)
        scores = torch.full((len(counts), width), float("-inf"))
        for row, count in enumerate(counts):
            sizes[row, :count] = torch.tensor([rng.choice([0, rng.randint(1, 40)]) for _ in range(count)])
            scores[row, :count] = torch.randn(count, generator=torch.Generator().manual_seed(rng.randrange(999)))
            if seed >= 3:
                scores[row, :count] = scores[row, :count].mul(2).round()
        scores = scores.masked_fill(sizes == 0, float("-inf"))
        budget = torch.tensor([rng.randint(0, 300) for _ in counts])
        budget = torch.minimum(budget, sizes.sum(1))  # fill_budget fills exactly: never more than exists
        most = None if seed % 2 else max(most_events(z, int(b)) for z, b in zip(sizes, budget))
        chosen, queues = retrieve(scores, sizes, budget, queues, capacity, most)
        selection = fill_budget(chosen, scores, sizes, budget, most)
        selections = selection.to_dicts()
        for row, hand in enumerate(hands):
            want_top, want = hand.step(scores[row].tolist(), sizes[row].tolist(), int(budget[row]))
            assert [e for e in chosen[row].tolist() if e >= 0] == want_top
            assert [e for e in queues[row].tolist() if e >= 0] == hand.queue
            assert selections[row] == want and sum(selections[row].values()) == int(budget[row])
            # canonical: ascending events, then the padding
            events = selection.events[row]
            assert events.tolist() == sorted(want) + [-1] * (events.numel() - len(want))


def test_most_events_bounds_how_many_events_fit():
    sizes = torch.tensor([40, 0, 5, 12, 7, 100])
    assert most_events(sizes, 23) == 3  # 5 + 7 + 12 = 24 > 23: two fit, plus one
    assert most_events(sizes, 24) == 4 and most_events(sizes, 1000) == 6


def test_greedy_fit_skips_what_does_not_fit_and_goes_on():
    sizes = torch.tensor([[30, 50, 10, 0, 20], [5, 5, 5, 5, 5]])
    taken = greedy_fit(sizes, torch.tensor([60, 12]))
    assert taken.tolist() == [[True, False, True, False, True], [True, True, False, False, False]]


@pytest.mark.parametrize("seed", range(4))
def test_greedy_fit_equals_walking_each_row(seed):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 60, (20, 90), generator=g) * (torch.rand(20, 90, generator=g) > 0.3)
    room = torch.randint(0, 500, (20,), generator=g)
    taken = greedy_fit(sizes, room)
    for row in range(20):
        left, want = int(room[row]), []
        for size in sizes[row].tolist():
            want.append(0 < size <= left)
            left -= size if want[-1] else 0
        assert taken[row].tolist() == want


def test_queues_of_different_widths_stack():
    a, b = torch.tensor([[3, 4, -1]]), torch.tensor([[7], [8]])
    assert stack_queues([a, b]).tolist() == [[3, 4, -1], [7, -1, -1], [8, -1, -1]]


def test_selections_are_canonical_so_equal_choices_compare_equal_row_by_row():
    """The same events with the same tokens give the same tensors whatever order or
    padding they came in: a layer's slots that already hold its selection are seen to."""
    a = Selection.of(torch.tensor([[7, -1, 2, 5], [3, 1, -1, -1]]), torch.tensor([[4, 0, 9, 1], [2, 8, 0, 0]]))
    assert a.events.tolist() == [[2, 5, 7], [1, 3, -1]] and a.tokens.tolist() == [[9, 1, 4], [8, 2, 0]]
    assert a.to_dicts() == [{2: 9, 5: 1, 7: 4}, {1: 8, 3: 2}] and a.num_events == 5
    b = Selection.of(torch.tensor([[5, 7, 2, -1, -1], [4, 1, -1, -1, -1]]),
                     torch.tensor([[1, 4, 9, 0, 0], [2, 8, 0, 0, 0]]))
    assert a.same_rows(b).tolist() == [True, False]
    fewer = Selection.of(torch.tensor([[2, 5, 7], [1, 3, -1]]), torch.tensor([[9, 1, 3], [8, 2, 0]]))
    assert a.same_rows(fewer).tolist() == [False, True]  # one token fewer of event 7
    # rows replaced in a copy, widened as needed; the original is untouched
    empty = Selection.empty(3)
    c = empty.with_rows(torch.tensor([2, 0]), a)
    assert c.to_dicts() == [{1: 8, 3: 2}, {}, {2: 9, 5: 1, 7: 4}] and empty.events.shape == (3, 0)
    assert a.with_rows(torch.tensor([1]), a.row(0)).to_dicts()[1] == {2: 9, 5: 1, 7: 4}
    assert a.to_dicts() == [{2: 9, 5: 1, 7: 4}, {1: 8, 3: 2}]
    assert c.rows(torch.tensor([2])).same_rows(a.row(0)).all() and a.row(1).to_dicts() == [{1: 8, 3: 2}]


def _plain_event_mass(queries, reps, available):
    """The scorer's definition, one layer, head and query at a time in float64."""
    layers, m, heads, size = queries.shape
    out = torch.zeros(layers, reps.shape[1], dtype=torch.float64)
    live = available > 0
    for layer in range(layers):
        for h in range(heads):
            best = torch.zeros(reps.shape[1], dtype=torch.float64)
            for j in range(m):
                rep = reps[layer, :, h // (heads // reps.shape[2])]
                logits = rep.double() @ queries[layer, j, h].double() / size**0.5
                logits = logits + available.double().clamp(min=1).log()
                shares = torch.zeros_like(logits)
                shares[live] = logits[live].softmax(0)
                best = torch.maximum(best, shares)
            out[layer] += best
    return out.masked_fill(~live, float("-inf"))


@pytest.mark.parametrize("rep_heads", [6, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_event_mass_equals_per_head_softmax_shares(dtype, rep_heads):
    """Representatives per query head (6) or per KV head (2: heads 0-2 score the first)."""
    from vllm_episodic.kernels import event_mass

    g = torch.Generator().manual_seed(0)
    queries = 3 * torch.randn(3, 5, 6, 32, generator=g)
    reps = torch.randn(3, 40, rep_heads, 32, generator=g)
    available = torch.randint(0, 20, (40,), generator=g)
    available[7] = 0
    got = event_mass(queries, reps.to(dtype), available)
    want = _plain_event_mass(queries, reps.to(dtype).float(), available)
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got.double(), want, atol=tolerance, rtol=tolerance)
    assert torch.isinf(got[:, 7]).all()


def test_one_head_with_huge_logits_does_not_outvote_heads_that_agree():
    """Why ``mass``: heads 0-2 each single out event 3 (scaled logit gap 10); head 3
    singles out event 5 with a gap ten times larger. A sum of dot products follows the
    loud head (event 5); shares saturate at 1 per head, so the three agreeing heads win."""
    from vllm_episodic.kernels import event_mass, score_layer_events

    size, events = 16, 10
    reps = torch.zeros(1, events, 4, size)
    query = torch.zeros(1, 4, size)
    query[0, :, 0] = 4.0  # scaled logit = raw dot / 4 = rep value
    reps[0, 3, :3, 0] = 10.0
    reps[0, 5, 3, 0] = 100.0
    available = torch.full((events,), 8)
    dot = score_layer_events(query, reps, available)
    mass = event_mass(query[:, None], reps, available)
    assert int(dot.argmax()) == 5 and int(mass.argmax()) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_mass_equals_per_head_softmax_over_tokens(dtype):
    """Each event's share from every token's key: per query head and query a softmax over
    all tokens (head h reads KV head h // 3), summed per event, the largest over the
    queries, summed over heads — one head and query at a time in float64. More queries
    than one pass takes (group 16), events of ragged sizes, an event with no tokens."""
    from vllm_episodic.kernels import token_mass

    g = torch.Generator().manual_seed(0)
    m, heads, kv_heads, size, events = 20, 6, 2, 32, 9
    queries = 3 * torch.randn(m, heads, size, generator=g)
    counts = torch.tensor([5, 1, 30, 0, 12, 7, 2, 40, 3])
    owner = torch.arange(events).repeat_interleave(counts)
    keys = torch.randn(owner.numel(), kv_heads, size, generator=g).to(dtype)
    want = torch.zeros(events, dtype=torch.float64)
    for h in range(heads):
        best = torch.zeros(events, dtype=torch.float64)
        for j in range(m):
            query = queries[j, h].to(dtype).double()
            shares = (keys[:, h // 3].double() @ query / size**0.5).softmax(0)
            best = torch.maximum(best, torch.zeros(events, dtype=torch.float64).index_add_(0, owner, shares))
        want += best
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    seven_queries = 4 * kv_heads * owner.numel() * (heads // kv_heads) * 7
    # the engine calls it under inference mode, tests and benchmarks outside: its reused
    # workspace must serve both, in either order
    for inference, scratch in ((True, {}), (False, {"scratch_bytes": seven_queries}), (False, {}), (True, {})):
        with torch.inference_mode(inference):
            got = token_mass(queries, keys, owner, events, **scratch)
        torch.testing.assert_close(got.double(), want, atol=tolerance, rtol=tolerance)
        assert got[3] == 0
