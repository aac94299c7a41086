"""The API server's collector sums the snapshots of every live worker (and its own
counts) into the metric families on /metrics; a dead worker's snapshot is ignored."""

from __future__ import annotations

import os
import subprocess
import sys

from vllm_episodic.metrics import HISTOGRAM_BUCKETS, PREFIX, EpisodicCollector, Stats, StatsPublisher


def _families(directory: str) -> dict[str, object]:
    return {family.name: family for family in EpisodicCollector(directory).collect()}


def _value(family, suffix: str = "") -> float:
    (sample,) = [s for s in family.samples if s.name == family.name + suffix]
    return sample.value


def test_the_collector_sums_live_workers_and_ignores_dead_ones(tmp_path, monkeypatch):
    from vllm_episodic import metrics

    monkeypatch.setattr(metrics, "local_stats", Stats())  # this process's own counts: none
    one, two = Stats(), Stats()
    one.set("host_bytes", 1000)
    one.inc("events_created", 3)
    one.inc("device_cache_hits", 3)
    one.inc("device_cache_misses", 1)
    one.observe("prefetch_latency_seconds", 2e-5)
    two.set("host_bytes", 500)
    two.inc("events_created", 4)
    two.observe("prefetch_latency_seconds", 0.5)
    two.observe("prefetch_latency_seconds", 0.05)
    live = StatsPublisher(str(tmp_path))
    live.publish(one, force=True)
    # another live worker: this process's snapshot under another name (the pid stays ours)
    os.replace(live.path, tmp_path / "worker-a.json")
    live.publish(two, force=True)
    # a worker that exited without removing its snapshot
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "worker-dead.json").write_text(
        f'{{"pid": {int(dead.stdout)}, "values": {{"host_bytes": 1e9}}, "buckets": {{}}}}')

    families = _families(str(tmp_path))
    assert _value(families[PREFIX + "host_bytes"]) == 1500
    assert _value(families[PREFIX + "events_created"], "_total") == 7
    assert _value(families[PREFIX + "device_cache_hit_rate"]) == 0.75
    histogram = families[PREFIX + "prefetch_latency_seconds"]
    cumulative = {s.labels["le"]: s.value for s in histogram.samples if s.name.endswith("_bucket")}
    assert cumulative[str(HISTOGRAM_BUCKETS[1])] == 1  # 2e-5 <= 3e-5
    assert cumulative["0.1"] == 2 and cumulative["1.0"] == 3 and cumulative["+Inf"] == 3
    assert abs(_value(histogram, "_sum") - (2e-5 + 0.5 + 0.05)) < 1e-12


def test_parallel_workers_count_requests_once_and_sum_bytes(tmp_path, monkeypatch):
    """Every worker (tensor-parallel rank × pipeline stage) holds every request and token
    (for its own KV heads and layers): those counts come from the first worker; bytes
    and retrievals differ per worker and are summed."""
    from vllm_episodic import metrics

    monkeypatch.setattr(metrics, "local_stats", Stats())
    workers = [(0, 0, 600, 10), (1, 0, 400, 12), (0, 1, 500, 7), (1, 1, 300, 9)]
    for tp_rank, pp_rank, nbytes, retrieved in workers:
        stats = Stats()
        stats.set("tokens_held", 4000)
        stats.set("requests_tracked", 2)
        stats.set("host_bytes", nbytes)
        stats.inc("events_created", 30)
        stats.inc("events_retrieved", retrieved)
        publisher = StatsPublisher(str(tmp_path), tp_rank=tp_rank, pp_rank=pp_rank)
        publisher.publish(stats, force=True)
        os.replace(publisher.path, tmp_path / f"worker-tp{tp_rank}-pp{pp_rank}.json")
    families = _families(str(tmp_path))
    assert _value(families[PREFIX + "tokens_held"]) == 4000
    assert _value(families[PREFIX + "requests_tracked"]) == 2
    assert _value(families[PREFIX + "events_created"], "_total") == 30
    assert _value(families[PREFIX + "host_bytes"]) == 1800
    assert _value(families[PREFIX + "events_retrieved"], "_total") == 38
