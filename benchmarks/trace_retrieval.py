"""Why a needle is missed: trace retrieval for one natural-text prompt, per layer.

Runs one RULER-style prompt (:mod:`vllm_episodic.ruler`) through an in-process engine
with the episodic backend, recording every retrieval (scores of every event, what was
selected) and the events the request ended with. Prints, for the events that hold
the target needle: their token spans, and per retrieval (each prefill chunk, each
decode retrieval) and layer the needle event's rank by score, whether it was
selected, and the share of the layer's score mass it got; then the answer.

    python benchmarks/trace_retrieval.py --model smollm2-135m --length 8192 --depth 0.5 \\
        --episodic '{"preset": "smollm2"}' --out benchmarks/results/trace.json

Diagnosis only: it patches library functions in this process to record (and, with
``--oracle``, to rank the needle's events first: does the model answer once retrieval
finds them?). ``--dump`` saves the request's memory for offline scoring experiments.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import torch  # noqa: E402

from vllm_episodic import ruler  # noqa: E402
from vllm_episodic.core import memory as memory_module  # noqa: E402
from vllm_episodic.core import plan as plan_module  # noqa: E402
from vllm_episodic.core import request as request_module  # noqa: E402
from vllm_episodic.core import select as select_module  # noqa: E402


def needle_spans(prompt_ids: list[int], tokenizer, sample, answers=None) -> list[tuple[int, int]]:
    """Token spans ``[start, end)`` of the prompt's needles (the sentences holding an
    expected answer, or one of ``answers``), found by decoding the prompt token by token."""
    text, ends = "", []
    for token in prompt_ids:
        text += tokenizer.decode([token])
        ends.append(len(text))
    spans = []
    for answer in sample.answers if answers is None else answers:
        at = text.find(answer)
        start_char = text.rfind("One of the special", 0, at) if sample.task != "qa" else at
        if at < 0 or start_char < 0:
            continue
        first = next(i for i, e in enumerate(ends) if e > start_char)
        last = next(i for i, e in enumerate(ends) if e >= at + len(answer))
        spans.append((first, last + 1))
    return spans


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="niah_single", choices=ruler.TASKS)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--depth", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--episodic", default='{"preset": "smollm2"}')
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--oracle", action="store_true",
                        help="rank the needle's events first in every retrieval (what if retrieval found it?)")
    parser.add_argument("--oracle-steps", default="all", choices=["all", "prefill", "decode"],
                        help="which retrievals --oracle changes")
    parser.add_argument("--oracle-layers", default=None, help="which layers --oracle changes, e.g. 0-8")
    parser.add_argument("--dump", default=None,
                        help="save the request's memory (keys, events, representatives) and each decode "
                             "retrieval's scoring queries to this .pt file, for offline scoring experiments")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    model_dir = common.resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    sample = ruler.make_natural_sample(args.task, args.length, args.depth, count, seed=args.seed)

    calls, stores = [], {}
    original_retrieve = select_module.retrieve_rows
    messages = [{"role": "user", "content": sample.context + "\n\n" + sample.question}]
    expected_ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if not isinstance(expected_ids, list):
        expected_ids = expected_ids["input_ids"]
    oracle_spans = needle_spans(list(expected_ids), tokenizer, sample)

    def recording_retrieve(parts):
        if args.oracle:
            boosted = []
            for memory, layers, plan, scores in parts:
                step = "decode" if plan.num_scheduled == 1 else "prefill"
                n = scores.shape[1]
                starts, ends = memory.store.starts[:n], memory.store.ends[:n]
                hit = torch.zeros(n, dtype=torch.bool)
                for first, last in oracle_spans:
                    hit |= (starts < last) & (ends > first)
                rows = torch.ones(layers.numel(), dtype=torch.bool)
                if args.oracle_layers:
                    low, high = map(int, args.oracle_layers.split("-"))
                    rows = (layers >= low) & (layers <= high)
                if args.oracle_steps not in ("all", step):
                    rows[:] = False
                boost = rows[:, None] & hit[None, :] & torch.isfinite(scores)
                boosted.append((memory, layers, plan, scores.masked_fill(boost, 1e30)))
            parts = boosted
        out = original_retrieve(parts)
        for (memory, layers, plan, scores), selection in zip(parts, out):
            calls.append({"num_computed": plan.num_computed, "num_scheduled": plan.num_scheduled,
                          "layers": layers.tolist(), "scores": scores.float().clone(),
                          "selected": selection.to_dicts()})
        return out

    original_release = memory_module.EpisodicMemory.release

    decode_queries = []
    original_ahead = request_module.RequestMemory.score_ahead

    def recording_ahead(self, plan):
        # every kept query (newest first), seen from memory `window` tokens away
        back = torch.arange(self.observed)
        ring = self.observations[:, (self._ring_next - 1 - back) % plan_module.OBSERVATION_QUERIES]
        angles = self.rope.angles(self.settings.window_tokens - (self.last_query_position - back))
        decode_queries.append((plan.num_computed, self.rope.apply(ring, *angles).float().clone()))
        return original_ahead(self, plan)

    def recording_release(self, req_ids):
        for req_id in req_ids:
            memory = self.requests.get(req_id)
            if memory is not None and memory.store is not None:
                store = memory.store
                n = store.num_events
                stores[req_id] = (store.starts[:n].clone(), store.ends[:n].clone())
                if args.dump:
                    positions = torch.arange(int(store.ends[n - 1]))
                    keys = torch.stack([store.gather(layer, positions)[0] for layer in range(store.shape[0])])
                    torch.save({"keys": keys, "starts": store.starts[:n], "ends": store.ends[:n],
                                "reps": store.reps[:, :n].float(), "decode_queries": decode_queries,
                                "window": memory.settings.window_tokens}, args.dump)
        return original_release(self, req_ids)

    select_module.retrieve_rows = recording_retrieve
    memory_module.EpisodicMemory.release = recording_release
    request_module.RequestMemory.score_ahead = recording_ahead

    llm = LLM(model=model_dir, enforce_eager=True, max_model_len=args.length + 512, seed=0,
              attention_backend="episodic", max_num_batched_tokens=args.max_num_batched_tokens,
              enable_prefix_caching=False, gpu_memory_utilization=0.4,
              additional_config={"episodic": json.loads(args.episodic)})
    out = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=args.max_tokens))[0]
    llm.llm_engine.step()  # let the worker hear that the request finished (release)
    answer = out.outputs[0].text
    prompt_ids = list(out.prompt_token_ids)
    spans = needle_spans(prompt_ids, tokenizer, sample)
    # the other keys' needles (multi-key): same template, another key and number
    text = tokenizer.decode(prompt_ids)
    others = [value for value in re.findall(r"special magic numbers? for [\w-]+ is: (\d+)", text)
              if value not in sample.answers]
    other_spans = needle_spans(prompt_ids, tokenizer, sample, answers=others)
    starts, ends = next(iter(stores.values())) if stores else (torch.empty(0), torch.empty(0))
    report = {"sample": {"task": sample.task, "length": sample.length, "depth": sample.depth, "seed": args.seed,
                         "answers": sample.answers}, "answer": answer, "score": sample.score(answer),
              "prompt_tokens": len(prompt_ids), "needle_spans": spans, "episodic": json.loads(args.episodic),
              "events": [], "retrievals": []}
    print(f"answer {answer!r} (expected {sample.answers}), {len(prompt_ids)} prompt tokens, "
          f"{starts.numel()} events")
    for span in spans:
        ids = [e for e in range(starts.numel()) if starts[e] < span[1] and ends[e] > span[0]]
        report["events"].append({"span": span, "events": [(e, int(starts[e]), int(ends[e])) for e in ids]})
        print(f"needle tokens {span}: events " + ", ".join(f"{e} [{int(starts[e])}, {int(ends[e])})" for e in ids))
        print("  text: " + repr(tokenizer.decode(prompt_ids[span[0]:span[1]])))
        for e in ids:
            print(f"  event {e}: " + repr(tokenizer.decode(prompt_ids[int(starts[e]):int(ends[e])])))
    needle_events = {e for item in report["events"] for e, *_ in item["events"]}
    other_events = {e for first, last in other_spans for e in range(starts.numel())
                    if starts[e] < last and ends[e] > first} - needle_events
    if other_spans:
        print(f"other keys' needles {other_spans}: events {sorted(other_events)}")

    def ranked(s, finite, rank, chosen, events):
        best = min((rank[e] for e in events if e < s.numel() and finite[e]), default=None)
        return best, any(e in chosen for e in events)
    for call in calls:
        scores = call["scores"]
        rows = []
        for row, layer in enumerate(call["layers"]):
            s = scores[row]
            finite = torch.isfinite(s)
            order = torch.argsort(s.masked_fill(~finite, float("-inf")), descending=True)
            rank = {int(e): r for r, e in enumerate(order.tolist())}
            chosen = call["selected"][row]
            best, hit = ranked(s, finite, rank, chosen, needle_events)
            other, other_hit = ranked(s, finite, rank, chosen, other_events)
            rows.append({"layer": layer, "rank": best, "selected": hit, "candidates": int(finite.sum()),
                         "other_rank": other, "other_selected": other_hit})
        report["retrievals"].append({"num_computed": call["num_computed"], "num_scheduled": call["num_scheduled"],
                                     "layers": rows})
        kind = "prefill" if call["num_scheduled"] > 1 else "decode"
        line = " ".join(f"{r['rank'] if r['rank'] is not None else '-'}{'*' if r['selected'] else ''}" for r in rows)
        print(f"{kind} at {call['num_computed']} (+{call['num_scheduled']}), "
              f"{rows[0]['candidates'] if rows else 0} events; needle rank per layer (* selected): {line}")
        if other_events:
            line = " ".join(f"{r['other_rank'] if r['other_rank'] is not None else '-'}"
                            f"{'*' if r['other_selected'] else ''}" for r in rows)
            print(f"  other keys' best rank per layer: {line}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
