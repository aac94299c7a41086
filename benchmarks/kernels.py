"""Microseconds per call of each episodic kernel and its torch reference.

    python benchmarks/kernels.py                       # CPU: the torch references
    python benchmarks/kernels.py --device cuda         # GPU: Triton kernels and references

Shapes default to a Llama-3-8B-like layer (32 query / 8 KV heads, head size 128).
For each batch size (rows) and event count (all rows together):

- score: every event of every row scored against its row's query, then one batched
  budget selection;
- gather: ``budget`` tokens per row moved into cache slots with key rotation (on a GPU
  also the packed host→device copy of those tokens, and its bandwidth as a fraction of
  a large pinned host→device copy, the link);
- attention: one decode query per row over sinks + budget + window keys in a block list.

Prints a table and puts the run under the label ``<device>`` (cpu, cuda) in
benchmarks/results/kernels-<machine>.json (the machine: the CPU's family or the GPU's
model). Triton on CPU exists only as an interpreter, so on CPU only the references are timed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

from vllm_episodic.kernels import select_within_budget, uses_triton  # noqa: E402
from vllm_episodic.kernels.block_attention import block_attention_reference  # noqa: E402
from vllm_episodic.kernels.gather import gather_rotate_reference  # noqa: E402
from vllm_episodic.kernels.prefetch import Prefetcher  # noqa: E402
from vllm_episodic.kernels.score import score_events_reference  # noqa: E402


def timed(fn, device: torch.device, repeat: int) -> float:
    """Median µs of ``fn()`` over ``repeat`` calls after a warm-up."""
    fn()
    samples = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - began) * 1e6)
    return sorted(samples)[len(samples) // 2]


def bench_score(rows: int, events: int, args, device, dtype) -> dict:
    per_row = max(events // rows, 1)
    owner = torch.arange(rows, device=device).repeat_interleave(per_row)
    offsets = torch.arange(rows + 1, device=device) * per_row
    query = torch.randn(rows, args.heads, args.head_size, device=device, dtype=dtype)
    reps = torch.randn(owner.numel(), args.heads, args.head_size, device=device, dtype=dtype)
    available = torch.full((owner.numel(),), 64, device=device)
    sizes = torch.randint(8, 129, (owner.numel(),), device=device)
    result = {}
    impls = {"reference": score_events_reference}
    if uses_triton(reps):
        from vllm_episodic.kernels.score import score_events_triton

        impls["triton"] = score_events_triton
    for name, fn in impls.items():
        # the row length and smallest event size are known on the host: no device→host reads
        result[name] = timed(lambda fn=fn: select_within_budget(fn(query, reps, owner, available), sizes, offsets,
                                                                args.budget, longest=per_row, smallest=8),
                             device, args.repeat)
    return result


def bench_gather(rows: int, events: int, args, device, dtype) -> dict:
    tokens = rows * args.budget
    # events of ~64 tokens, capped at 1M stored tokens: the pack reads random rows, so a larger
    # store changes only the set-up time
    stored = max(min(events * 64, 1 << 20), tokens)
    pin = device.type == "cuda"
    src_k = torch.empty(stored, args.kv_heads, args.head_size, dtype=dtype, pin_memory=pin)
    chunk = torch.randn(4096, args.kv_heads, args.head_size, dtype=dtype)
    for start in range(0, stored, chunk.shape[0]):  # tiled: random numbers for 1M tokens take a minute
        src_k[start:start + chunk.shape[0]] = chunk[:stored - start]
    src_v = src_k.clone().pin_memory() if pin else src_k.clone()
    index = torch.randint(0, stored, (tokens,))
    slots = torch.randperm(tokens * 2)[:tokens].to(device)
    position = torch.randint(0, 100_000, (tokens,), device=device)
    half = args.head_size // 2
    angles = torch.arange(131_072, dtype=torch.float32)[:, None] * (1e4 ** (-torch.arange(half) / half))[None, :]
    cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1).to(device)
    dst_k = torch.empty(tokens * 2, args.kv_heads, args.head_size, device=device, dtype=dtype)
    dst_v = torch.empty_like(dst_k)
    prefetcher = Prefetcher(device, tokens, args.kv_heads, args.head_size, dtype)
    landed_index = torch.arange(tokens, device=device)
    result = {}
    impls = {"reference": gather_rotate_reference}
    if uses_triton(dst_k):
        from vllm_episodic.kernels.gather import gather_rotate_triton

        impls["triton"] = gather_rotate_triton
    prefetcher.submit(0, src_k, src_v, index)
    keys, values = prefetcher.wait(0)
    for name, fn in impls.items():
        result[name] = timed(lambda fn=fn: fn(keys, values, landed_index, dst_k, dst_v, slots, cos_sin, position,
                                              True), device, args.repeat)

    def copy():
        prefetcher.submit(0, src_k, src_v, index)
        prefetcher.wait(0)
        prefetcher.release(0)

    moved = 2 * tokens * args.kv_heads * args.head_size * dtype.itemsize
    result["host_pack_and_copy"] = timed(copy, device, args.repeat)
    result["copy_gb_s"] = moved / result["host_pack_and_copy"] / 1e3
    if "triton" in impls:
        # the kernel reading the pinned host store itself (zero-copy), indices on the device
        device_index = index.to(device)
        result["zero_copy"] = timed(lambda: impls["triton"](src_k, src_v, device_index, dst_k, dst_v, slots,
                                                             cos_sin, position, True), device, args.repeat)
        result["zero_copy_gb_s"] = moved / result["zero_copy"] / 1e3
    return result


def link_bandwidth(device, dtype) -> float | None:
    """GB/s of one large pinned host→device copy."""
    if device.type != "cuda":
        return None
    host = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty_like(host, device=device)
    micros = timed(lambda: dev.copy_(host, non_blocking=True), device, 5)
    return host.numel() / micros / 1e3


def bench_attention(rows: int, args, device, dtype) -> dict:
    keys = args.sinks + args.budget + args.window
    block = 16
    per_row = -(-keys // block)
    k_cache = torch.randn(rows * per_row, block, args.kv_heads, args.head_size, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(rows * per_row, device=device).view(rows, per_row).int()
    q = torch.randn(rows, args.heads, args.head_size, device=device, dtype=dtype)
    row_of = torch.arange(rows, device=device)
    visible = torch.full((rows,), keys, device=device)
    scale = args.head_size ** -0.5
    result = {}
    impls = {"reference": block_attention_reference}
    if uses_triton(q):
        from vllm_episodic.kernels.block_attention import block_attention_triton

        impls["triton"] = block_attention_triton
    for name, fn in impls.items():
        result[name] = timed(lambda fn=fn: fn(q, k_cache, v_cache, table, row_of, visible, scale), device,
                             args.repeat)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--events", nargs="+", type=int, default=[1000, 10_000, 100_000])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--budget", type=int, default=2048, help="event tokens attended per row")
    parser.add_argument("--sinks", type=int, default=128)
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    report = {"machine": common.machine() if device.type == "cpu" else torch.cuda.get_device_name(device),
              "device": args.device, "dtype": args.dtype, "heads": args.heads, "kv_heads": args.kv_heads,
              "head_size": args.head_size, "budget": args.budget, "rows": []}
    report["link_gb_s"] = link_bandwidth(device, dtype)
    header = "| kernel | rows | events | reference µs | triton µs | note |"
    lines = [header, "|---|---|---|---|---|---|"]
    for rows in args.rows:
        for events in args.events:
            score = bench_score(rows, events, args, device, dtype)
            report["rows"].append({"kernel": "score+select", "rows": rows, "events": events, **score})
            lines.append(f"| score+select | {rows} | {events} | {score['reference']:.0f} | "
                         f"{score.get('triton', float('nan')):.0f} | |")
            common.log(lines[-1])
        gather = bench_gather(rows, max(args.events), args, device, dtype)
        report["rows"].append({"kernel": "gather", "rows": rows, "events": max(args.events), **gather})
        note = f"pack+copy {gather['host_pack_and_copy']:.0f} µs, {gather['copy_gb_s']:.1f} GB/s"
        if report["link_gb_s"]:
            note += f" ({gather['copy_gb_s'] / report['link_gb_s']:.0%} of link)"
        if "zero_copy" in gather:
            note += (f"; from pinned host in the kernel {gather['zero_copy']:.0f} µs, "
                     f"{gather['zero_copy_gb_s']:.1f} GB/s ({gather['zero_copy_gb_s'] / report['link_gb_s']:.0%})")
        lines.append(f"| gather+rotate | {rows} | {max(args.events)} | {gather['reference']:.0f} | "
                     f"{gather.get('triton', float('nan')):.0f} | {note} |")
        common.log(lines[-1])
        attention = bench_attention(rows, args, device, dtype)
        report["rows"].append({"kernel": "block attention", "rows": rows, **attention})
        lines.append(f"| block attention | {rows} | - | {attention['reference']:.0f} | "
                     f"{attention.get('triton', float('nan')):.0f} | "
                     f"{args.sinks + args.budget + args.window} keys per row |")
        common.log(lines[-1])
    # engine-free: no model; the shapes are in the run
    common.write_run("kernels", None, device.type, report)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
