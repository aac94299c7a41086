"""Stock and episodic engines on the same prompts, in a process of their own: vLLM's
Triton attention backend under Triton's interpreter (``triton``: the switch changes
what every engine of the process selects), or the CPU op (``cpu``, the reference; its
own process keeps the test session's engines and memory as they are). Run by
``test_triton_path.py``; prints one JSON line.

    python tests/triton_path.py triton|cpu MODEL_DIR SPEC.json

``SPEC``: ``prompts`` (name -> token ids), ``max_tokens``, ``block_size``, ``episodic``
(settings), ``abort`` (the prompt to abort mid-decode).
"""

from __future__ import annotations

import json
import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
os.environ["TRITON_INTERPRET"] = "1"
PLATFORM_OP = sys.argv[1]
os.environ["VLLM_EPISODIC_TRITON_ON_CPU"] = "1" if PLATFORM_OP == "triton" else "0"

LAUNCHES: dict[str, int] = {}


def count(owner, name: str) -> None:
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        LAUNCHES[name] = LAUNCHES.get(name, 0) + 1
        return original(*args, **kwargs)

    setattr(owner, name, counted)


def generate(llm, prompts: dict, max_tokens: int) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
    names = list(prompts)
    outs = llm.generate([TokensPrompt(prompt_token_ids=prompts[n]) for n in names], params, use_tqdm=False)
    return {n: {"tokens": list(o.outputs[0].token_ids),
                "logprobs": [step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]}
            for n, o in zip(names, outs)}


def main() -> None:
    model_dir, spec = sys.argv[2], json.loads(open(sys.argv[3]).read())
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from tests.helpers import attention_impl, flush_finished, runtime_of
    from vllm_episodic.kernels import gather, score

    common = dict(model=model_dir, enforce_eager=True, dtype="float32", max_model_len=1024, seed=0,
                  block_size=spec["block_size"])
    report = {}

    stock = LLM(attention_backend="TRITON_ATTN" if PLATFORM_OP == "triton" else "CPU_ATTN", **common)
    if PLATFORM_OP == "triton":
        # imported by the plugin (with Triton in place: triton_on_cpu.py), count launches
        from vllm.v1.attention.backends import triton_attn

        count(triton_attn, "unified_attention")
    count(score, "score_events_triton")
    count(gather, "gather_rotate_triton")
    report["stock"] = {"impl": type(attention_impl(stock)).__name__, **generate(stock, spec["prompts"], spec["max_tokens"])}
    report["stock_launches"] = dict(LAUNCHES)
    LAUNCHES.clear()

    episodic = LLM(attention_backend="episodic", additional_config={"episodic": spec["episodic"]}, **common)
    report["episodic"] = {"impl": type(attention_impl(episodic)).__name__,
                          **generate(episodic, spec["prompts"], spec["max_tokens"])}
    runtime = runtime_of(episodic)
    report["stats"] = {k: runtime.stats.get(k) for k in ("events_created", "device_cache_misses")}
    report["episodic_launches"] = dict(LAUNCHES)

    engine = episodic.llm_engine
    engine.add_request("aborted", TokensPrompt(prompt_token_ids=spec["prompts"][spec["abort"]]),
                       SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True))
    engine.step()
    engine.step()
    report["held_before_abort"] = len(runtime.memory.requests)
    engine.abort_request(["aborted"])
    flush_finished(episodic)
    report["held_after_abort"] = len(runtime.memory.requests)
    report["host_bytes_after_abort"] = runtime.memory.host_bytes()
    print("RESULT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
