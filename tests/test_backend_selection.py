"""The plugin inside a real in-process vLLM engine: selection, identity, request ids."""

from __future__ import annotations

import pytest

from helpers import flush_finished, runtime_of, scheduler_of
from vllm_episodic.workloads import filler_text

pytestmark = pytest.mark.engine

# prompt lengths in tokens: all fit in sinks + window (128 + 4096, EM-LLM's window, given:
# SmolLM2's own is 1,024), so memory is inactive; prefill chunks as stock's (vLLM's default)
WINDOW = {"window_tokens": 4096, "retrieval_budget_tokens": 2048, "prefill_chunk_tokens": None}
LENGTHS = [3, 9, 17, 30, 45, 64, 90, 128, 150, 200, 256, 333, 400, 512, 640, 777, 900, 1024,
           1300, 1600, 2000, 2500, 3000, 3600]


def _prompts():
    return [filler_text(n, seed=i) if n > 12 else "Hello, my name is"[: n * 4]
            for i, n in enumerate(LENGTHS)]


def _token_ids(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_episodic_is_selected(make_llm):
    llm = make_llm(attention_backend="episodic", dtype="float32")
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    backends = {type(g.backend).__name__ if not isinstance(g.backend, type) else g.backend.__name__
                for g in runner.attn_groups[0]}
    assert backends == {"EpisodicCPUBackend"}
    runtime = runtime_of(llm)
    # on CPU the event cache holds the retrieved events only (no reserve of copies)
    assert runtime.config.device_event_cache_tokens == runtime.config.largest_budget


def test_unknown_backend_fails_as_in_stock_vllm(model_dir):
    from vllm import LLM

    with pytest.raises(ValueError, match="Unknown attention backend: 'NOPE'.*EPISODIC"):
        LLM(model=model_dir, attention_backend="nope", enforce_eager=True)


def test_token_identical_to_stock_while_context_fits(make_llm):
    from vllm import SamplingParams

    stock = make_llm(dtype="float32")
    episodic = make_llm(attention_backend="episodic", dtype="float32", additional_config={"episodic": WINDOW})
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompts = _prompts()
    assert len(prompts) >= 20
    one_at_a_time = [
        (_token_ids(stock.generate([p], params, use_tqdm=False)),
         _token_ids(episodic.generate([p], params, use_tqdm=False)))
        for p in prompts
    ]
    for i, (expected, got) in enumerate(one_at_a_time):
        assert got == expected, f"prompt {i} ({LENGTHS[i]} tokens) differs when sent alone"
    batch_stock = _token_ids(stock.generate(prompts, params, use_tqdm=False))
    batch_episodic = _token_ids(episodic.generate(prompts, params, use_tqdm=False))
    for i, (expected, got) in enumerate(zip(batch_stock, batch_episodic)):
        assert got == expected, f"prompt {i} ({LENGTHS[i]} tokens) differs in the batch"


def test_backend_sees_each_request_of_a_batch(make_llm):
    """Every step, the worker's memory holds exactly the scheduler's running requests,
    each with the scheduler's count of computed tokens."""
    from vllm import SamplingParams

    llm = make_llm(attention_backend="episodic", dtype="float32")
    flush_finished(llm)
    engine, scheduler, runtime = llm.llm_engine, scheduler_of(llm), runtime_of(llm)
    lengths = {"short": 20, "medium": 300, "long": 1500}
    for i, (name, n) in enumerate(lengths.items()):
        engine.add_request(name, filler_text(n, seed=100 + i),
                           SamplingParams(temperature=0.0, max_tokens=8 + 6 * i, ignore_eos=True))
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        running = {r.request_id: r.num_computed_tokens for r in scheduler.running}
        held = {rid: m.num_tokens for rid, m in runtime.memory.requests.items()}
        # finished requests leave the running list one step before the worker hears
        assert set(running) <= set(held)
        for rid, computed in running.items():
            assert held[rid] == computed
    assert steps > 10
    flush_finished(llm)
    assert runtime.memory.requests == {}
    assert runtime.stats.get("requests_tracked") == 0


def test_abort_releases_the_request(make_llm):
    from vllm import SamplingParams

    llm = make_llm(attention_backend="episodic", dtype="float32")
    flush_finished(llm)
    engine, runtime = llm.llm_engine, runtime_of(llm)
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    engine.add_request("keep", filler_text(100, seed=1), params)
    engine.add_request("drop", filler_text(100, seed=2), params)
    for _ in range(3):
        engine.step()
    held = {rid.rsplit("-", 1)[0] for rid in runtime.memory.requests}
    assert held == {"keep", "drop"}
    engine.abort_request(["drop"])
    engine.step()
    held = {rid.rsplit("-", 1)[0] for rid in runtime.memory.requests}
    assert held == {"keep"}
    engine.abort_request(["keep"])
    flush_finished(llm)
    assert runtime.memory.requests == {}
