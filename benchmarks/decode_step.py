"""One decode step of a long context, engine-free: full attention vs episodic retrieval.

Runs where vLLM cannot (a GPU machine with only torch and Triton): the model's
attention layers alone, at realistic shapes (default 32 query / 8 KV heads, head size
128, 32 layers, bf16), for one request at each context length.

- **full**: every layer attends its whole context with torch SDPA; the context's KV
  lives on the device (skipped where it would not fit ``--device-gib``).
- **episodic**: the context's KV lives in pinned host memory; per layer the step scores
  the events' representatives on the device, selects a token budget, moves the
  selected tokens host→device, rotates them into the layer's cache slots, and attends
  over sinks + events + window in a block list. Two regimes:

  * ``cold``: every selected token is fetched this step, synchronously;
  * ``overlapped``: the tokens for layer l + 1 are prefetched (on a side stream on
    CUDA) while layer l computes, as when a step's selection predicts the next one.

Prints a table (ms per step, device bytes) and writes
benchmarks/results/decode-step-<device>.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

from vllm_episodic.kernels import (  # noqa: E402
    Prefetcher,
    block_attention,
    gather_rotate,
    score_events,
    select_within_budget,
)

BLOCK = 16


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn, device: torch.device, repeat: int) -> float:
    fn()
    samples = []
    for _ in range(repeat):
        sync(device)
        began = time.perf_counter()
        fn()
        sync(device)
        samples.append((time.perf_counter() - began) * 1e3)
    return sorted(samples)[len(samples) // 2]


def full_step(context: int, args, device, dtype) -> tuple[float, int] | None:
    per_layer = 2 * context * args.kv_heads * args.head_size * dtype.itemsize
    if per_layer * args.layers > args.device_gib * (1 << 30):
        return None
    k = [torch.randn(1, args.kv_heads, context, args.head_size, device=device, dtype=dtype)
         for _ in range(args.layers)]
    v = [torch.randn_like(x) for x in k]
    q = torch.randn(1, args.heads, 1, args.head_size, device=device, dtype=dtype)

    def step():
        for layer in range(args.layers):
            F.scaled_dot_product_attention(q, k[layer], v[layer], enable_gqa=True)

    ms = timed_ms(step, device, args.repeat)
    return ms, per_layer * args.layers


class EpisodicLayers:
    """Host store, representatives and device cache of one request, all layers."""

    def __init__(self, context: int, args, device, dtype):
        self.args, self.device = args, device
        pin = device.type == "cuda"
        events = context // args.event_tokens
        self.sizes = torch.full((events,), args.event_tokens, device=device)
        self.starts = torch.arange(events, device=device) * args.event_tokens
        self.offsets = torch.tensor([0, events], device=device)
        self.owner = torch.zeros(events, dtype=torch.int32, device=device)
        shape = (context, args.kv_heads, args.head_size)
        self.host_k = [torch.randn(shape, dtype=dtype).pin_memory() if pin else torch.randn(shape, dtype=dtype)
                       for _ in range(args.layers)]
        self.host_v = [x.clone() for x in self.host_k]
        self.reps = torch.randn(args.layers, events, args.heads, args.head_size, device=device, dtype=dtype)
        attended = args.sinks + args.budget + args.window
        self.blocks = -(-attended // BLOCK)
        cache = (args.layers, self.blocks, BLOCK, args.kv_heads, args.head_size)
        self.cache_k = torch.randn(cache, device=device, dtype=dtype)
        self.cache_v = torch.randn_like(self.cache_k)
        self.table = torch.arange(self.blocks, device=device, dtype=torch.int32)[None]
        self.visible = torch.tensor([attended], device=device)
        self.row_of = torch.zeros(1, dtype=torch.int32, device=device)
        self.budget_slots = torch.arange(args.sinks, args.sinks + args.budget, device=device)
        self.positions = self.budget_slots.clone()
        half = args.head_size // 2
        angles = torch.arange(attended + 1, dtype=torch.float32)[:, None] * (1e4 ** (-torch.arange(half) / half))
        self.cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1).to(device)
        self.prefetcher = Prefetcher(device, args.budget, args.kv_heads, args.head_size, dtype)
        self.q = torch.randn(1, args.heads, args.head_size, device=device, dtype=dtype)
        self.device_bytes = sum(t.numel() * t.element_size() for t in (self.reps, self.cache_k, self.cache_v))
        self.host_bytes = 2 * sum(t.numel() * t.element_size() for t in self.host_k)

    def select(self, layer: int) -> torch.Tensor:
        """Token indices (host) of the events this layer retrieves for the step's query."""
        scores = score_events(self.q, self.reps[layer], self.owner, self.sizes)
        order, taken = select_within_budget(scores, self.sizes, self.offsets, self.args.budget)
        events = order[0][taken[0]]
        counts = self.sizes[events]
        first = torch.repeat_interleave(self.starts[events], counts)
        rank = torch.arange(int(counts.sum()), device=self.device)
        rank = rank - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        return (first + rank).cpu()  # the host packs these: one sync per layer

    def attend(self, layer: int, buffer: int) -> None:
        keys, values = self.prefetcher.wait(buffer)
        n = keys.shape[0]
        cache_k = self.cache_k[layer].view(-1, self.args.kv_heads, self.args.head_size)
        cache_v = self.cache_v[layer].view(-1, self.args.kv_heads, self.args.head_size)
        gather_rotate(keys, values, torch.arange(n, device=self.device), cache_k, cache_v, self.budget_slots[:n],
                      self.cos_sin, self.positions[:n], True)
        self.prefetcher.release(buffer)
        block_attention(self.q, self.cache_k[layer], self.cache_v[layer], self.table, self.row_of, self.visible,
                        self.args.head_size ** -0.5)

    def cold_step(self) -> None:
        for layer in range(self.args.layers):
            self.prefetcher.submit(0, self.host_k[layer], self.host_v[layer], self.select(layer))
            self.attend(layer, 0)

    def overlapped_step(self, predicted: list[torch.Tensor]) -> None:
        self.prefetcher.submit(0, self.host_k[0], self.host_v[0], predicted[0])
        for layer in range(self.args.layers):
            if layer + 1 < self.args.layers:
                self.prefetcher.submit((layer + 1) % 2, self.host_k[layer + 1], self.host_v[layer + 1],
                                       predicted[layer + 1])
            # scoring still runs (it decides the next step's prediction)
            score_events(self.q, self.reps[layer], self.owner, self.sizes)
            self.attend(layer, layer % 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--contexts", nargs="+", type=int, default=[32_768, 131_072, 262_144])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--event-tokens", type=int, default=64)
    parser.add_argument("--sinks", type=int, default=128)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--device-gib", type=float, default=60.0, help="largest full-attention KV tried")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)

    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else common.machine(),
              "shapes": {k: v for k, v in vars(args).items() if k not in ("device", "contexts", "repeat")},
              "rows": []}
    lines = ["| context | full ms | full device GiB | episodic cold ms | episodic overlapped ms | "
             "episodic device GiB | host GiB | full / overlapped |", "|---|---|---|---|---|---|---|---|"]
    for context in args.contexts:
        full = full_step(context, args, device, dtype)
        memory = EpisodicLayers(context, args, device, dtype)
        cold = timed_ms(memory.cold_step, device, args.repeat)
        predicted = [memory.select(layer) for layer in range(args.layers)]
        overlapped = timed_ms(functools.partial(memory.overlapped_step, predicted), device, args.repeat)
        row = {"context": context, "full_ms": full[0] if full else None,
               "full_device_bytes": full[1] if full else None, "cold_ms": cold, "overlapped_ms": overlapped,
               "episodic_device_bytes": memory.device_bytes, "host_bytes": memory.host_bytes}
        report["rows"].append(row)
        gib = 1 << 30
        lines.append(f"| {context} | {f'{full[0]:.2f}' if full else 'does not fit'} | "
                     f"{f'{full[1] / gib:.2f}' if full else '-'} | {cold:.2f} | {overlapped:.2f} | "
                     f"{memory.device_bytes / gib:.2f} | {memory.host_bytes / gib:.1f} | "
                     f"{f'{full[0] / overlapped:.2f}x' if full else '-'} |")
        common.log(lines[-1])
        del memory
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = common.RESULTS / f"decode-step-{device.type}.json"
    out.write_text(json.dumps(report, indent=1))
    print("\n".join(lines))
    common.log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
