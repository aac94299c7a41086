"""Where a decode step's time goes, episodic vs stock, at one context length.

One request (prompt of ``--context`` tokens, then ``--decode`` greedy tokens) through an
in-process engine. The episodic step is split by timing the memory's own entry points
(this script wraps them; nothing in the package is timed on its own):

- plan: per-step bookkeeping (rows, frames, block-table assembly);
- scoring: retrieval (score events, select within the budget, contiguity), in each layer
  for prefill chunks and for all layers ahead of them for decode steps;
- gather: moving selected tokens into the event-cache slots (keys re-rotated);
- attention: vLLM's CPU attention op over sinks + events + window;
- surprise: −log p of the step's tokens (logits carried from the sampler);
- events: segmentation and writing finished events to the host store;
- rest: the model outside attention (embeddings, MLPs, norms, sampler) and the engine.

    python benchmarks/profile_decode.py --context 30000 --decode 64

``--slow-steps`` also lists the decode steps slower than 1.5x the median (the retrieval
steps, a new bounded frame) with their parts.

Prints a table and puts the run under ``--label`` in
benchmarks/results/profile-decode-<model>-<machine>.json (``--out``: a file of its own).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SPENT: dict[str, float] = defaultdict(float)


def timing(owner, name: str, key: str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def timed(*args, **kwargs):
        began = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            SPENT[key] += time.perf_counter() - began

    setattr(owner, name, timed)


def instrument() -> None:
    from vllm_episodic.core import memory
    from vllm_episodic.integration import cpu_backend, runtime

    timing(memory.EpisodicMemory, "plan_step", "plan")
    # prefill chunks retrieve inside each layer (fill_caches = select_layer + slot fill);
    # decode steps retrieve for every layer of every row before the layers run (the
    # runtime's select_ahead = the memory's select_ahead + each row's slot fill)
    timing(runtime, "select_layer", "select")
    timing(runtime.WorkerRuntime, "fill_caches", "fill_cache")
    timing(runtime, "select_ahead", "select_layers")
    timing(runtime.WorkerRuntime, "select_ahead", "select_ahead")
    timing(cpu_backend.EpisodicCPUImpl, "forward", "attention layer")
    timing(runtime, "token_surprise", "surprise")
    timing(runtime.WorkerRuntime, "after_logits", "surprise")
    timing(memory.EpisodicMemory, "end_step", "events")


def decode_steps(llm, prompt_ids: list[int], decode: int, requests: int = 1,
                 per_step: list | None = None) -> tuple[float, int]:
    """Seconds spent in steps where every request decodes (all prefills done) and how many;
    ``per_step`` gets each such step's ``(ms, {part: ms})``."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    for i in range(requests):
        engine.add_request(f"profile-{i}", {"prompt_token_ids": prompt_ids},
                           SamplingParams(max_tokens=decode, ignore_eos=True, temperature=0.0))
    started: set[str] = set()
    spent, steps = 0.0, 0
    while engine.has_unfinished_requests():
        decoding = len(started) == requests
        parts_before = dict(SPENT)
        began = time.perf_counter()
        outputs = engine.step()
        if decoding and len(outputs) == requests:
            elapsed = time.perf_counter() - began
            spent += elapsed
            steps += 1
            if per_step is not None:
                per_step.append((elapsed * 1e3,
                                 {k: (v - parts_before.get(k, 0.0)) * 1e3 for k, v in SPENT.items()}))
        elif decoding:  # some request has finished: neither the step nor its parts count
            SPENT.clear()
            SPENT.update(parts_before)
        started |= {o.request_id for o in outputs if o.outputs[0].token_ids}
        if not decoding and len(started) == requests:
            SPENT.clear()  # from here on, decode steps only
    return spent, steps


def slow_steps(per_step: list, median: float) -> list[dict]:
    """The decode steps slower than 1.5x the ``median`` step (retrievals, new frames),
    printed and returned with their parts (ms, parts under 0.5 ms left out)."""
    slow = [{"step": i, "ms": round(ms, 1), "parts_ms": {k: round(v, 1) for k, v in parts.items() if v >= 0.5}}
            for i, (ms, parts) in enumerate(per_step) if ms > 1.5 * median]
    common.log(f"median step {median:.2f} ms; {len(slow)} of {len(per_step)} steps slower than 1.5x:")
    for row in slow:
        print(f"  step {row['step']}: {row['ms']} ms {row['parts_ms']}")
    return slow


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=30000)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--requests", type=int, default=1,
                        help="identical requests decoding together (steps are timed once all have started)")
    parser.add_argument("--episodic", default='{"preset": "smollm2"}')
    parser.add_argument("--backends", nargs="+", default=["episodic", "stock"])
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="engine max_model_len (default: just the prompt and the decoded tokens)")
    parser.add_argument("--label", default="default",
                        help="the run's label in results/profile-decode-<model>-<machine>.json")
    parser.add_argument("--out", default=None, help="write the report to this JSON file instead")
    parser.add_argument("--slow-steps", action="store_true",
                        help="also list each episodic decode step slower than 1.5x the median, with its parts")
    parser.add_argument("--random-prompt", action="store_true",
                        help="uniformly random token ids (as `vllm bench serve --dataset-name random`) instead of text")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer
    from vllm import LLM

    from vllm_episodic.workloads import filler_text

    model_dir = common.resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if args.random_prompt:
        gen = torch.Generator().manual_seed(1)
        prompt_ids = torch.randint(0, tokenizer.vocab_size, (args.context,), generator=gen).tolist()
    else:
        prompt_ids = tokenizer(filler_text(args.context, seed=1), add_special_tokens=False)["input_ids"][: args.context]
    max_len = args.max_model_len or args.context + args.decode + 64
    report = {"machine": common.machine(), "model": args.model, "context": len(prompt_ids), "decode": args.decode,
              "requests": args.requests,
              "prompt": "random token ids" if args.random_prompt else "text",
              "episodic_config": json.loads(args.episodic)}
    instrument()
    for backend in args.backends:
        kwargs = dict(model=model_dir, enforce_eager=True, max_model_len=max_len, enable_prefix_caching=False,
                      max_num_batched_tokens=2048)
        if backend == "episodic":
            kwargs.update(attention_backend="episodic", additional_config={"episodic": json.loads(args.episodic)})
        elif max_len > common.trained_length(model_dir):
            kwargs["hf_overrides"] = {"max_position_embeddings": max_len}
        llm = LLM(**kwargs)
        per_step = []
        spent, steps = decode_steps(llm, prompt_ids, args.decode, args.requests, per_step)
        parts = {k: v / steps * 1e3 for k, v in SPENT.items()} if backend == "episodic" else {}
        median = statistics.median(ms for ms, _ in per_step)
        report[backend] = {"step_ms": spent / steps * 1e3, "steps": steps, "parts_ms": parts,
                           "median_step_ms": median}
        if args.slow_steps and backend == "episodic":
            report[backend]["slow_steps"] = slow_steps(per_step, median)
        common.log(f"{backend}: {spent / steps * 1e3:.2f} ms per decode step over {steps} steps; {parts}")
        del llm

    episodic = report.get("episodic")
    lines = ["| part of a decode step | ms | share |", "|---|---|---|"]
    if episodic:
        p = defaultdict(float, episodic["parts_ms"])
        scoring = p["select"] + p["select_layers"]
        gather = p["fill_cache"] - p["select"] + p["select_ahead"] - p["select_layers"]
        attention = p["attention layer"] - p["fill_cache"]
        rows = [("plan (bookkeeping)", p["plan"]), ("scoring + selection", scoring),
                ("gather into cache slots", gather), ("attention (vLLM CPU op)", attention),
                ("surprise", p["surprise"]), ("events + host store", p["events"])]
        rows.append(("rest of the model and engine", episodic["step_ms"] - sum(v for _, v in rows)))
        for name, ms in rows:
            lines.append(f"| {name} | {ms:.2f} | {ms / episodic['step_ms']:.0%} |")
        lines.append(f"| **episodic step** | **{episodic['step_ms']:.2f}** | |")
    if "stock" in report:
        lines.append(f"| stock vLLM step (same context) | {report['stock']['step_ms']:.2f} | |")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    else:
        common.write_run("profile-decode", args.model, args.label, report)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
