"""The memory pipeline without vLLM: a simulated request against full attention.

A "paged cache" here is just the full K/V of every token (rotated at its position,
as vLLM stores them); the memory only reads the tokens it is allowed to.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_episodic.core.attention import attention
from vllm_episodic.core.memory import EpisodicMemory
from vllm_episodic.core.plan import OBSERVATION_QUERIES, BatchRow, Frame, ModelShape
from vllm_episodic.core.select import select_ahead, select_layer
from vllm_episodic.core.retrieval import Selection
from vllm_episodic.core.rope import Rope, rope_table
from vllm_episodic.metrics import Stats

LAYERS, HEADS, KV_HEADS, DIM = 2, 4, 2, 32
SCALE = DIM**-0.5


def settings(**overrides):
    values = dict(
        sink_tokens=8, window_tokens=64, retrieval_budget_tokens=4096, retrieval_interval=1, min_event_tokens=4,
        max_event_tokens=16, segmentation="surprise", surprise_gamma=0.5, surprise_window=32,
        contiguity_share=0.3, retrieval_scoring="mass", prefill_query_tokens=0, refinement=False,
        refinement_metric="modularity",
        representatives_per_event=2, representatives_dtype="float32", device_event_cache_tokens=8192,
        positions="exact", host_memory_gib=16.0, host_memory_policy="evict", full_memory_at_prompt_end=False,
        prompt_end_queries=0, bounded_budget_tokens=None,
    )
    values.update(overrides)
    return SimpleNamespace(**values)


class Sequence:
    """Random rotated q/k/v of one request, per layer."""

    def __init__(self, length, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.rope = Rope(rope_table(4096, DIM, 10000.0), DIM, True)
        pos = torch.arange(length)
        self.q = [self.rope.rotate(torch.randn(length, HEADS, DIM, generator=g), pos) for _ in range(LAYERS)]
        self.k = [self.rope.rotate(torch.randn(length, KV_HEADS, DIM, generator=g), pos) for _ in range(LAYERS)]
        self.v = [torch.randn(length, KV_HEADS, DIM, generator=g) for _ in range(LAYERS)]
        self.surprise = torch.rand(length, generator=g) * 4

    def read(self, plan, layers, start, end):
        """The runtime's reader: K/V ``[len(layers), end - start, kv_heads, dim]``."""
        return (torch.stack([self.k[i][start:end] for i in layers.tolist()]),
                torch.stack([self.v[i][start:end] for i in layers.tolist()]))

    def read_layer(self, layer, start, end):
        return self.k[layer][start:end], self.v[layer][start:end]

    def keep_query(self, request, position):
        """What a step ending at ``position`` keeps: every layer's query there."""
        request.keep_queries(torch.stack([q[position : position + 1] for q in self.q]), position)


BLOCK = 16


def run(seq, config, chunks, trained_len=4096, prompt=0):
    """Feed the request in chunks (reference mode; the first ``prompt`` tokens are its
    prompt); return every layer's attention output."""
    shape = ModelShape(LAYERS, HEADS, KV_HEADS, DIM, torch.float32, trained_len, BLOCK)
    memory = EpisodicMemory(config, shape, seq.rope, Stats(), reference=True)
    total = sum(chunks)
    outputs = [torch.zeros(total, HEADS, DIM) for _ in range(LAYERS)]
    done = 0
    for n in chunks:
        (plan,) = memory.plan_step([BatchRow("r", done, n, capacity=total, prompt_tokens=prompt)])
        plan.memory.record_surprise(0, seq.surprise[: done + n])
        for layer in range(LAYERS):
            q = seq.q[layer][done : done + n]
            if plan.mode == "reference":
                selection = plan.memory.attended_in_torch(layer, plan, q)
                assert plan.all_memory or int(selection.tokens.sum()) == plan.memory_tokens
                out = plan.memory.reference_attention(
                    layer, plan, q, selection, *seq.read_layer(layer, plan.local_start, done + n),
                    SCALE, seq.rope)
            else:
                assert plan.mode == "natural"
                out = attention(q, *seq.read_layer(layer, 0, done + n), SCALE,
                                torch.arange(done, done + n), torch.arange(done + n))
            outputs[layer][done : done + n] = out
            memory.record_queries(layer, q)
        memory.end_step([plan], seq.read)
        done += n
    return outputs, memory


def as_selection(*rows: dict[int, int]) -> Selection:
    """Rows given as ``{event: tokens}`` (the inverse of ``Selection.to_dicts``)."""
    width = max(map(len, rows))
    events = torch.full((len(rows), width), -1)
    tokens = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        events[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        tokens[i, : len(row)] = torch.tensor(list(row.values()), dtype=torch.long)
    return Selection.of(events, tokens)


def full_attention(seq, layer):
    n = seq.q[layer].shape[0]
    return attention(seq.q[layer], seq.k[layer], seq.v[layer], SCALE, torch.arange(n), torch.arange(n))


@pytest.mark.parametrize("chunks", [[300], [100, 1, 1, 50, 1, 1], [37] * 8 + [1] * 5], ids=["one", "mixed", "small"])
@pytest.mark.parametrize("segmentation", ["surprise", "fixed"])
def test_exact_positions_with_every_event_retrieved_equal_full_attention(chunks, segmentation):
    seq = Sequence(sum(chunks))
    outputs, memory = run(seq, settings(segmentation=segmentation), chunks)
    request = memory.requests["r"]
    assert request.store.num_events >= 4  # memory was really used
    for layer in range(LAYERS):
        torch.testing.assert_close(outputs[layer], full_attention(seq, layer), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("positions", ["exact"])
def test_the_chunk_that_ends_the_prompt_attends_all_of_memory(positions):
    """With ``full_memory_at_prompt_end`` the prompt's last chunk is full attention in
    the exact frame (the budget holds a fraction of memory); the chunks before it attend
    as without it (the decode steps after it add the question's scores to theirs)."""
    chunks, prompt = [100, 100, 100, 60, 1, 1, 1], 360
    seq = Sequence(sum(chunks))
    with_all, memory = run(seq, settings(retrieval_budget_tokens=64, positions=positions, full_memory_at_prompt_end=True),
                           chunks, prompt=prompt)
    without, _ = run(seq, settings(retrieval_budget_tokens=64, positions=positions), chunks, prompt=prompt)
    assert memory.requests["r"].store.num_events >= 10
    last, rest = slice(300, prompt), torch.arange(300)
    for layer in range(LAYERS):
        full = full_attention(seq, layer)
        assert not torch.allclose(without[layer][last], full[last], atol=1e-3)
        torch.testing.assert_close(with_all[layer][last], full[last], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(with_all[layer][rest], without[layer][rest])


def test_the_prompts_end_scores_every_memory_tokens_key_and_decode_keeps_those_scores():
    """``full_memory_at_prompt_end`` (here in the bounded frame): the chunk that ends the prompt
    ranks events by the attention its last ``prompt_end_queries`` queries give their
    tokens (a softmax over every memory token per head and query, each event's sum,
    per head the largest over the queries, summed over heads) — computed here from the
    sequence's own keys and queries; other chunks score representatives as before, and
    a decode step adds the question's scores to its own."""
    seq = Sequence(700)
    config = settings(retrieval_budget_tokens=64, positions="bounded", full_memory_at_prompt_end=True,
                      prompt_end_queries=8)
    _, memory = run(seq, config, [600], prompt=640)
    request = memory.requests["r"]
    (plan,) = memory.plan_step([BatchRow("r", 600, 40, capacity=700, prompt_tokens=640)])
    assert plan.frame == "bounded" and plan.scores_tokens and plan.everything is None
    assert plan.score_rows.tolist() == list(range(32, 40))
    available = plan.available
    for layer in range(LAYERS):
        got = request.score_chunk(layer, plan, seq.q[layer][600:640])[0]
        plain = seq.rope.rotate(seq.k[layer][:600], torch.arange(600), inverse=True).double()
        positions = torch.arange(632, 640)
        queries = seq.rope.rotate(seq.q[layer][632:640], config.window_tokens - positions).double()
        starts = request.store.starts[: available.numel()]
        want = torch.zeros(available.numel(), dtype=torch.float64)
        tokens = torch.cat([torch.arange(int(starts[e]), int(starts[e] + available[e]))
                            for e in range(available.numel())])
        for h in range(HEADS):
            shares = (queries[:, h] @ plain[tokens, h // (HEADS // KV_HEADS)].T * SCALE).softmax(-1)
            per_event = torch.stack([shares[:, (tokens >= starts[e]) & (tokens < starts[e] + available[e])].sum(1)
                                     for e in range(available.numel())], 1)
            want += per_event.amax(0)
        want = want.masked_fill(available == 0, float("-inf"))
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
        request._keep_question(layer, got.masked_fill(available == 0, 0.0))
    question = request.question.clone()
    # the decode step after the prompt: its own shares plus the question's
    _, full = run(seq, config, [600, 40], prompt=640)
    decoding = full.requests["r"]
    (step,) = full.plan_step([BatchRow("r", 640, 1, capacity=700, prompt_tokens=640)])
    seq.keep_query(decoding, 639)
    alone = decoding.question
    decoding.question = None
    own = decoding.score_ahead(step)
    decoding.question = alone
    both = decoding.score_ahead(step)
    width = question.shape[1]
    torch.testing.assert_close(both[:, :width], own[:, :width] + alone[:, :width])
    torch.testing.assert_close(alone[:, :width], question, atol=1e-5, rtol=1e-5)


def test_events_partition_the_tokens_that_left_the_window():
    seq = Sequence(400)
    _, memory = run(seq, settings(), [50] * 8)
    store = memory.requests["r"].store
    starts, ends = store.starts[: store.num_events], store.ends[: store.num_events]
    # sinks round up to a whole block (16 here)
    assert int(starts[0]) == 16 and torch.equal(starts[1:], ends[:-1])
    assert 400 - 64 - 16 < int(ends[-1]) <= 400 - 64
    # stored keys are un-rotated: rotating them back gives the cache's keys
    pos = torch.arange(0, int(ends[-1]))
    for layer in range(LAYERS):
        stored = store.gather(layer, pos)[0]
        torch.testing.assert_close(seq.rope.rotate(stored, pos), seq.k[layer][: int(ends[-1])], atol=1e-5, rtol=1e-5)


def test_bounded_positions_put_memory_at_an_anchor_window_tokens_back():
    seq = Sequence(300)
    outputs, memory = run(seq, settings(positions="bounded"), [250, 1, 1])
    request = memory.requests["r"]
    anchor = 250 - 64  # set when the first step with memory ran (query 250)
    assert request.anchor == anchor
    layer, t = 1, 251
    local = request.open_start // BLOCK * BLOCK
    unrotated = seq.rope.rotate(seq.k[layer][:local], torch.arange(local), inverse=True)
    # sinks before the longest run: the budget plus one event
    sink_k = seq.rope.rotate(unrotated[:16], torch.arange(16) + anchor - request.layout.max_memory - 16 - 16)
    # every event is retrieved, so memory is one run: its tokens in order, contiguous, the
    # last event (cut by the local part) ending at the anchor
    store = request.store
    last = max(e for e in range(store.num_events) if int(store.starts[e]) < local)
    target = anchor - (int(store.ends[last]) - 1 - torch.arange(16, local))
    mem_k = seq.rope.rotate(unrotated[16:], target)
    keys = torch.cat((sink_k, mem_k, seq.k[layer][local : t + 1]))
    values = seq.v[layer][: t + 1]
    expected = attention(seq.q[layer][t : t + 1], keys, values, SCALE)
    torch.testing.assert_close(outputs[layer][t : t + 1], expected, atol=2e-5, rtol=1e-4)


def test_consecutive_events_form_runs_in_the_bounded_frame():
    """Retrieved events that follow each other in the context (each whole but the last)
    are laid out contiguously, so text crossing an event boundary reads in order; a cut
    event or a gap starts a new run, and every run ends at the anchor."""
    seq = Sequence(400)
    _, memory = run(seq, settings(positions="bounded", retrieval_budget_tokens=64), [380])
    request = memory.requests["r"]
    store = request.store
    size = lambda e: int(store.ends[e]) - int(store.starts[e])  # noqa: E731
    # events 2, 3, 4 whole (one run), 6 cut (its own run), 7 and 8 whole (a run after 6's gap)
    selection = {2: size(2), 3: size(3), 4: size(4), 6: size(6) - 1, 7: size(7), 8: size(8)}
    end = lambda e: int(store.ends[e])  # noqa: E731
    run_end = {2: end(4), 3: end(4), 4: end(4), 6: end(6), 7: end(8), 8: end(8)}
    # another layer's events in the same call (1 whole, then 9 onwards) start no run of this one's
    total, other = sum(selection.values()) - size(1), {1: size(1)}
    for e in range(9, store.num_events):
        other[e] = min(size(e), total)
        total -= other[e]
        if total == 0:
            break
    for selections in ([selection], [other, selection]):
        codes = request.token_codes(as_selection(*selections), Frame.BOUNDED)[-1]
        position, back = codes // request.code_span, codes % request.code_span
        event = torch.searchsorted(store.ends[: store.num_events], position, right=True)
        assert torch.equal(back, torch.tensor([run_end[e] for e in event.tolist()]) - 1 - position)
    exact = request.token_codes(as_selection(selection), Frame.EXACT)[0]
    assert set((exact // request.code_span).tolist()) == {
        p for e, n in selection.items() for p in range(int(store.starts[e]), int(store.starts[e]) + n)}
    assert not (exact % request.code_span).any()
    # the rotation the keys get: a run's tokens sit at consecutive positions ending at the anchor
    anchor = 1000
    codes = request.token_codes(as_selection(selection), Frame.BOUNDED)[0]
    assert codes.numel() == sum(selection.values()) and codes.unique().numel() == codes.numel()
    got_k, _ = request.code_keys(0, codes, Frame.BOUNDED, anchor, seq.rope)
    first, last = int(store.starts[2]), end(4)
    in_run = (codes // request.code_span >= first) & (codes // request.code_span < last)
    positions = codes[in_run] // request.code_span
    unrotated = store.gather(0, positions)[0]
    want = seq.rope.rotate(unrotated, anchor - (last - 1 - positions))
    torch.testing.assert_close(got_k[in_run], want, atol=1e-5, rtol=1e-5)


def test_selection_fills_the_budget_exactly_before_the_local_part():
    seq = Sequence(700)
    config = settings(retrieval_budget_tokens=64, min_event_tokens=4, max_event_tokens=16)
    _, memory = run(seq, config, [600] + [1] * 10)
    request = memory.requests["r"]
    (plan,) = memory.plan_step([BatchRow("r", 610, 1, capacity=700)])
    assert plan.memory_tokens == 64 and plan.local_start % BLOCK == 0
    for layer in range(LAYERS):
        (chosen,) = request.select(layer, plan, seq.q[layer][610:611]).to_dicts()
        assert sum(chosen.values()) == 64
        for event, count in chosen.items():
            start = int(request.store.starts[event])
            assert 0 < count <= int(request.store.ends[event]) - start
            assert start + count <= plan.local_start
    assert memory.stats.get("events_retrieved") > 0
    memory.release(["r"])
    assert memory.requests == {} and memory.stats.get("host_bytes") == 0
    assert memory.stats.get("requests_tracked") == 0


def test_decode_steps_past_the_trained_length_attend_the_bounded_budget():
    """``bounded_budget_tokens``: with bounded positions a decode step selects (and
    attends) that many memory tokens, with exact ones ``retrieval_budget_tokens``; the
    contiguity share is of the step's own budget."""
    seq = Sequence(700)
    for positions, want in (("exact", 48), ("bounded", 96)):
        config = settings(retrieval_budget_tokens=48, bounded_budget_tokens=96, min_event_tokens=4,
                          max_event_tokens=16, positions=positions)
        _, memory = run(seq, config, [600, 1])
        request = memory.requests["r"]
        (plan,) = memory.plan_step([BatchRow("r", 601, 1, capacity=700)])
        assert plan.frame == positions and plan.memory_tokens == want
        for layer in range(LAYERS):
            (chosen,) = request.select(layer, plan, seq.q[layer][601:602]).to_dicts()
            assert sum(chosen.values()) == want
            # the contiguity queue holds its share of this step's budget, not of the largest
            queue = request.contiguity[layer]
            held = int(plan.available[queue[queue >= 0]].sum())
            assert 0 < held <= int(0.3 * want)


def test_prefill_chunk_scores_with_its_last_queries_when_asked():
    """prefill_query_tokens=k: a prefill chunk retrieves as its last k queries alone
    would, whatever the chunk's earlier queries point at."""
    seq = Sequence(700)
    chunk = slice(600, 640)
    # earlier queries of the chunk that would dominate its mean
    loud = seq.q[0][chunk].clone()
    loud[:-4] = 1000 * torch.randn(1, HEADS, DIM, generator=torch.Generator().manual_seed(3))
    # the same memory retrieving for the chunk's last 4 queries alone
    _, alone = run(seq, settings(retrieval_budget_tokens=64), [600])
    (own,) = alone.plan_step([BatchRow("r", 636, 4, capacity=700)])
    tail = alone.requests["r"].select(0, own, loud[-4:])
    for last in (0, 4):
        config = settings(retrieval_budget_tokens=64, prefill_query_tokens=last)
        _, memory = run(seq, config, [600])
        (plan,) = memory.plan_step([BatchRow("r", 600, 40, capacity=700)])
        assert plan.refresh and plan.everything is None
        chosen = memory.requests["r"].select(0, plan, loud)
        assert (chosen.to_dicts() == tail.to_dicts()) == (last == 4)


def test_retrieval_interval_keeps_a_layers_selection_between_retrievals():
    """With retrieval_interval=3 a prefill chunk and every third decode step (the first
    one included) retrieve; the steps between attend the same events, so the device
    cache needs no copy."""
    from vllm_episodic.core.event_cache import SlotTable

    seq = Sequence(700)
    config = settings(retrieval_budget_tokens=64, retrieval_interval=3)
    _, memory = run(seq, config, [600])
    request = memory.requests["r"]
    slots = SlotTable(LAYERS)
    fresh, previous = [], None
    for done in range(600, 607):
        (plan,) = memory.plan_step([BatchRow("r", done, 1, capacity=700)])
        retrieved = memory.stats.get("events_retrieved")
        chosen = request.select(0, plan, seq.q[0][done : done + 1])
        update = slots.update(torch.tensor([0]), request.token_codes(chosen, plan.frame), 64)
        fresh.append(plan.refresh)
        if not plan.refresh:
            assert chosen.to_dicts() == previous.to_dicts()
            assert update.misses == 0 and update.move_layer.numel() == 0
            assert memory.stats.get("events_retrieved") == retrieved
        previous = chosen
    assert fresh == [True, False, False, True, False, False, True]
    (plan,) = memory.plan_step([BatchRow("r", 607, 8, capacity=700)])
    assert plan.refresh  # a prefill chunk always retrieves


def test_decode_steps_between_retrievals_made_ahead_skip_the_layers_selection():
    """After a decode step that retrieved for every layer ahead of them, the steps up to
    the next retrieval are planned as selected ahead (the layers keep those selections,
    their slots already hold them); a layer retrieving on its own, a new anchor or the
    next retrieval ends that."""
    seq = Sequence(700)
    config = settings(retrieval_budget_tokens=64, retrieval_interval=3, positions="bounded")
    _, memory = run(seq, config, [600])
    request = memory.requests["r"]

    def step(done, ahead=True):
        (plan,) = memory.plan_step([BatchRow("r", done, 1, capacity=700)])
        if ahead and request.can_select_ahead(plan):
            select_ahead([plan])
        seq.keep_query(request, done)
        return plan

    plans = [step(done) for done in range(600, 609)]  # retrievals at 600, 603, 606
    assert [p.refresh for p in plans] == [False] * 9  # select_ahead spent each refresh
    assert [p.selected_ahead for p in plans] == [True] * 9
    retrieved = memory.stats.get("events_retrieved")
    for layer in range(LAYERS):
        kept = request.retained.row(layer).to_dicts()
        assert request.select(layer, plans[-1], seq.q[layer][608:609]).to_dicts() == kept
    assert memory.stats.get("events_retrieved") == retrieved  # kept, not retrieved again
    # a layer that retrieves on its own ends it until the next select_ahead
    plan = step(609, ahead=False)
    assert plan.refresh and not plan.selected_ahead
    select_layer(0, [(plan, seq.q[0][609:610])])
    assert [step(done).selected_ahead for done in (610, 611)] == [False, False]
    assert step(612).refresh is False and request.ahead_key is not None  # retrieved ahead again
    plan = step(613)
    assert plan.selected_ahead and not plan.refresh
    # a new anchor ends it too: that step retrieves anew (ahead of the layers)
    request.anchor -= 1000
    plan = step(614, ahead=False)
    assert plan.rewrite and plan.refresh and not plan.selected_ahead
    # memory that fits the budget is attended whole, not what was retained
    short = Sequence(200)
    _, whole = run(short, settings(retrieval_interval=3), [150])
    small = whole.requests["r"]
    (plan,) = whole.plan_step([BatchRow("r", 150, 1, capacity=200)])
    small.ahead_key = plan.selection_key
    everything = {e: n for e, n in enumerate(plan.available.tolist()) if n > 0}
    assert small.select(0, plan, short.q[0][150:151]).to_dicts() == [everything]
    assert small.ahead_key is None


def test_a_decode_step_that_moves_the_frame_retrieves_for_every_layer_ahead_of_them():
    """A new anchor invalidates every layer's kept selection: its decode step is a
    refresh, so it retrieves once for all layers before they run (not once per layer),
    and the retrieval interval counts from it."""
    seq = Sequence(700)
    config = settings(retrieval_budget_tokens=64, retrieval_interval=4, positions="bounded")
    _, memory = run(seq, config, [600])
    request = memory.requests["r"]
    refresh, rewrite, ahead = [], [], []
    for done in range(600, 610):
        if done == 602:
            request.anchor -= 1000  # as if the queries had drifted REANCHOR past it
        (plan,) = memory.plan_step([BatchRow("r", done, 1, capacity=700)])
        refresh.append(plan.refresh)
        rewrite.append(plan.rewrite)
        ahead.append(request.can_select_ahead(plan))
        if ahead[-1]:
            retrieved = memory.stats.get("events_retrieved")
            (chosen,) = select_ahead([plan])
            assert chosen.events.shape[0] == LAYERS
            assert memory.stats.get("events_retrieved") > retrieved
        seq.keep_query(request, done)
    assert rewrite[2] and not any(rewrite[3:])
    assert refresh == [True, False, True, False, False, False, True, False, False, False]
    assert ahead == refresh


def test_layers_whose_slots_hold_their_selection_are_skipped_until_a_new_frame():
    seq = Sequence(700)
    _, memory = run(seq, settings(retrieval_budget_tokens=64, positions="bounded"), [600])
    request = memory.requests["r"]
    (plan,) = memory.plan_step([BatchRow("r", 600, 1, capacity=700)])
    seq.keep_query(request, 599)
    (chosen,) = select_ahead([plan])
    layers = torch.arange(LAYERS)

    def unfilled(layers, selection) -> list[int]:
        return request.unfilled(torch.as_tensor(layers), selection).tolist()

    assert unfilled(layers, chosen) == layers.tolist()  # nothing known yet
    request.mark_filled(layers, chosen)
    assert unfilled(layers, chosen) == []
    # held selections are held whatever their padding; a changed row of layer 1 is not
    changed = chosen.with_rows(torch.tensor([1]), chosen.row(0))
    assert not bool(changed.same_rows(chosen)[1])
    assert unfilled(layers, changed.widened(chosen.events.shape[1] + 3)) == [1]
    assert unfilled([1], chosen.row(1)) == []
    request.mark_filled(torch.tensor([1]), changed.row(1))
    assert unfilled([1], chosen.row(1)) == [0] and unfilled([0], chosen.row(0)) == []
    # a new anchor moves every key: no layer's slots are known to hold anything
    request.anchor -= 1000
    (plan,) = memory.plan_step([BatchRow("r", 601, 1, capacity=700)])
    assert plan.rewrite and unfilled(layers, chosen) == layers.tolist()


def test_host_memory_cap_evicts_least_recently_retrieved_pages():
    seq = Sequence(1200)
    page_bytes = 2 * LAYERS * KV_HEADS * 4096 * DIM * 4
    # room for two pages (plus representatives): the third forces an eviction
    config = settings(host_memory_gib=(2.2 * page_bytes) / (1 << 30), retrieval_budget_tokens=64)
    shape = ModelShape(LAYERS, HEADS, KV_HEADS, DIM, torch.float32, 4096, BLOCK)
    memory = EpisodicMemory(config, shape, seq.rope, Stats(), reference=True)
    from vllm_episodic.core import store as store_module

    original = store_module.HostStore.__init__

    def small_pages(self, *args, **kwargs):  # 256-token pages keep the test small
        original(self, *args, page_tokens=256, **kwargs)

    store_module.HostStore.__init__ = small_pages
    try:
        page_bytes = 2 * LAYERS * KV_HEADS * 256 * DIM * 4
        memory.settings.host_memory_gib = (2.5 * page_bytes) / (1 << 30)
        done = 0
        for n in [300, 300, 300, 300]:
            (plan,) = memory.plan_step([BatchRow("r", done, n, capacity=1200)])
            plan.memory.record_surprise(0, seq.surprise[: done + n])
            memory.end_step([plan], seq.read)
            done += n
    finally:
        store_module.HostStore.__init__ = original
    store = memory.requests["r"].store
    assert memory.host_bytes() <= 2.5 * page_bytes
    assert memory.stats.get("events_evicted") > 0
    assert store.keys[0] is not None  # the sinks' page stays
    dead = ~store.alive[: store.num_events]
    assert dead.any() and store.alive[: store.num_events].any()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_representatives_dtype_sets_their_bytes(dtype):
    """Representatives are held in the configured dtype and counted exactly in the
    host bytes: every held page of K/V plus every event's representatives."""
    seq = Sequence(300)
    _, memory = run(seq, settings(representatives_dtype=dtype, retrieval_budget_tokens=64), [100, 100, 100])
    store = memory.requests["r"].store
    assert store.reps.dtype == getattr(torch, dtype) and store.num_events > 0
    pages = sum(page is not None for page in store.keys)
    page_bytes = 2 * LAYERS * KV_HEADS * store.page_tokens * DIM * 4  # float32 K/V here
    rep_bytes = LAYERS * HEADS * DIM * (4 if dtype == "float32" else 2)
    assert store.nbytes == memory.host_bytes() == pages * page_bytes + store.num_events * rep_bytes


def test_float16_representatives_saturate_instead_of_overflowing():
    from vllm_episodic.core.store import HostStore

    store = HostStore(2, HEADS, KV_HEADS, DIM, torch.float32, page_tokens=64, reps_dtype=torch.float16)
    store.add_events([(0, 10), (10, 20)])
    huge = torch.full((2, 2, HEADS, DIM), 1e6)
    huge[:, 1] = -1e6
    store.set_reps(slice(None), torch.arange(2), huge)
    largest = torch.finfo(torch.float16).max
    assert (store.reps[:, 0] == largest).all() and (store.reps[:, 1] == -largest).all()


def test_store_gathers_tokens_of_several_layers_at_once():
    """The host store's gather with a layer per token equals per-layer gathers, across pages."""
    from vllm_episodic.core.store import HostStore

    g = torch.Generator().manual_seed(3)
    store = HostStore(3, HEADS, KV_HEADS, DIM, torch.bfloat16, page_tokens=64)
    keys = torch.randn(3, KV_HEADS, 200, DIM, generator=g).bfloat16()
    values = torch.randn(3, KV_HEADS, 200, DIM, generator=g).bfloat16()
    for layer in range(3):
        store.write(layer, 0, keys[layer], values[layer])
    positions = torch.randint(0, 200, (90,), generator=g)
    layers = torch.randint(0, 3, (90,), generator=g)
    got_k, got_v = store.gather(layers, positions)
    for i in range(90):
        one_k, one_v = store.gather(int(layers[i]), positions[i : i + 1])
        assert torch.equal(got_k[i], one_k[0]) and torch.equal(got_v[i], one_v[0])
        assert torch.equal(got_k[i], keys[layers[i], :, positions[i]])
        assert torch.equal(got_v[i], values[layers[i], :, positions[i]])


def test_retrieving_an_event_longer_than_a_page_marks_every_page_it_spans():
    """Eviction drops least recently retrieved pages first: an event of 40 tokens on
    16-token pages spans three, and retrieving it keeps all three."""
    from vllm_episodic.core.store import HostStore

    store = HostStore(1, KV_HEADS, KV_HEADS, DIM, torch.float32, page_tokens=16)
    zeros = torch.zeros(1, KV_HEADS, 80, DIM)
    store.write(slice(None), 0, zeros, zeros)
    store.add_events([(0, 8), (8, 48), (48, 80)])
    store.touch([1], step=7)
    assert store.page_last_use.tolist() == [7, 7, 7, 0, 0]
    assert store.evictable_pages(protected=0) == [3, 4, 0, 1, 2]


def test_store_reads_consecutive_tokens_as_written():
    """A run of consecutive tokens (all of memory, read at the prompt's end) comes back
    as written, across page boundaries and from a page shared with another store, in
    the order of the positions — as scattered positions do."""
    from vllm_episodic.core.store import HostStore

    g = torch.Generator().manual_seed(4)
    store = HostStore(2, HEADS, KV_HEADS, DIM, torch.bfloat16, page_tokens=64)
    keys = torch.randn(2, KV_HEADS, 300, DIM, generator=g).bfloat16()
    values = torch.randn(2, KV_HEADS, 300, DIM, generator=g).bfloat16()
    store.write(slice(None), 0, keys, values)
    child = store.shared_prefix(0, 300)
    for start, end in ((0, 300), (10, 12), (60, 70), (63, 129), (128, 192)):
        positions = torch.arange(start, end)
        for which in (store, child):
            got_k, got_v = which.gather(1, positions)
            assert got_k.shape == (end - start, KV_HEADS, DIM) and got_k.is_contiguous()
            assert torch.equal(got_k, keys[1, :, start:end].transpose(0, 1))
            assert torch.equal(got_v, values[1, :, start:end].transpose(0, 1))
    reordered = torch.tensor([4, 6, 5, 7])  # first to last spans 4, not in order: the indexed path
    assert torch.equal(store.gather(0, reordered)[0], keys[0, :, reordered].transpose(0, 1))


def test_each_row_keeps_its_latest_queries_of_every_layer_from_one_gather_per_layer():
    """The layers hand the whole batch's queries over once each (record_queries); at the
    end of the step every observing row keeps, for every layer, its latest
    OBSERVATION_QUERIES queries (the ring) and its last query with its position."""
    memory = EpisodicMemory(settings(), ModelShape(LAYERS, HEADS, KV_HEADS, DIM, torch.float32, 4096, BLOCK),
                            Sequence(1).rope, Stats())
    history = {"a": [[] for _ in range(LAYERS)], "b": [[] for _ in range(LAYERS)]}
    g = torch.Generator().manual_seed(3)

    def step(rows, layers=range(LAYERS)):
        plans = memory.plan_step([BatchRow(name, done, n, capacity=500) for name, done, n in rows])
        total = sum(n for *_, n in rows)
        for layer in layers:
            q = torch.randn(total, HEADS, DIM, generator=g)
            memory.record_queries(layer, q)
            for plan in plans:
                history[plan.memory.req_id][layer] += list(q[plan.query_rows])
        memory.end_step(plans, None)
        return plans

    step([("a", 0, 50), ("b", 0, 40)])
    step([("a", 50, 1), ("b", 40, 20)])
    for i in range(3):
        step([("b", 60 + i, 1), ("a", 51 + i, 1)])  # the rows swap places
    for name, last in (("a", 53), ("b", 62)):
        request = memory.requests[name]
        assert request.observed == OBSERVATION_QUERIES and request.last_query_position == last
        for layer in range(LAYERS):
            ring = {tuple(row.flatten().tolist()) for row in request.observations[layer]}
            want = {tuple(row.flatten().tolist()) for row in history[name][layer][-OBSERVATION_QUERIES:]}
            assert ring == want
            assert torch.equal(request.last_queries[layer], history[name][layer][-1])
    # a step not every layer recorded keeps nothing
    before = memory.requests["a"].observations.clone()
    step([("a", 54, 1)], layers=[0])
    assert torch.equal(memory.requests["a"].observations, before)
    assert memory.requests["a"].last_query_position == 53


def test_decode_retrieval_ahead_of_the_layers_equals_each_layers_own_retrieval():
    """A decode step that retrieves selects for every layer before the layers run, from
    each layer's query of the previous token: the same selections as each layer retrieving
    with that query, and the layers then attend them without retrieving again."""
    seq = Sequence(700)
    config = settings(retrieval_budget_tokens=64, positions="bounded")
    _, ahead = run(seq, config, [600, 1])
    _, alone = run(seq, config, [600, 1])
    (plan,) = ahead.plan_step([BatchRow("r", 601, 1, capacity=700)])
    request = ahead.requests["r"]
    # the step at 600 kept every layer's query (run() records them as the backend does)
    assert plan.mode == "reference" and request.can_select_ahead(plan)
    (selections,) = select_ahead([plan])
    assert plan.selected_ahead and not plan.refresh
    (own,) = alone.plan_step([BatchRow("r", 601, 1, capacity=700)])
    # the previous token's query, seen from memory as select() sees the step's own query
    own.score_rows = torch.tensor([0])
    own.score_angles = seq.rope.angles(torch.tensor([config.window_tokens - 600]))
    for layer in range(LAYERS):
        want = alone.requests["r"].select(layer, own, seq.q[layer][600:601]).to_dicts()
        assert selections.row(layer).to_dicts() == want and sum(want[0].values()) == 64
        assert request.select(layer, plan, seq.q[layer][601:602]).to_dicts() == want
    assert ahead.stats.get("events_retrieved") == alone.stats.get("events_retrieved")
    # without the previous token's queries (here: a stale position) each layer retrieves itself
    (later,) = ahead.plan_step([BatchRow("r", 602, 1, capacity=700)])
    assert not request.can_select_ahead(later)


def test_decode_retrieval_of_several_requests_in_one_call_equals_each_alone():
    """Decode rows of requests of different lengths retrieve in one call (one row per
    request and layer): each gets the selections and contiguity queues it gets alone,
    over several retrievals."""
    config = settings(retrieval_budget_tokens=96, positions="bounded")
    lengths = (600, 450)
    sequences = [Sequence(700, seed=seed) for seed in (1, 2)]
    batched = [run(seq, config, [n])[1] for seq, n in zip(sequences, lengths)]
    alone = [run(seq, config, [n])[1] for seq, n in zip(sequences, lengths)]
    assert batched[0].requests["r"].store.num_events != batched[1].requests["r"].store.num_events
    for step in range(3):
        plans = {}
        for name, memories in (("batched", batched), ("alone", alone)):
            plans[name] = []
            for memory, seq, n in zip(memories, sequences, lengths):
                position = n + step
                (plan,) = memory.plan_step([BatchRow("r", position, 1, capacity=700)])
                seq.keep_query(memory.requests["r"], position - 1)
                assert memory.requests["r"].can_select_ahead(plan)
                plans[name].append(plan)
        together = select_ahead(plans["batched"])
        for plan, got in zip(plans["alone"], together):
            (want,) = select_ahead([plan])
            assert got.to_dicts() == want.to_dicts() and bool((got.tokens.sum(1) == 96).all())
        for a, b in zip(batched, alone):
            queues = [[[e for e in row if e >= 0] for row in m.requests["r"].contiguity.tolist()] for m in (a, b)]
            assert queues[0] == queues[1] and any(queues[0])


def test_prefill_chunks_of_several_requests_retrieve_in_one_call_per_layer():
    """A layer's retrieval for the prefill chunks of several requests in one call (each
    with its own queries) chooses what each request's own call chooses."""
    config = settings(retrieval_budget_tokens=96, positions="bounded")
    sequences = [Sequence(700, seed=seed) for seed in (3, 4)]
    lengths = (560, 420)
    batched = [run(seq, config, [n])[1] for seq, n in zip(sequences, lengths)]
    alone = [run(seq, config, [n])[1] for seq, n in zip(sequences, lengths)]
    for step in range(2):
        plans = {name: [memory.plan_step([BatchRow("r", n + 40 * step, 40, capacity=700)])[0]
                        for memory, n in zip(memories, lengths)]
                 for name, memories in (("batched", batched), ("alone", alone))}
        assert all(plan.mode == "reference" and plan.refresh for plan in plans["batched"])
        for layer in range(LAYERS):
            queries = [seq.q[layer][plan.num_computed : plan.end] for seq, plan in zip(sequences, plans["alone"])]
            together = select_layer(layer, list(zip(plans["batched"], queries)))
            for plan, query, got in zip(plans["alone"], queries, together):
                want = plan.memory.select(layer, plan, query)
                assert got.to_dicts() == want.to_dicts() and int(got.tokens.sum()) == 96


def test_code_keys_of_several_layers_in_one_gather():
    seq = Sequence(700)
    _, memory = run(seq, settings(retrieval_budget_tokens=64, positions="bounded"), [600])
    request = memory.requests["r"]
    store, span = request.store, request.code_span
    codes = torch.tensor([int(store.starts[1]) * span, (int(store.starts[3]) + 1) * span + 7,
                          int(store.starts[2]) * span + 3])
    layers = torch.tensor([1, 0, 1])
    keys, values = request.code_keys(layers, codes, Frame.BOUNDED, 500, seq.rope)
    for i, layer in enumerate(layers.tolist()):
        k, v = request.code_keys(layer, codes[i : i + 1], Frame.BOUNDED, 500, seq.rope)
        torch.testing.assert_close(keys[i : i + 1], k)
        torch.testing.assert_close(values[i : i + 1], v)
    # a code's remainder says how far before the anchor the key is rotated to
    unrotated = store.gather(0, codes[1:2] // span)[0]
    torch.testing.assert_close(keys[1:2], seq.rope.rotate(unrotated, torch.tensor([500 - 7])), atol=1e-5, rtol=1e-5)


def test_decode_retrieval_scores_with_the_queries_since_the_last_one():
    """``mass`` scoring at a decode retrieval (every third step): the event shares of the
    three latest queries, each seen from memory ``window`` tokens away (per head the
    largest of the three) —
    computed here from the sequence's own queries and the store's representatives."""
    seq = Sequence(700)
    config = settings(retrieval_budget_tokens=64, retrieval_interval=3)
    _, memory = run(seq, config, [600, 1, 1, 1])
    request = memory.requests["r"]
    (plan,) = memory.plan_step([BatchRow("r", 603, 1, capacity=700)])
    assert plan.refresh and plan.everything is None and request.can_select_ahead(plan)
    got = request.score_ahead(plan)
    available = plan.available
    reps = request.store.reps[:, : available.numel()].double()
    for layer in range(LAYERS):
        positions = torch.tensor([600, 601, 602])
        queries = seq.rope.rotate(seq.q[layer][600:603], config.window_tokens - positions).double()
        logits = torch.einsum("mhd,ehd->hme", queries, reps[layer]) * SCALE + available.double().log()
        logits = logits.masked_fill(available == 0, float("-inf"))
        want = logits.softmax(-1).amax(1).sum(0)
        torch.testing.assert_close(got[layer].double(), want.masked_fill(available == 0, float("-inf")),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("last", [0, 120])
def test_a_long_prefill_chunk_scores_with_its_end_and_queries_spread_over_it(last):
    """``mass`` scores a chunk with at most 64 of its queries: its last 16 (a prompt's
    question) and the rest evenly spread over the chunk (or its last ``prefill_query_tokens``)."""
    seq = Sequence(900)
    _, memory = run(seq, settings(retrieval_budget_tokens=64, prefill_query_tokens=last), [600])
    (plan,) = memory.plan_step([BatchRow("r", 600, 200, capacity=900)])
    rows = plan.score_rows.tolist()
    first = 200 - last if last else 0
    assert len(rows) == 64 == len(set(rows)) and rows == sorted(rows)
    assert rows[-16:] == list(range(184, 200)) and rows[0] == first
    gaps = torch.diff(torch.tensor(rows[:48]))
    assert int(gaps.max()) - int(gaps.min()) <= 1


@pytest.mark.parametrize("queries, chunks, want", [
    (60, [(0, 560), (560, 40), (600, 40)], [0, 20, 40]),   # the question spans two chunks: both get their part
    (8, [(0, 560), (560, 40), (600, 40)], [0, 0, 8]),
    (0, [(0, 560), (560, 40), (600, 40)], [0, 0, 40]),     # 0: the chunk that ends the prompt, whole
])
def test_the_prompts_last_tokens_are_its_end_in_whichever_chunk_they_fall(queries, chunks, want):
    shape = ModelShape(LAYERS, HEADS, KV_HEADS, DIM, torch.float32, 4096, BLOCK)
    memory = EpisodicMemory(settings(prompt_end_queries=queries), shape, Sequence(8).rope, Stats())
    got = [memory.plan_step([BatchRow("r", done, n, capacity=700, prompt_tokens=640)])[0].prompt_end
           for done, n in chunks]
    assert got == want
    (decode,) = memory.plan_step([BatchRow("r", 640, 1, capacity=700, prompt_tokens=640)])
    assert decode.prompt_end == 0
