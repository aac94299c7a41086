"""Soak: N concurrent long requests for T minutes against `vllm serve --attention-backend
episodic` on 127.0.0.1, with random client aborts mid-prefill and mid-decode.

    python benchmarks/soak.py --concurrency 16 --minutes 30

Bounded in time (``--minutes``) and count (``--max-requests``). Every
``--sample-seconds`` it records the server's episodic gauges from ``/metrics`` (host
bytes, device cache tokens, requests tracked) and the resident memory of the server's
processes. At the end, once the server is idle, it checks that host bytes and tracked
requests are back to zero. Prints errors and latency percentiles and puts the run under
the label ``--tag`` (without its dash; ``default`` without one) in
benchmarks/results/soak-<model>-<machine>.json, its plot beside it
(soak-<model>-<machine>-<label>.png).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from vllm_episodic.workloads import filler_text  # noqa: E402

GAUGES = ["vllm_episodic_host_bytes", "vllm_episodic_device_cache_tokens", "vllm_episodic_requests_tracked",
          "vllm_episodic_events_created_total", "vllm_episodic_requests_rejected_total"]


def rss_bytes(root_pid: int) -> int:
    """Resident bytes of a process and its descendants (Linux /proc)."""
    pids, total = [root_pid], 0
    while pids:
        pid = pids.pop()
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{pid}/task").iterdir():
                children = (task / "children").read_text().split()
                pids.extend(int(c) for c in children)
        except (OSError, ValueError):
            continue
    return total


class Soak:
    def __init__(self, base: str, args, server_pid: int):
        self.base, self.args, self.server_pid = base, args, server_pid
        self.rng = random.Random(args.seed)
        self.results: list[dict] = []
        self.samples: list[dict] = []
        self.started = 0
        self.deadline = time.monotonic() + 60 * args.minutes
        self.began = time.monotonic()

    def _prompt(self) -> tuple[str, int]:
        tokens = self.rng.randint(*self.args.prompt_tokens)
        return filler_text(tokens, seed=self.rng.randint(0, 1 << 30)) + "\nSummarize the text above.", tokens

    async def one(self, session: aiohttp.ClientSession) -> None:
        prompt, tokens = self._prompt()
        roll = self.rng.random()
        # abort mid-prefill (before the first token), mid-decode (after some tokens), or not at all
        mode = "prefill" if roll < self.args.abort_rate / 2 else "decode" if roll < self.args.abort_rate else "none"
        body = {"model": "model", "prompt": prompt, "max_tokens": self.args.max_tokens, "stream": True,
                "ignore_eos": True, "temperature": 0.0}
        record = {"prompt_tokens": tokens, "abort": mode, "start": time.monotonic() - self.began}
        began = time.monotonic()
        try:
            if mode == "prefill":
                await asyncio.wait_for(self._stream(session, body, record, None), self.rng.uniform(0.2, 3.0))
            else:
                stop_after = self.rng.randint(1, self.args.max_tokens - 1) if mode == "decode" else None
                await self._stream(session, body, record, stop_after)
            record.setdefault("outcome", "completed")
        except asyncio.TimeoutError as e:
            # our own mid-prefill abort, or a read that timed out (an error)
            if mode == "prefill" and isinstance(e, TimeoutError) and not isinstance(e, aiohttp.ClientError):
                record["outcome"] = "aborted"
            else:
                record["outcome"], record["error"] = "error", repr(e)
        except aiohttp.ClientError as e:
            record["outcome"], record["error"] = "error", repr(e)
        record["latency_s"] = time.monotonic() - began
        self.results.append(record)

    async def _stream(self, session, body, record, stop_after: int | None) -> None:
        began = time.monotonic()
        async with session.post(f"{self.base}/v1/completions", json=body) as response:
            if response.status != 200:
                record["outcome"] = "rejected" if response.status == 503 else "error"
                record["error"] = f"HTTP {response.status}: {(await response.text())[:200]}"
                return
            chunks = 0
            async for line in response.content:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                chunks += 1
                if chunks == 1:
                    record["ttft_s"] = time.monotonic() - began
                if stop_after is not None and chunks >= stop_after:
                    record["outcome"] = "aborted"
                    return  # leaving the context manager closes the connection: vLLM aborts
            record["output_chunks"] = chunks

    async def worker(self, session) -> None:
        while time.monotonic() < self.deadline and self.started < self.args.max_requests:
            self.started += 1
            await self.one(session)

    async def sampler(self, session, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.sample(session)
            try:
                await asyncio.wait_for(stop.wait(), self.args.sample_seconds)
            except asyncio.TimeoutError:
                pass

    async def sample(self, session) -> dict:
        async with session.get(f"{self.base}/metrics") as response:
            text = await response.text()
        row = {"t": time.monotonic() - self.began, "rss_bytes": rss_bytes(self.server_pid),
               "done": len(self.results)}
        for name in GAUGES:
            row[name] = common.metric(text, name)
        self.samples.append(row)
        common.log(f"t={row['t']:.0f}s done={row['done']} host={row['vllm_episodic_host_bytes'] or 0:.3g} B "
                   f"tracked={row['vllm_episodic_requests_tracked']} rss={row['rss_bytes'] / 2**30:.2f} GiB")
        return row

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_read=self.args.request_timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            stop = asyncio.Event()
            sampler = asyncio.create_task(self.sampler(session, stop))
            await asyncio.gather(*(self.worker(session) for _ in range(self.args.concurrency)))
            # idle: aborted requests must have released everything
            await asyncio.sleep(self.args.settle_seconds)
            stop.set()
            await sampler
            self.final = await self.sample(session)


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": ordered[-1]}


def plot(samples: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] / 60 for s in samples]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(t, [(s["vllm_episodic_host_bytes"] or 0) / 2**30 for s in samples])
    axes[0].set_title("episodic host store (GiB)")
    axes[1].plot(t, [s["vllm_episodic_device_cache_tokens"] or 0 for s in samples], label="device cache tokens")
    axes[1].plot(t, [s["vllm_episodic_requests_tracked"] or 0 for s in samples], label="requests tracked")
    axes[1].set_yscale("symlog")
    axes[1].legend()
    axes[1].set_title("device event cache, requests")
    axes[2].plot(t, [s["rss_bytes"] / 2**30 for s in samples])
    axes[2].set_title("server resident memory (GiB)")
    for ax in axes:
        ax.set_xlabel("minutes")
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--max-requests", type=int, default=1000)
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=[2000, 12000])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--abort-rate", type=float, default=0.3)
    parser.add_argument("--max-model-len", type=int, default=32768)
    parser.add_argument("--episodic", default='{"preset": "smollm2"}')
    parser.add_argument("--sample-seconds", type=float, default=15)
    parser.add_argument("--settle-seconds", type=float, default=10)
    parser.add_argument("--request-timeout", type=float, default=900)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()

    model_dir = common.resolve_model(args.model)
    with common.serve(model_dir, "episodic", args.max_model_len, episodic=json.loads(args.episodic)) as base:
        soak = Soak(base, args, common.server_pid(base))
        asyncio.run(soak.run())
    results = soak.results
    by = {k: [r for r in results if r["outcome"] == k] for k in ("completed", "aborted", "rejected", "error")}
    report = {
        "machine": common.machine(), "args": vars(args), "requests": len(results),
        "outcomes": {k: len(v) for k, v in by.items()},
        "latency_s": percentiles([r["latency_s"] for r in by["completed"]]),
        "ttft_s": percentiles([r["ttft_s"] for r in results if "ttft_s" in r]),
        "errors": [r["error"] for r in by["error"]][:20],
        "final": soak.final, "peak_rss_bytes": max(s["rss_bytes"] for s in soak.samples),
        "first_rss_bytes": soak.samples[0]["rss_bytes"], "samples": soak.samples, "results": results,
    }
    label = common.run_label(args.tag)
    path = common.write_run("soak", args.model, label, report)
    plot(soak.samples, path.with_name(f"{path.stem}-{label}.png"),
         f"soak: {args.concurrency} concurrent x {args.minutes} min, {report['machine']}")
    print(json.dumps({k: report[k] for k in ("requests", "outcomes", "latency_s", "ttft_s", "errors")}, indent=1))
    print(f"after the run: host bytes {soak.final['vllm_episodic_host_bytes']}, tracked "
          f"{soak.final['vllm_episodic_requests_tracked']}, rss {soak.final['rss_bytes'] / 2**30:.2f} GiB "
          f"(first sample {report['first_rss_bytes'] / 2**30:.2f}, peak {report['peak_rss_bytes'] / 2**30:.2f})")
    leaked = (soak.final["vllm_episodic_host_bytes"] or 0) > 0 or (soak.final["vllm_episodic_requests_tracked"] or 0) > 0
    return 1 if by["error"] or leaked else 0


if __name__ == "__main__":
    raise SystemExit(main())
