"""Kept memories without vLLM: a request attached to a finished request's memory at
token h holds what a request that ran to h holds (events, representatives, host K/V),
its store shares the kept pages until it writes, and shared pages count once."""

from __future__ import annotations

import pytest
import torch

from test_memory import BLOCK, DIM, KV_HEADS, LAYERS, Sequence, run, settings
from vllm_episodic.core.kept import kept_tokens, tensor_bytes
from vllm_episodic.core.plan import BatchRow
from vllm_episodic.core.store import HostStore, held_bytes


def _keep(memory, seq, req_id="r", kept_id="k"):
    """Keep a request of the simulated run (its "paged cache" is the sequence)."""
    n = memory.requests[req_id].num_tokens
    memory.keep(req_id, kept_id, torch.arange(n) % 97,
                lambda _, start, end: seq.read(None, torch.arange(LAYERS), start, end))


@pytest.mark.parametrize("h, reps, chunks", [
    (128, 0, [100, 28]), (272, 0, [100, 172]), (400, 0, [100, 100, 200]), (400, 2, [300, *[1] * 100]),
], ids=["before-any-event", "mid-prompt", "decode", "decode-observed-reps"])
def test_attached_memory_is_the_memory_of_a_run_that_stopped_there(h, reps, chunks):
    """Reference: the same request run to h alone. Mean-key representatives depend only
    on an event's keys and segmentation not on chunking, so that run may chunk the
    prompt differently; observed representatives (r > 0) depend on the queries before
    the step that closed the event, so it repeats the builder's steps. Events,
    representatives and host K/V: bitwise."""
    seq = Sequence(420)
    config = settings(representatives_per_event=reps)
    _, reference = run(seq, config, chunks)
    _, builder = run(seq, config, [300, *[1] * 120])
    _keep(builder, seq)
    attached = builder.attach(BatchRow("a", h, 1, capacity=420), "k", next_token=h % 97)
    want = reference.requests["r"]
    assert attached.num_tokens == h and attached.open_start == want.open_start
    assert torch.equal(attached.surprise[:h], want.surprise[:h])
    assert attached.surprise[h] == builder.kept.get("k").surprise[h]  # the kept request saw token h
    if want.store is None:
        assert attached.store is None
        return
    store, ref = attached.store, want.store
    k = ref.num_events
    assert store.num_events == k > 0
    for name in ("starts", "ends", "alive"):
        assert torch.equal(getattr(store, name)[:k], getattr(ref, name)[:k])
    assert torch.equal(store.reps[:, :k], ref.reps[:, :k])
    held = torch.arange(want.open_start)
    for layer in range(LAYERS):
        for got, expected in zip(store.gather(layer, held), ref.gather(layer, held)):
            assert torch.equal(got, expected)


def test_a_memory_attached_at_the_kept_end_takes_the_next_token_s_surprise_from_the_kept_logits():
    """Attached where the kept request stopped, the new request's first token was never
    seen: its surprise comes from the logits the kept request would have sampled it
    from, recorded by the request's first step (as every step records its first token's
    from the logits kept at the step before; with pipeline parallel, on the last stage,
    which sends it to the others)."""
    from types import SimpleNamespace

    from vllm_episodic.integration.pipeline import record_step_surprise, step_surprise

    seq = Sequence(420)
    _, builder = run(seq, settings(), [300, *[1] * 99])
    logits = torch.randn(1, 97, generator=torch.Generator().manual_seed(0))
    builder.requests["r"].carry_logits = logits
    _keep(builder, seq)
    h = builder.kept.get("k").num_tokens
    attached = builder.attach(BatchRow("a", h, 3, capacity=420), "k", next_token=5)
    assert attached.carry_logits is logits
    plan = SimpleNamespace(memory=attached, first_query=0, num_scheduled=3, num_computed=h)
    record_step_surprise([plan], step_surprise([plan], torch.tensor([5, 6, 7]), torch.zeros(3, 4),
                                               lambda hidden: torch.zeros(hidden.shape[0], 97)))
    assert attached.surprise[h] == -torch.log_softmax(logits[0], 0)[5]
    assert torch.allclose(attached.surprise[h + 1 : h + 3], torch.full((2,), 97.0).log())  # uniform logits
    assert attached.carry_logits is None


def test_attached_stores_share_the_kept_pages_until_they_write():
    seq = Sequence(420)
    _, memory = run(seq, settings(), [400])
    _keep(memory, seq)
    kept = memory.kept.get("k").store
    # bits, not values: a page's unwritten tail is uninitialised memory (NaN != NaN)
    before = [page.clone().view(torch.int32) for page in kept.keys if page is not None]
    a = memory.attach(BatchRow("a", 384, 1, capacity=600), "k", None)
    b = memory.attach(BatchRow("b", 384, 1, capacity=600), "k", None)
    # two attached requests add nothing but their event bounds and representatives
    reps = sum(m.store.num_events * m.store.event_bytes() for m in (a, b))
    assert memory.host_bytes() == memory.kept.nbytes() + reps
    # tokens before the attach point are the kept memory's: storing them again (the
    # window the request restored, its bits rounded by the rotations) writes nothing
    assert a.store.inherited == min(384, kept.end_token) == a.store.end_token
    a.store.write(slice(None), 16, torch.ones(LAYERS, KV_HEADS, 10, DIM), torch.ones(LAYERS, KV_HEADS, 10, DIM))
    assert a.store.keys[0] is kept.keys[0]
    # a write of its own goes to a copy of the page: the kept memory and the other
    # request keep theirs
    start = a.store.inherited
    a.store.write(slice(None), start, torch.ones(LAYERS, KV_HEADS, 4, DIM), torch.ones(LAYERS, KV_HEADS, 4, DIM))
    assert all(torch.equal(x, y.view(torch.int32)) for x, y in zip(before, (p for p in kept.keys if p is not None)))
    page = start // kept.page_tokens
    assert b.store.keys[page] is kept.keys[page] and a.store.keys[page] is not kept.keys[page]
    assert memory.host_bytes() == memory.kept.nbytes() + reps + a.store.page_bytes()
    # dropping the kept memory leaves the attached requests their pages
    memory.drop_kept(["k"])
    assert len(memory.kept) == 0
    assert torch.equal(b.store.gather(0, torch.arange(100))[0], kept.gather(0, torch.arange(100))[0])


def test_kept_tokens_are_the_paged_caches_keys():
    """What the engine restores into an attached request's blocks: the tail exactly as
    the cache held it, stored tokens rotated back to their positions."""
    seq = Sequence(420)
    _, memory = run(seq, settings(), [400])
    _keep(memory, seq)
    kept = memory.kept.get("k")
    assert 0 < kept.tail_start < 400
    keys, values = kept_tokens(kept, seq.rope, 0, 400)
    for layer in range(LAYERS):
        tail = slice(kept.tail_start, 400)
        assert torch.equal(keys[layer, tail], seq.k[layer][tail]) and torch.equal(values[layer, tail], seq.v[layer][tail])
        torch.testing.assert_close(keys[layer], seq.k[layer][:400], atol=1e-5, rtol=1e-5)
        assert torch.equal(values[layer], seq.v[layer][:400])


def test_a_request_cannot_start_past_token_zero_without_a_kept_memory():
    seq = Sequence(200)
    _, memory = run(seq, settings(), [100])
    with pytest.raises(ValueError, match="without a kept memory"):
        memory.plan_step([BatchRow("new", 128, 10, capacity=200)])


def test_inherited_tokens_past_the_last_event_are_held_across_a_page_boundary():
    """The events of an attached store may end on one page (14) while its inherited
    tokens (20) reach into the next: both pages are shared, the inherited tokens read as
    the kept store's and storing them again copies nothing; a token of its own copies
    only the page it lands on."""
    store = HostStore(LAYERS, KV_HEADS, KV_HEADS, DIM, torch.float32, page_tokens=BLOCK)
    store.add_events([(0, 14), (14, 30)])
    store.write(slice(None), 0, torch.randn(LAYERS, KV_HEADS, 30, DIM), torch.randn(LAYERS, KV_HEADS, 30, DIM))
    prefix = store.shared_prefix(1, 14, inherited=20)
    same = lambda: [id(p) for p in prefix.held_pages()] == [id(p) for p in store.held_pages()]  # noqa: E731
    assert prefix.end_token == 20 and len(store.held_pages()) == 2 and same()
    prefix.write(slice(None), 14, torch.zeros(LAYERS, KV_HEADS, 6, DIM), torch.zeros(LAYERS, KV_HEADS, 6, DIM))
    for got, want in zip(prefix.gather(1, torch.arange(20)), store.gather(1, torch.arange(20))):
        assert torch.equal(got, want)
    assert same()
    prefix.write(slice(None), 20, torch.zeros(LAYERS, KV_HEADS, 2, DIM), torch.zeros(LAYERS, KV_HEADS, 2, DIM))
    assert prefix.keys[0] is store.keys[0] and prefix.keys[1] is not store.keys[1]
    assert torch.equal(prefix.gather(0, torch.arange(16, 22))[0][:4], store.gather(0, torch.arange(16, 20))[0])


def test_shared_prefix_counts_pages_once():
    store = HostStore(LAYERS, KV_HEADS, KV_HEADS, DIM, torch.float32, page_tokens=BLOCK)
    store.add_events([(0, 16), (16, 40)])
    store.write(slice(None), 0, torch.randn(LAYERS, KV_HEADS, 40, DIM), torch.randn(LAYERS, KV_HEADS, 40, DIM))
    prefix = store.shared_prefix(1, 16)
    assert prefix.num_events == 1 and prefix.end_token == 16 and len(prefix.held_pages()) == 1
    assert held_bytes([store, prefix]) == store.nbytes + prefix.num_events * prefix.event_bytes()


def test_kept_memories_yield_to_live_requests(monkeypatch):
    """The scheduler's index: once the running requests' bytes and the kept memories'
    exceed the host cap, the least recently used kept memories go (not one a request
    is about to attach to); a running request's bytes leave out the pages it shares
    with the kept memory it attached to, while that one is kept. (Pages of 1024 tokens
    here, four times the local part, whatever the store's page size.)"""
    from vllm_episodic.integration import prefix_reuse
    from vllm_episodic.integration.prefix_reuse import KeptIndex

    PAGE = 1024
    monkeypatch.setattr(prefix_reuse, "PAGE_TOKENS", PAGE)

    index = KeptIndex(block_size=128, cap_bytes=100 * PAGE, bytes_per_token=1, local_tokens=256,
                      host_cap_bytes=10 * PAGE)
    for k, name in enumerate("abc"):
        index.register(name, [k] * (PAGE + 256))
    index.take_ops(set(), set())  # the worker kept them
    assert index.nbytes == 3 * (PAGE + 256)
    assert index.lookup("next", [1] * (PAGE + 300)) == PAGE + 256  # pins b, now most recent
    index.yield_to_live(7 * PAGE)
    assert list(index.entries) == ["c", "b"] and index.take_ops(set(), {"next"}).drop == ["a"]
    index.yield_to_live(9 * PAGE)
    assert list(index.entries) == ["b"]  # pinned: b stays although it does not fit
    index.attached["r"] = ("b", 2 * PAGE + 100)
    assert index.live_bytes("r", 3 * PAGE + 256) == PAGE  # two of its three pages are b's
    index.found.clear()
    index.yield_to_live(10 * PAGE)
    assert not index.entries and index.live_bytes("r", 3 * PAGE + 256) == 3 * PAGE


def _step(memory, seq, req_id, done, n):
    """One step of ``n`` tokens of request ``req_id`` in the simulated run (reference path)."""
    (plan,) = memory.plan_step([BatchRow(req_id, done, n, capacity=seq.k[0].shape[0])])
    plan.memory.record_surprise(done, seq.surprise[done : done + n])
    for layer in range(LAYERS):
        q = seq.q[layer][done : done + n]
        selection = plan.memory.attended_in_torch(layer, plan, q)
        plan.memory.reference_attention(layer, plan, q, selection,
                                        *seq.read_layer(layer, plan.local_start, done + n), 1.0, seq.rope)
        memory.record_queries(layer, q)
    memory.end_step([plan], seq.read)


def _storages(kept) -> set[int]:
    return {t.untyped_storage().data_ptr() for part in kept.tail for t in (part.keys, part.values)}


def test_memories_kept_from_requests_on_one_kept_memory_share_its_tail():
    """Four requests attach to one kept memory at token 384 and run to 400, then are kept
    themselves: their tails are the first one's tail (the same storage) where their
    tokens are the same bits and copies of their own tokens only; kept bytes count the
    shared tail once; what each restores is still its paged cache's keys."""
    seq = Sequence(420)
    _, memory = run(seq, settings(), [400])
    _keep(memory, seq)
    parent = memory.kept.get("k")
    alone = tensor_bytes(parent.tensors())
    for i in range(4):
        memory.attach(BatchRow(f"a{i}", 384, 16, capacity=420), "k", next_token=384 % 97)
        _step(memory, seq, f"a{i}", 384, 16)
        _keep(memory, seq, req_id=f"a{i}", kept_id=f"k{i}")
    for i in range(4):
        kept = memory.kept.get(f"k{i}")
        shared = [part for part in kept.tail if part.keys.untyped_storage().data_ptr() in _storages(parent)]
        own = [part for part in kept.tail if part not in shared]
        assert shared and shared[0].start == kept.tail_start and shared[-1].end == 384
        assert [(p.start, p.end) for p in own] == [(384, 400)]
        keys, values = kept_tokens(kept, seq.rope, kept.tail_start, 400)
        for layer in range(LAYERS):
            assert torch.equal(keys[layer], seq.k[layer][kept.tail_start : 400])
            assert torch.equal(values[layer], seq.v[layer][kept.tail_start : 400])
    own_bytes = 2 * LAYERS * 16 * KV_HEADS * DIM * 4  # each child's 16 own tokens, float32
    others = [t for i in range(4) for t in memory.kept.get(f"k{i}").tensors()
              if t.untyped_storage().data_ptr() not in _storages(parent)]
    assert tensor_bytes(memory.kept.tensors()) == alone + tensor_bytes(others)
    assert tensor_bytes(others) < 4 * (own_bytes + 2 * 420 * 8)  # + surprise and token ids
    # the scheduler's estimate of a child's bytes (its local part as long as the
    # parent's tail here) counts its own tail tokens only, not the part its parent holds
    from vllm_episodic.integration.prefix_reuse import KeptIndex

    index = KeptIndex(block_size=BLOCK, cap_bytes=1 << 40, bytes_per_token=own_bytes // 16,
                      local_tokens=400 - parent.tail_start)
    assert index._estimate(400, 0) == (400 - parent.tail_start) * own_bytes // 16 + index._page_bytes(parent.tail_start)
    assert index._estimate(400, 384, 400) == own_bytes


def test_a_kept_tail_that_differs_from_its_parents_is_copied():
    """Where the request's paged cache no longer holds the parent's bits, nothing is
    shared: the kept tail is what the cache held."""
    seq = Sequence(420)
    _, memory = run(seq, settings(), [400])
    _keep(memory, seq)
    parent = memory.kept.get("k")
    memory.attach(BatchRow("a", 384, 16, capacity=420), "k", next_token=384 % 97)
    _step(memory, seq, "a", 384, 16)

    def read_changed(_, start, end):
        keys, values = seq.read(None, torch.arange(LAYERS), start, end)
        return keys + 1.0, values

    memory.keep("a", "k2", torch.arange(400) % 97, read_changed)
    kept = memory.kept.get("k2")
    assert not _storages(kept) & _storages(parent)
    keys, _ = kept_tokens(kept, seq.rope, kept.tail_start, 400)
    assert torch.equal(keys[0], seq.k[0][kept.tail_start : 400] + 1.0)


def test_a_dropped_kept_memory_does_not_live_on_in_the_requests_attached_to_it():
    """The scheduler drops a kept memory while a request is attached: nothing but the
    pages that request shares stays alive, and its own kept tail is then a copy."""
    import gc

    seq = Sequence(420)
    _, memory = run(seq, settings(), [400])
    _keep(memory, seq)
    memory.attach(BatchRow("a", 384, 16, capacity=420), "k", next_token=384 % 97)
    _step(memory, seq, "a", 384, 16)
    memory.drop_kept(["k"])
    gc.collect()
    assert memory.requests["a"].attached[0]() is None
    _keep(memory, seq, req_id="a", kept_id="k2")
    kept = memory.kept.get("k2")
    assert len(kept.tail) == 1 and torch.equal(kept_tokens(kept, seq.rope, kept.tail_start, 400)[1][0],
                                               seq.v[0][kept.tail_start : 400])
