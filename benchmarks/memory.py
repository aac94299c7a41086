"""Device KV and host memory per request, stock vLLM vs episodic, by context length.

Runs one request at a time through an in-process engine (so the block manager and the
event store can be read exactly) for prompts of 8K, 32K and 64K tokens, and reports:

- device KV blocks held by the request during decode (peak), and their bytes;
- host bytes of the episodic event store, against the theoretical
  2 · layers · kv_heads · head_dim · dtype bytes per token of the context.

Stock vLLM holds blocks for the whole context (and needs a KV pool that large);
episodic holds sinks + event cache + window (+ a prefill chunk) whatever the length.

    python benchmarks/memory.py --model smollm2-135m --lengths 8192 32768 65536

Prints a markdown table and puts the run under the label ``--tag`` (without its dash;
``default`` without one) in benchmarks/results/memory-<model>-<machine>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def blocks_held(llm, req_prefix: str) -> int:
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    null = manager.block_pool.null_block
    for rid, blocks in manager.req_to_blocks.items():
        if rid.startswith(req_prefix):
            return sum(1 for b in blocks if b is not null)
    return 0


def measure(llm, lengths, tokenizer, decode_tokens: int, runtime_of) -> list[dict]:
    from vllm import SamplingParams

    from vllm_episodic.workloads import filler_text

    rows = []
    engine = llm.llm_engine
    for n in lengths:
        text = filler_text(n, seed=n)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: n - 8]
        rid = f"mem-{n}"
        engine.add_request(rid, {"prompt_token_ids": ids},
                           SamplingParams(max_tokens=decode_tokens, ignore_eos=True, temperature=0))
        peak_prefill = peak_decode = host = 0
        while engine.has_unfinished_requests():
            outputs = engine.step()
            held = blocks_held(llm, rid)
            runtime = runtime_of(llm)
            if runtime is not None:
                host = max(host, int(runtime.stats.get("host_bytes")))
            decoding = any(len(o.outputs[0].token_ids) > 0 for o in outputs) if outputs else False
            if decoding:
                peak_decode = max(peak_decode, held)
            else:
                peak_prefill = max(peak_prefill, held)
        engine.step()  # tell the worker the request finished
        rows.append({"context": len(ids), "blocks_prefill_peak": peak_prefill,
                     "blocks_decode": peak_decode, "host_bytes": host})
        common.log(f"{n}: {rows[-1]}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", nargs="+", type=int, default=[8192, 32768, 65536])
    parser.add_argument("--backends", nargs="+", default=["episodic", "stock"])
    parser.add_argument("--episodic", default='{"preset": "smollm2"}')
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--kv-space-gib", type=int, default=8)
    parser.add_argument("--tag", default="", help="the run's label in the result file, e.g. runs of one backend each")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_space_gib))

    from transformers import AutoTokenizer
    from vllm import LLM

    from vllm_episodic.integration.runtime import runtime_for

    model_dir = common.resolve_model(args.model)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    layers, kv_heads = config["num_hidden_layers"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    dtype_bytes = 2  # bf16 serving
    per_token = 2 * layers * kv_heads * head_dim * dtype_bytes
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    max_len = max(args.lengths) + 256
    report = {"model": args.model, "machine": common.machine(), "bytes_per_token": per_token,
              "episodic_config": json.loads(args.episodic)}
    for backend in args.backends:
        kwargs = dict(model=model_dir, enforce_eager=True, max_model_len=max_len, enable_prefix_caching=False)
        if backend == "episodic":
            kwargs.update(attention_backend="episodic", additional_config={"episodic": json.loads(args.episodic)})
        elif max_len > config.get("max_position_embeddings", max_len):
            kwargs.update(hf_overrides={"max_position_embeddings": max_len})
        try:
            llm = LLM(**kwargs)
        except Exception as exc:  # stock cannot fit the KV cache for the longest context
            common.log(f"{backend}: cannot start with max_model_len {max_len}: {exc}")
            report[backend] = {"error": str(exc)[-300:]}
            continue
        block_bytes = llm.llm_engine.vllm_config.cache_config.block_size * per_token
        rows = measure(llm, args.lengths, tokenizer, args.decode_tokens, lambda x: runtime_for(x.llm_engine.vllm_config))
        for row in rows:
            row["device_kv_bytes_decode"] = row["blocks_decode"] * block_bytes
            row["host_bytes_theory"] = row["context"] * per_token
        report[backend] = rows
        del llm

    lines = ["| context | backend | device KV blocks (decode) | device KV MiB | prefill peak blocks | host MiB (theory: context × bytes/token) |",
             "|---|---|---|---|---|---|"]
    for backend in args.backends:
        for row in report.get(backend, []) if isinstance(report.get(backend), list) else []:
            host = f"{row['host_bytes'] / 2**20:.0f} ({row['host_bytes_theory'] / 2**20:.0f})" if backend == "episodic" else "-"
            lines.append(f"| {row['context']} | {backend} | {row['blocks_decode']} | "
                         f"{row['device_kv_bytes_decode'] / 2**20:.0f} | {row['blocks_prefill_peak']} | {host} |")
    print("\n".join(lines))
    common.write_run("memory", args.model, common.run_label(args.tag), report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
