"""vLLM features next to the episodic memory: preemption, parallel sampling, prompt
logprobs, compiled mode; and the ones it refuses with a message naming them."""

from __future__ import annotations

import pytest

from helpers import flush_finished, runtime_of, scheduler_of
from vllm_episodic.workloads import filler_text

pytestmark = pytest.mark.engine

TINY = {
    "sink_tokens": 64, "window_tokens": 128, "retrieval_budget_tokens": 128,
    "min_event_tokens": 8, "max_event_tokens": 32, "device_event_cache_tokens": 256,
    "retrieval_interval": 1,  # every decode step retrieves (the model's default: every 8th)
}
# memory forms, but the whole context is still attended in place (full attention)
IN_PLACE = {**TINY, "retrieval_budget_tokens": 2048, "device_event_cache_tokens": 2048, "positions": "exact"}


def _run_with_preemption(llm, prompts, max_tokens, preempt_at):
    """Generate, preempting every running request once after ``preempt_at`` steps
    (vLLM's own reset_prefix_cache(reset_running_requests=True) path)."""
    from vllm import SamplingParams

    engine, scheduler = llm.llm_engine, scheduler_of(llm)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"p{i}", prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    outputs, preempted, steps = {}, set(), 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
        steps += 1
        if steps == preempt_at:
            assert engine.reset_prefix_cache(reset_running_requests=True)
        for request in list(scheduler.running) + list(scheduler.waiting):
            if request.num_preemptions > 0:
                preempted.add(request.request_id.rsplit("-", 1)[0])
    flush_finished(llm)
    return [outputs[f"p{i}"] for i in range(len(prompts))], preempted


@pytest.mark.parametrize("settings, same_output", [(IN_PLACE, True), (TINY, False)], ids=["in-place", "assembled"])
def test_preempted_requests_resume(make_llm, settings, same_output):
    """Requests preempted mid-decode are recomputed by vLLM; their memory is rebuilt
    from scratch, and released at the end. While memory is attended in place (full
    attention) the output is exactly that of a request never preempted. Once memory is
    retrieved, attention depends on how tokens were chunked (as in EM-LLM: a recompute
    prefills what was decoded), so a resumed request may continue differently; it
    completes and leaves nothing behind."""
    from vllm import SamplingParams

    llm = make_llm(attention_backend="episodic", dtype="float32", max_num_batched_tokens=1024,
                   max_model_len=2048, additional_config={"episodic": settings})
    prompts = [filler_text(600 + 150 * i, seed=60 + i) for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=160, ignore_eos=True)
    expected = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    got, preempted = _run_with_preemption(llm, prompts, 160, preempt_at=60)
    assert preempted == {f"p{i}" for i in range(4)}
    assert all(len(g) == 160 for g in got)
    if same_output:
        assert got == expected
    else:
        assert runtime_of(llm).stats.get("device_cache_misses") > 0  # memory was retrieved
    runtime = runtime_of(llm)
    assert runtime.memory.requests == {} and runtime.stats.get("host_bytes") == runtime.stats.get("kept_bytes")


def test_parallel_sampling_and_prompt_logprobs(make_llm):
    # no per-request seed: stock vLLM 0.32 on CPU fails seeded requests whose prefill
    # is chunked ("CPU Generator does not use offset"), with or without this backend
    from vllm import SamplingParams

    llm = make_llm(attention_backend="episodic", dtype="float32", max_num_batched_tokens=512,
                   additional_config={"episodic": TINY})
    prompt = filler_text(1200, seed=70)
    out = llm.generate([prompt], SamplingParams(n=3, temperature=0.8, max_tokens=12, prompt_logprobs=1),
                       use_tqdm=False)[0]
    assert len(out.outputs) == 3 and all(len(o.token_ids) == 12 for o in out.outputs)
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(out.prompt_token_ids)
    flush_finished(llm)
    assert runtime_of(llm).memory.requests == {}


@pytest.mark.slow
def test_compiled_mode(make_llm):
    """vLLM's default mode (torch.compile, no --enforce-eager) runs the episodic memory
    and answers as the eager engine does (float32, greedy: the same tokens)."""
    from vllm import SamplingParams

    settings = dict(attention_backend="episodic", dtype="float32", max_num_batched_tokens=512,
                    additional_config={"episodic": TINY})
    compiled, eager = make_llm(enforce_eager=False, **settings), make_llm(**settings)
    prompt = filler_text(1500, seed=3) + " The special magic number is 74123. " + filler_text(100, seed=4) + \
        " What is the special magic number? The special magic number is"
    params = SamplingParams(temperature=0.0, max_tokens=8)
    out = compiled.generate([prompt], params, use_tqdm=False)[0]
    assert "74123" in out.outputs[0].text
    assert runtime_of(compiled).stats.get("device_cache_misses") > 0
    assert out.outputs[0].token_ids == eager.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"enable_lora": True}, "LoRA"),
        ({"kv_cache_dtype": "fp8"}, "quantized KV cache"),
        ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2}},
         "speculative decoding"),
    ],
)
def test_unsupported_features_fail_naming_them(model_dir, kwargs, fragment):
    from vllm.engine.arg_utils import EngineArgs

    with pytest.raises(Exception, match=fragment):
        EngineArgs(model=model_dir, attention_backend="episodic", enforce_eager=True, max_model_len=4096,
                   **kwargs).create_engine_config()
