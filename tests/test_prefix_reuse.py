"""Kept memories in a real in-process engine (SmolLM2, float32): follow-up turns attach
to the memory of the turn before and prefill only what follows it."""

from __future__ import annotations

import pytest
import torch

from helpers import flush_finished, runtime_of, scheduler_of
from test_episodic_engine import SMALL, reference_engine
from vllm_episodic.workloads import filler_text

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def episodic(make_llm):
    """The engine of test_episodic_engine.py (same arguments: the session builds it once)."""
    return make_llm(attention_backend="episodic", dtype="float32", max_num_batched_tokens=512,
                    additional_config={"episodic": SMALL})


def _index(llm):
    """The scheduler's index of the engine's kept memories."""
    return scheduler_of(llm).kv_cache_manager._episodic_index


def _converse(llm, first: list[int], follow_ups: list[list[int]], max_tokens: int = 12):
    """One conversation: each turn's prompt is the whole history (token ids). Returns
    per turn (output token ids, prompt tokens vLLM reports as cached)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    history, turns = list(first), []
    for follow_up in [None, *follow_ups]:
        if follow_up is not None:
            history += turns[-1][0] + follow_up
        out = llm.generate([TokensPrompt(prompt_token_ids=history)], params, use_tqdm=False)[0]
        turns.append((list(out.outputs[0].token_ids), out.num_cached_tokens))
        flush_finished(llm)
    return turns


def _ids(llm, text: str) -> list[int]:
    return llm.get_tokenizer()(text)["input_ids"]


def test_conversations_that_fit_the_window_equal_stock_with_prefix_caching(episodic, make_llm):
    """Ten conversations of three turns within sinks + window: every turn's tokens and
    cached-prompt counts equal stock vLLM's with its prefix cache (each prompt fits one
    prefill chunk of either engine)."""
    stock = make_llm(dtype="float32")
    for i in range(10):
        first = _ids(stock, filler_text(120 + 8 * i, seed=80 + i) + " What happened next?")
        assert 128 < len(first) < 300 - 40  # every turn fits sinks + window
        follow_ups = [_ids(stock, " And then?"), _ids(stock, f" Say it in {i + 2} words.")]
        want = _converse(stock, first, follow_ups)
        got = _converse(episodic, first, follow_ups)
        assert got == want, f"conversation {i}"
        assert all(cached > 0 for _, cached in got[1:])
    assert runtime_of(episodic).stats.get("tokens_reused") > 0


def test_a_follow_up_turn_attaches_to_the_kept_memory(episodic, monkeypatch):
    """Past the window: turn 2 prefills only what follows the block-aligned prefix it
    shares with turn 1; the memory it attaches to holds the events, representatives and
    host K/V of a fresh prefill of the same tokens (without reuse) over turn 1's prompt,
    whose prefill chunks both runs share."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    first = _ids(episodic, filler_text(1100, seed=90) + " The special magic number is 74123. "
                 + filler_text(200, seed=91) + " What is the special magic number?")
    runtime = runtime_of(episodic)
    ((answer, _),) = _converse(episodic, first, [])
    kept = runtime.memory.kept.get(next(reversed(runtime.memory.kept.memories)))
    assert kept.num_tokens == len(first) + len(answer) - 1
    turn_two = first + answer + _ids(episodic, " Say it again.")
    reused = runtime.stats.get("tokens_reused")
    ((_, cached),) = _converse(episodic, turn_two, [])
    assert cached == (len(turn_two) - 1) // 128 * 128 > len(first) - 128
    assert runtime.stats.get("tokens_reused") - reused == cached

    # the reference: the same engine prefilling turn 2 whole (no kept memory found)
    monkeypatch.setattr(_index(episodic), "lookup", lambda *args: 0)
    engine = episodic.llm_engine
    engine.add_request("fresh", TokensPrompt(prompt_token_ids=turn_two), SamplingParams(temperature=0.0, max_tokens=1))
    reference = None
    while engine.has_unfinished_requests():
        engine.step()
        memory = next((m for r, m in runtime.memory.requests.items() if r.startswith("fresh")), None)
        if memory is not None and memory.store is not None:
            reference = memory.store
    flush_finished(episodic)
    store = kept.store
    # the events that closed before turn 1's last prompt chunk: the same chunks made them
    k = int((reference.ends[: reference.num_events] <= len(first) // 512 * 512 - SMALL["window_tokens"]).sum())
    assert k > 10
    assert torch.equal(store.starts[:k], reference.starts[:k]) and torch.equal(store.ends[:k], reference.ends[:k])
    assert torch.equal(store.reps[:, :k], reference.reps[:, :k])
    tokens = torch.arange(int(store.ends[k - 1]))
    for layer in (0, 15, 29):
        for got, want in zip(store.gather(layer, tokens), reference.gather(layer, tokens)):
            assert torch.equal(got, want)


@pytest.mark.parametrize("positions", ["exact", "bounded"])
def test_an_attached_follow_up_attends_as_the_torch_reference(episodic, make_llm, monkeypatch, positions):
    """A follow-up attached to a kept memory (its sinks and window restored into fresh
    blocks; in the bounded frame its sinks re-rotated in place, its memory at a bounded
    distance) gets from the platform op what the torch reference computes from the host
    store: the same tokens, both attaching the same number of tokens."""
    reference = reference_engine(make_llm)
    for llm in (episodic, reference):
        memory = runtime_of(llm).memory
        monkeypatch.setattr(memory, "settings", memory.settings.model_copy(update={"positions": positions}))
    # a document of its own per frame (the engines keep what the other frame's run kept)
    seed = 77 if positions == "exact" else 78
    document = _ids(episodic, filler_text(1300, seed=seed) + " The code is 3307. What is the code?")
    turns = []
    for llm in (episodic, reference):
        reused = runtime_of(llm).stats.get("tokens_reused")
        ((answer, _),) = _converse(llm, document, [])
        turns.append(_converse(llm, document + answer + _ids(llm, " Once more, the code?"), [], max_tokens=24))
        assert runtime_of(llm).stats.get("tokens_reused") - reused == turns[-1][0][1] > 1000
    assert turns[0] == turns[1]


def test_the_metadata_build_plans_and_writes_nothing(episodic, monkeypatch):
    """The step lifecycle: a metadata build only plans. The writes to the KV cache (an
    attached follow-up's restored sinks and window, event-cache slot fills) and the
    decode rows' retrieval ahead of the layers all happen after it, before the layers
    run (the model's forward pre-hook) or in them; a conversation past the window
    does each of them."""
    from vllm_episodic.integration import cpu_backend, paged_kv
    from vllm_episodic.integration.runtime import WorkerRuntime

    building, during, after = [False], [], []

    def traced(cls, name, what):
        original = getattr(cls, name)

        def call(*args, **kwargs):
            (during if building[0] else after).append(what)
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, name, call)

    build = cpu_backend.EpisodicCPUMetadataBuilder.build

    def traced_build(self, *args, **kwargs):
        building[0] = True
        try:
            return build(self, *args, **kwargs)
        finally:
            building[0] = False

    monkeypatch.setattr(cpu_backend.EpisodicCPUMetadataBuilder, "build", traced_build)
    traced(paged_kv.StackedCaches, "write", "write")
    traced(WorkerRuntime, "select_ahead", "select ahead")
    traced(WorkerRuntime, "_restore", "restore")
    document = _ids(episodic, filler_text(1200, seed=79) + " The code is 5521. What is the code?")
    ((answer, _),) = _converse(episodic, document, [], max_tokens=16)
    _converse(episodic, document + answer + _ids(episodic, " Once more, the code?"), [], max_tokens=16)
    assert during == []
    assert {"write", "select ahead", "restore"} <= set(after)


def test_a_kept_memory_dropped_while_a_request_is_attached_loses_nothing(episodic, monkeypatch):
    """Room for one kept memory: another request's finish drops the memory a running
    request attached to; that request's output is what it is with room for both, and
    nothing is left behind."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    runtime, index = runtime_of(episodic), _index(episodic)
    document = _ids(episodic, filler_text(1100, seed=70) + " The code is 5521. What is the code?")
    other = _ids(episodic, filler_text(700, seed=71))
    engine = episodic.llm_engine

    def follow_up(disturb: bool):
        # turn 1 prefilled whole (prompt logprobs read no kept memory), then kept
        engine.add_request("turn-1", TokensPrompt(prompt_token_ids=document),
                           SamplingParams(temperature=0.0, max_tokens=4, prompt_logprobs=0))
        while engine.has_unfinished_requests():
            engine.step()
        flush_finished(episodic)
        attached_to = next(reversed(index.entries))
        engine.add_request("turn-2", TokensPrompt(prompt_token_ids=document + _ids(episodic, " Again?")),
                           SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
        engine.step()
        if disturb:  # finishes (and is kept) while turn 2 decodes
            engine.add_request("other", TokensPrompt(prompt_token_ids=other), SamplingParams(temperature=0.0, max_tokens=1))
        out = None
        while engine.has_unfinished_requests():
            for result in engine.step():
                if result.request_id == "turn-2" and result.finished:
                    out = (list(result.outputs[0].token_ids), result.num_cached_tokens)
        flush_finished(episodic)
        return out, attached_to

    (want, cached), _ = follow_up(False)
    # room for one kept memory from now on: turn 1's finish drops every other one
    monkeypatch.setattr(index, "cap_bytes", int(1.5 * index._estimate(len(document), 0)))
    (got, got_cached), attached_to = follow_up(True)
    assert cached == got_cached > 1000 and got == want
    assert attached_to not in index.entries and attached_to not in runtime.memory.kept.memories
    assert runtime.memory.requests == {}
    assert runtime.memory.host_bytes() == runtime.memory.kept.nbytes()


def test_a_preempted_attached_request_attaches_again_and_loses_nothing(episodic):
    """An attached request preempted mid-decode (vLLM recomputes it) attaches to the
    kept memory again when it resumes and completes; the kept memory is untouched (a
    later identical request gives the output it gave before) and nothing leaks."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    runtime, engine, scheduler = runtime_of(episodic), episodic.llm_engine, scheduler_of(episodic)
    document = _ids(episodic, filler_text(1100, seed=75) + " The code is 8812. What is the code?")
    _converse(episodic, document, [])
    prompt = TokensPrompt(prompt_token_ids=document + _ids(episodic, " Again?"))
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    ((want, cached),) = _converse(episodic, prompt["prompt_token_ids"], [], max_tokens=40)
    kept = [m.store for m in runtime.memory.kept.memories.values()]
    # bits, not values: a page's unwritten tail is uninitialised memory (NaN != NaN)
    pages = [[page.clone().view(torch.uint8) for page in store.held_pages()] for store in kept]

    reused = runtime.stats.get("tokens_reused")
    engine.add_request("preempted", prompt, params)
    got, steps, preemptions = None, 0, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                got = list(out.outputs[0].token_ids)
        steps += 1
        if steps == 10:
            assert engine.reset_prefix_cache(reset_running_requests=True)
        for request in scheduler.running:
            preemptions = max(preemptions, request.num_preemptions)
    flush_finished(episodic)
    assert preemptions == 1 and len(got) == 40
    assert runtime.stats.get("tokens_reused") - reused == 2 * cached  # attached, and again on resume
    assert runtime.memory.requests == {}
    assert runtime.memory.host_bytes() == runtime.memory.kept.nbytes()
    for store, before in zip(kept, pages):
        assert all(torch.equal(a.view(torch.uint8), b) for a, b in zip(store.held_pages(), before))
    assert _converse(episodic, prompt["prompt_token_ids"], [], max_tokens=40) == [(want, cached)]


def test_an_aborted_attached_request_leaves_only_kept_memories(episodic):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    runtime = runtime_of(episodic)
    document = _ids(episodic, filler_text(900, seed=60))
    _converse(episodic, document, [])
    engine = episodic.llm_engine
    engine.add_request("leaving", TokensPrompt(prompt_token_ids=document + _ids(episodic, " Next?")),
                       SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))
    for _ in range(5):
        engine.step()
    assert runtime.memory.requests
    engine.abort_request(["leaving"])
    flush_finished(episodic)
    assert runtime.memory.requests == {}
    assert runtime.memory.host_bytes() == runtime.memory.kept.nbytes()


def test_no_enable_prefix_caching_keeps_nothing(model_dir):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_episodic.integration.prefix_reuse import _index_for

    def config(**kwargs):
        return EngineArgs(model=model_dir, attention_backend="episodic", enforce_eager=True,
                          max_model_len=8192, **kwargs).create_engine_config()

    assert _index_for(config()) is not None
    off = config(enable_prefix_caching=False)
    assert off.additional_config["episodic"]["kept_memory_gib"] == 0 and _index_for(off) is None
