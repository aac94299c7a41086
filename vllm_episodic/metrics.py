"""Prometheus metrics of the episodic memory, from the worker to vLLM's ``/metrics``.

The memory lives in the worker process; ``/metrics`` is served by the API-server
process from prometheus-client's default registry. The worker therefore publishes
a snapshot of its numbers as a small JSON file in a directory shared by all
processes of one server (``VLLM_EPISODIC_METRICS_DIR``, created by the first process
that loads the plugin and inherited by the processes it spawns), and a custom
collector in the API server turns the snapshots of all live workers into metric
families at scrape time. This leaves vLLM's own metrics and registries untouched.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

from vllm_episodic import envs

PREFIX = "vllm_episodic_"

# name -> (kind, help); the one table of our metrics
METRICS: dict[str, tuple[str, str]] = {
    "requests_tracked": ("gauge", "Requests whose memory the backend currently holds."),
    "tokens_held": ("gauge", "Tokens held in episodic memory (host event store) for live requests."),
    "host_bytes": ("gauge", "Host bytes used by the event stores of live requests and kept memories (keys, values, representatives; a shared page once)."),
    "kept_memories": ("gauge", "Finished requests' memories kept for requests that share their prefix."),
    "kept_bytes": ("gauge", "Host bytes held by kept memories (pages they share once)."),
    "tokens_reused": ("counter", "Prompt tokens not prefilled because a request attached to a kept memory."),
    "device_cache_tokens": ("gauge", "Event tokens resident in the device event caches."),
    "tokens_processed": ("counter", "Tokens whose attention the episodic backend computed."),
    "events_created": ("counter", "Events (episodes) formed from tokens leaving the local window."),
    "events_retrieved": ("counter", "Events selected by similarity or contiguity, summed over layers and steps."),
    "device_cache_hits": ("counter", "Retrieved event tokens already resident in the device event cache."),
    "device_cache_misses": ("counter", "Retrieved event tokens copied (prefetched) into the device event cache."),
    "events_evicted": ("counter", "Events dropped from the host store to stay under the host memory cap."),
    "requests_rejected": ("counter", "Requests rejected because the host memory cap was reached."),
    "prefetch_latency_seconds": ("histogram", "Time to copy the missing events of one layer into the device cache."),
}
HISTOGRAM_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
#: what every worker counts alike (each tensor-parallel rank and pipeline stage holds
#: every request and token, for its own KV heads and layers): taken from the first
#: worker alone (tensor-parallel rank 0 of the first stage); the others (bytes,
#: retrievals, caches) differ per worker and are summed over workers
REPLICATED = frozenset({"requests_tracked", "tokens_held", "kept_memories", "tokens_reused",
                        "tokens_processed", "events_created"})


@dataclass
class Stats:
    """The worker's running numbers; cheap to update on the hot path."""

    values: dict[str, float] = field(default_factory=dict)
    buckets: dict[str, list[int]] = field(default_factory=dict)

    def inc(self, name: str, amount: float = 1.0) -> None:
        self.values[name] = self.values.get(name, 0.0) + amount

    def set(self, name: str, value: float) -> None:
        self.values[name] = float(value)

    def observe(self, name: str, seconds: float) -> None:
        counts = self.buckets.setdefault(name, [0] * (len(HISTOGRAM_BUCKETS) + 1))
        index = next((i for i, b in enumerate(HISTOGRAM_BUCKETS) if seconds <= b), len(HISTOGRAM_BUCKETS))
        counts[index] += 1
        self.inc(name + "_sum", seconds)

    def get(self, name: str) -> float:
        return self.values.get(name, 0.0)


#: numbers counted in this process rather than a worker (the API server's admission
#: check); the collector, which runs in the API server, adds them to the workers'
local_stats = Stats()


def metrics_dir() -> str:
    """The directory shared by this server's processes, created on first use."""
    path = envs.get(envs.METRICS_DIR)
    if path:
        os.makedirs(path, exist_ok=True)
        return path
    path = tempfile.mkdtemp(prefix="vllm-episodic-metrics-")
    os.environ[envs.METRICS_DIR] = path  # inherited by the processes it spawns
    creator = os.getpid()
    atexit.register(lambda: os.getpid() == creator and shutil.rmtree(path, ignore_errors=True))
    return path


class StatsPublisher:
    """Writes the worker's snapshot atomically, at most every ``interval`` seconds."""

    def __init__(self, directory: str, interval: float = 0.2, tp_rank: int = 0, pp_rank: int = 0):
        self.path = os.path.join(directory, f"worker-{os.getpid()}.json")
        self.interval = interval
        self.tp_rank, self.pp_rank = tp_rank, pp_rank
        self._last = 0.0

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.interval

    def publish(self, stats: Stats, force: bool = False) -> None:
        if not force and not self.due():
            return
        self._last = time.monotonic()
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"pid": os.getpid(), "tp_rank": self.tp_rank, "pp_rank": self.pp_rank, "values": stats.values,
                       "buckets": stats.buckets}, f)
        os.replace(tmp, self.path)

    def close(self) -> None:
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_snapshots(directory: str) -> list[dict]:
    snapshots = []
    for name in sorted(os.listdir(directory)):
        if not (name.startswith("worker-") and name.endswith(".json")):
            continue
        try:
            with open(os.path.join(directory, name)) as f:
                snapshot = json.load(f)
        except (OSError, ValueError):
            continue
        if _alive(int(snapshot.get("pid", -1))):
            snapshots.append(snapshot)
    return snapshots


def summed(snapshots: list[dict]) -> dict[str, float]:
    """The snapshots' values added up: over workers, except the ``REPLICATED`` ones (from
    tensor-parallel rank 0 of the first pipeline stage)."""
    total: dict[str, float] = {}
    for snap in snapshots:
        first = snap.get("tp_rank", 0) == 0 and snap.get("pp_rank", 0) == 0
        for name, value in snap["values"].items():
            if first or name not in REPLICATED:
                total[name] = total.get(name, 0.0) + value
    return total


class EpisodicCollector:
    """prometheus-client collector over the snapshots of all live workers."""

    def __init__(self, directory: str):
        self.directory = directory

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        snapshots = read_snapshots(self.directory) + [{"values": local_stats.values, "buckets": {}}]
        total = summed(snapshots)
        buckets: dict[str, list[int]] = {}
        for snap in snapshots:
            for name, counts in snap["buckets"].items():
                acc = buckets.setdefault(name, [0] * len(counts))
                buckets[name] = [a + c for a, c in zip(acc, counts)]
        for name, (kind, help_text) in METRICS.items():
            full = PREFIX + name
            if kind == "gauge":
                yield GaugeMetricFamily(full, help_text, value=total.get(name, 0.0))
            elif kind == "counter":
                yield CounterMetricFamily(full, help_text, value=total.get(name, 0.0))
            else:
                counts = buckets.get(name, [0] * (len(HISTOGRAM_BUCKETS) + 1))
                cumulative, running = [], 0
                for bound, count in zip((*HISTOGRAM_BUCKETS, float("inf")), counts):
                    running += count
                    cumulative.append((str(bound) if bound != float("inf") else "+Inf", running))
                yield HistogramMetricFamily(
                    full, help_text, buckets=cumulative, sum_value=total.get(name + "_sum", 0.0)
                )
        hits, misses = total.get("device_cache_hits", 0.0), total.get("device_cache_misses", 0.0)
        yield GaugeMetricFamily(
            PREFIX + "device_cache_hit_rate",
            "Fraction of retrieved events found in the device event cache.",
            value=hits / (hits + misses) if hits + misses else 0.0,
        )


_collector_registered = False


def register_collector() -> None:
    """Expose the workers' numbers on this process's default registry (once)."""
    global _collector_registered
    if _collector_registered:
        return
    from prometheus_client import REGISTRY

    REGISTRY.register(EpisodicCollector(metrics_dir()))
    _collector_registered = True
