"""One decode step of a long context, engine-free: full attention vs episodic retrieval.

Runs where vLLM cannot (a GPU machine with only torch and Triton): the model's
attention layers alone, at realistic shapes (default 32 query / 8 KV heads, head size
128, 32 layers, bf16), for one request at each context length.

- **full**: every layer attends its whole context with torch SDPA; the context's KV
  lives on the device (skipped where it would not fit ``--device-gib``).
- **episodic**: the context's KV lives in host memory (pinned on CUDA); only the
  events' representatives, sinks, window and event cache are on the device. Per layer
  the step scores every event on the device, selects a token budget and attends over
  sinks + events + window in a block list, in three regimes:

  * ``cold``: every selected token misses the device cache and is read from the
    pinned host store by the gather kernel itself (zero-copy over the link, keys
    rotated on the way): no host sync anywhere in the step;
  * ``staged``: the prefetcher packs the tokens for layer l + 1 into pinned staging
    and copies them on a side stream while layer l computes (tokens predicted from the
    previous step's selection);
  * ``cached``: every selected event is already in the device cache (the steady state
    when the selection repeats): scoring, selection and attention only.

Prints a table (ms per step, device and host bytes) and, after every context, puts the
run under the label ``<device>`` (cuda, cpu) in benchmarks/results/decode-step-<machine>.json
(the machine: the GPU's model, e.g. h200).
"""

from __future__ import annotations

import argparse
import functools
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


def full_step(context: int, args, device, dtype) -> tuple[float, float | None, int] | None:
    """Eager and graphed ms per step and device bytes of full attention, if it fits."""
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

    return timed_ms(step, device, args.repeat), timed_graph_ms(step, device, args.repeat), per_layer * args.layers


def graphed(step, device: torch.device):
    """``step`` captured once in a CUDA graph; returns its replay. A replay launches every
    kernel of the step's 32 layers at once, so what is timed is the GPU's work, not
    Python's launch overhead (vLLM runs decode steps in CUDA graphs too)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        step()  # compiles the kernels and settles the allocator outside the capture
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def timed_graph_ms(step, device: torch.device, repeat: int) -> float | None:
    if device.type != "cuda":
        return None
    try:
        return timed_ms(graphed(step, device), device, repeat)
    except RuntimeError as error:  # a step that cannot be captured is reported, not fatal
        common.log(f"CUDA graph capture failed: {error}")
        return None


def host_store(context: int, args, dtype, pin: bool) -> list[torch.Tensor]:
    """Keys or values of every layer, ``[context, kv_heads, head_size]`` each: distinct host
    memory per layer, filled by tiling one random chunk (random numbers for 64 GiB would
    cost minutes of a GPU lease; the timings do not depend on the values)."""
    chunk = min(context, 16_384)
    base = torch.randn(chunk, args.kv_heads, args.head_size, dtype=dtype)
    layers = []
    for _ in range(args.layers):
        store = torch.empty(context, args.kv_heads, args.head_size, dtype=dtype, pin_memory=pin)
        store.view(-1, chunk, args.kv_heads, args.head_size).copy_(base.expand(context // chunk, *base.shape))
        layers.append(store)
    return layers


class EpisodicLayers:
    """Host store, representatives and device cache of one request, all layers."""

    def __init__(self, context: int, args, device, dtype):
        self.args, self.device = args, device
        events = context // args.event_tokens
        # equal-sized events: the taken prefix of the ranking has a static length, so the
        # step never reads a count back from the device
        self.take = args.budget // args.event_tokens
        self.sizes = torch.full((events,), args.event_tokens, device=device)
        self.starts = torch.arange(events, device=device) * args.event_tokens
        self.offsets = torch.tensor([0, events], device=device)
        self.owner = torch.zeros(events, dtype=torch.int32, device=device)
        self.events = events
        self.host_k = host_store(context, args, dtype, pin=device.type == "cuda")
        self.host_v = host_store(context, args, dtype, pin=device.type == "cuda")
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
        self.ranks = torch.arange(args.event_tokens, device=device)
        half = args.head_size // 2
        angles = torch.arange(attended + 1, dtype=torch.float32)[:, None] * (1e4 ** (-torch.arange(half) / half))
        self.cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1).to(device)
        self.prefetcher = Prefetcher(device, args.budget, args.kv_heads, args.head_size, dtype)
        self.q = torch.randn(1, args.heads, args.head_size, device=device, dtype=dtype)
        self.device_bytes = sum(t.numel() * t.element_size() for t in (self.reps, self.cache_k, self.cache_v))
        self.host_bytes = 2 * sum(t.numel() * t.element_size() for t in self.host_k)

    def select(self, layer: int) -> torch.Tensor:
        """Token indices (on the device) of the events this layer retrieves for the step's query."""
        scores = score_events(self.q, self.reps[layer], self.owner, self.sizes)
        order, _ = select_within_budget(scores, self.sizes, self.offsets, self.args.budget, longest=self.events,
                                        smallest=self.args.event_tokens)
        events = order[0, :self.take]
        return (self.starts[events][:, None] + self.ranks[None, :]).flatten()

    def fill(self, layer: int, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> None:
        """``keys[index]``, ``values[index]`` into the layer's budget slots, keys rotated."""
        shape = (-1, self.args.kv_heads, self.args.head_size)
        n = index.numel()
        gather_rotate(keys, values, index, self.cache_k[layer].view(shape), self.cache_v[layer].view(shape),
                      self.budget_slots[:n], self.cos_sin, self.positions[:n], True)

    def attend(self, layer: int) -> None:
        block_attention(self.q, self.cache_k[layer], self.cache_v[layer], self.table, self.row_of, self.visible,
                        self.args.head_size ** -0.5)

    def cold_step(self) -> None:
        for layer in range(self.args.layers):
            # straight from the host store into the cache slots: one launch, no staging
            self.fill(layer, self.host_k[layer], self.host_v[layer], self.select(layer))
            self.attend(layer)

    def staged_step(self, predicted: list[torch.Tensor]) -> None:
        self.prefetcher.submit(0, self.host_k[0], self.host_v[0], predicted[0])
        for layer in range(self.args.layers):
            if layer + 1 < self.args.layers:
                self.prefetcher.submit((layer + 1) % 2, self.host_k[layer + 1], self.host_v[layer + 1],
                                       predicted[layer + 1])
            self.select(layer)  # still runs: it decides the next step's prediction
            keys, values = self.prefetcher.wait(layer % 2)
            self.fill(layer, keys, values, torch.arange(keys.shape[0], device=self.device))
            self.prefetcher.release(layer % 2)
            self.attend(layer)

    def cached_step(self) -> None:
        for layer in range(self.args.layers):
            self.select(layer)
            self.attend(layer)


def parse_args() -> argparse.Namespace:
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
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)

    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else common.machine(),
              "shapes": {k: v for k, v in vars(args).items() if k not in ("device", "contexts", "repeat")},
              "rows": []}
    gib = 1 << 30
    fmt = lambda ms: "-" if ms is None else f"{ms:.2f}"  # noqa: E731
    header = ("| context | full ms (graph) | full device GiB | episodic cold ms (graph) | staged ms | "
              "cached ms (graph) | episodic device GiB | host GiB | full / cold, graphs | full / cached, graphs |")
    lines = [header, "|---" * 10 + "|"]
    for context in args.contexts:
        full = full_step(context, args, device, dtype)
        memory = EpisodicLayers(context, args, device, dtype)
        cold = timed_ms(memory.cold_step, device, args.repeat)
        cold_graph = timed_graph_ms(memory.cold_step, device, args.repeat)
        predicted = [memory.select(layer).cpu() for layer in range(args.layers)]
        staged = timed_ms(functools.partial(memory.staged_step, predicted), device, args.repeat)
        cached = timed_ms(memory.cached_step, device, args.repeat)
        cached_graph = timed_graph_ms(memory.cached_step, device, args.repeat)
        full_ms, full_graph, full_bytes = full if full else (None, None, None)
        row = {"context": context, "full_ms": full_ms, "full_graph_ms": full_graph, "full_device_bytes": full_bytes,
               "cold_ms": cold, "cold_graph_ms": cold_graph, "staged_ms": staged, "cached_ms": cached,
               "cached_graph_ms": cached_graph, "episodic_device_bytes": memory.device_bytes,
               "host_bytes": memory.host_bytes}
        report["rows"].append(row)
        best_full = full_graph or full_ms
        ratios = [f"{best_full / ms:.2f}x" if best_full and ms else "-"
                  for ms in (cold_graph or cold, cached_graph or cached)]
        lines.append(f"| {context} | {fmt(full_ms)} ({fmt(full_graph)}) | "
                     f"{'does not fit' if full_bytes is None else f'{full_bytes / gib:.2f}'} | "
                     f"{cold:.2f} ({fmt(cold_graph)}) | {staged:.2f} | {cached:.2f} ({fmt(cached_graph)}) | "
                     f"{memory.device_bytes / gib:.2f} | {memory.host_bytes / gib:.1f} | {ratios[0]} | {ratios[1]} |")
        common.log(lines[-1])
        # every finished context survives a time limit; engine-free: no model, the shapes are in the run
        common.write_run("decode-step", None, device.type, report, report["device"])
        del memory
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
