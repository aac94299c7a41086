"""What a decode step's retrieval costs per request, engine-free: scoring, selection and
the event-cache bookkeeping for N requests decoding together.

Builds N ``RequestMemory``s of ``--context`` random tokens (the default model's shapes,
a preset's settings, surprise and keys random), then times decode steps that retrieve
with fresh random queries (every step; the engine retrieves every
``retrieval_interval``-th): the scoring GEMM of every request, the one retrieval over
every (request, layer) row (:func:`vllm_episodic.core.select.select_ahead` minus its
scoring), and each request's cache codes and slot-table update. No vLLM needed.

    python benchmarks/retrieval_step.py --context 16000 --requests 1 4

Prints a table (median ms per step over ``--steps``) and puts the run under ``--label`` in
benchmarks/results/retrieval-step-<machine>.json (``--out``: a file of its own).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

from vllm_episodic.config import EpisodicConfig  # noqa: E402
from vllm_episodic.core import request as request_module  # noqa: E402
from vllm_episodic.core.memory import EpisodicMemory  # noqa: E402
from vllm_episodic.core.plan import BatchRow, ModelShape  # noqa: E402
from vllm_episodic.core.select import select_ahead  # noqa: E402
from vllm_episodic.core.rope import Rope, rope_table  # noqa: E402
from vllm_episodic.metrics import Stats  # noqa: E402

CHUNK = 2048


def build(args, requests: int) -> EpisodicMemory:
    """A memory holding ``requests`` requests of ``args.context`` tokens each."""
    trained = 8192
    config = EpisodicConfig.from_dict(json.loads(args.episodic)).resolved(
        trained, args.context + 1024, args.block_size, device_is_host=True)
    shape = ModelShape(args.layers, args.heads, args.kv_heads, args.head_size, torch.bfloat16, trained,
                       args.block_size)
    rope = Rope(rope_table(args.context + 1024, args.head_size, 10000.0), args.head_size, True)
    memory = EpisodicMemory(config, shape, rope, Stats())
    g = torch.Generator().manual_seed(0)
    kv = [torch.randn(args.layers, args.context, args.kv_heads, args.head_size, generator=g).bfloat16()
          for _ in range(2)]
    surprise = torch.rand(args.context, generator=g) * 4
    for r in range(requests):
        for start in range(0, args.context, CHUNK):
            n = min(CHUNK, args.context - start)
            (plan,) = memory.plan_step([BatchRow(f"r{r}", start, n, capacity=args.context + 1024)])
            plan.memory.record_surprise(0, surprise[: start + n])
            queries = torch.randn(args.layers, 32, args.heads, args.head_size, generator=g).bfloat16()
            plan.memory.keep_queries(queries, start + n - 1)
            memory.end_step([plan], lambda p, layer, a, b: (kv[0][layer, a:b], kv[1][layer, a:b]))
    return memory


def measure(args, requests: int) -> dict:
    memory = build(args, requests)
    names = [f"r{r}" for r in range(requests)]
    scoring = [0.0]
    score_ahead = request_module.RequestMemory.score_ahead

    def timed_score(self, plan):
        began = time.perf_counter()
        try:
            return score_ahead(self, plan)
        finally:
            scoring[0] += time.perf_counter() - began

    request_module.RequestMemory.score_ahead = timed_score
    samples = {"scoring": [], "retrieval": [], "codes + slots": []}
    g = torch.Generator().manual_seed(1)
    try:
        for step in range(args.steps):
            position = args.context + step
            plans = memory.plan_step([BatchRow(n, position, 1, capacity=args.context + 1024) for n in names])
            for plan in plans:
                plan.refresh = True  # retrieve in every timed step
                queries = torch.randn(args.layers, 1, args.heads, args.head_size, generator=g).bfloat16()
                plan.memory.keep_queries(queries, position - 1)
            scoring[0] = 0.0
            began = time.perf_counter()
            selections = select_ahead(plans)
            retrieved = time.perf_counter()
            layers = torch.arange(args.layers)
            for plan, chosen in zip(plans, selections):
                codes = plan.memory.token_codes(chosen, plan.frame)
                plan.memory.slots.update(layers, codes, plan.cache_slots)
            done = time.perf_counter()
            samples["scoring"].append(scoring[0])
            samples["retrieval"].append(retrieved - began - scoring[0])
            samples["codes + slots"].append(done - retrieved)
    finally:
        request_module.RequestMemory.score_ahead = score_ahead
    events = memory.requests[names[0]].store.num_events
    return {"requests": requests, "events_per_request": events,
            **{k: statistics.median(v) * 1e3 for k, v in samples.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context", type=int, default=16000)
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--episodic", default='{"preset": "smollm2"}')
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--label", default="default", help="the run's label in results/retrieval-step-<machine>.json")
    parser.add_argument("--out", default=None, help="write the report to this JSON file instead")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for requests in args.requests:
        common.log(f"{requests} request(s) of {args.context} tokens")
        rows.append(measure(args, requests))
    print("| requests | events each | scoring ms | retrieval ms | codes + slots ms | per request ms |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        total = row["scoring"] + row["retrieval"] + row["codes + slots"]
        print(f"| {row['requests']} | {row['events_per_request']} | {row['scoring']:.2f} | {row['retrieval']:.2f} | "
              f"{row['codes + slots']:.2f} | {total / row['requests']:.2f} |")
    report = {"machine": common.machine(), "threads": torch.get_num_threads(), "context": args.context,
              "episodic": args.episodic,
              "shapes": {k: getattr(args, k) for k in ("layers", "heads", "kv_heads", "head_size", "block_size")},
              "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    else:  # engine-free: no model, its shapes (SmolLM2-135M's by default) in the run
        common.write_run("retrieval-step", None, args.label, report)


if __name__ == "__main__":
    main()
