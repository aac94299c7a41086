"""Tensor parallel through vLLM's own executor: `vllm serve --tensor-parallel-size 2`
with the episodic backend, one CPU core per rank.

Each rank holds every token's memory for its own KV heads. What must hold: the ranks
cut the same events (one surprise per token, from the logits vLLM gathers on every
rank), each holds its share of the host bytes, an aborted request leaves no memory on
any rank, and /metrics counts requests and tokens once while it sums bytes over ranks.
The model is a small random Qwen2 (2 KV heads, one per rank): the mechanics, not the
answers, are under test."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import tiny_model
from servers import SMALL, abandon, get, long_prompt, metric, post, running_server

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory, model_dir) -> str:
    import transformers

    config = transformers.Qwen2Config(num_hidden_layers=2, hidden_size=256, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=512, vocab_size=49152,
                                      max_position_embeddings=8192, torch_dtype="float32")
    return tiny_model(transformers.Qwen2ForCausalLM(config), tmp_path_factory.mktemp("qwen2-tp"), model_dir)


@pytest.fixture(scope="module")
def tp_server(tiny_qwen, tmp_path_factory):
    snapshots = tmp_path_factory.mktemp("metrics")
    environ = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_EPISODIC_METRICS_DIR": str(snapshots)}
    with running_server(tiny_qwen, SMALL, "--tensor-parallel-size", "2", environ=environ) as base:
        yield base, snapshots


def _ranks(snapshots: Path) -> dict[int, dict[str, float]]:
    """Each worker's published numbers, by tensor-parallel rank."""
    found = {}
    for path in snapshots.glob("worker-*.json"):
        snap = json.loads(path.read_text())
        found[snap["tp_rank"]] = snap["values"]
    return found


def _settled(base: str, snapshots: Path, timeout: float = 120) -> dict[int, dict[str, float]]:
    """The ranks' numbers once no request is held on any rank (and both have published)."""
    deadline = time.time() + timeout
    while True:
        ranks = _ranks(snapshots)
        if (len(ranks) == 2 and all(r.get("requests_tracked", 0) == 0 for r in ranks.values())
                and ranks[0].get("tokens_processed") == ranks[1].get("tokens_processed")) or time.time() > deadline:
            return ranks
        time.sleep(0.5)


def test_ranks_cut_the_same_events_and_share_the_bytes(tp_server):
    base, snapshots = tp_server
    reply = post(base + "/v1/completions", {"model": "smollm2", "prompt": long_prompt(1500, seed=5),
                                            "max_tokens": 16, "ignore_eos": True, "temperature": 0})
    assert reply["usage"]["completion_tokens"] == 16
    ranks = _settled(base, snapshots)
    assert sorted(ranks) == [0, 1]
    first, second = ranks[0], ranks[1]
    assert first["events_created"] > 0
    # one surprise per token on every rank: the same events, the same tokens
    assert first["events_created"] == second["events_created"]
    assert first["tokens_processed"] == second["tokens_processed"]
    # each rank keeps the finished request's memory for its own KV head: equal halves
    assert first["host_bytes"] > 0 and first["host_bytes"] == second["host_bytes"]
    text = get(base + "/metrics")
    assert metric(text, "vllm_episodic_tokens_processed_total") == first["tokens_processed"]
    assert metric(text, "vllm_episodic_events_created_total") == first["events_created"]
    assert metric(text, "vllm_episodic_host_bytes") == first["host_bytes"] + second["host_bytes"]
    assert metric(text, "vllm_episodic_kept_memories") == first["kept_memories"] == 1


def test_aborted_requests_leave_no_memory_on_any_rank(tp_server):
    base, snapshots = tp_server
    cycles = [({"model": "smollm2", "prompt": long_prompt(1600 + 50 * i, seed=20 + i), "max_tokens": 200,
                "ignore_eos": True, "temperature": 0}, 0 if i % 2 else 3, 0.5 + 0.2 * i) for i in range(6)]
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda c: abandon(base, *c), cycles))
    ranks = _settled(base, snapshots, timeout=240)
    for rank in (0, 1):
        assert ranks[rank]["requests_tracked"] == 0
        assert ranks[rank]["tokens_held"] == 0
        assert ranks[rank]["device_cache_tokens"] == 0
        # what stays is kept memories only
        assert ranks[rank]["host_bytes"] == ranks[rank]["kept_bytes"]
    reply = post(base + "/v1/completions", {"model": "smollm2", "prompt": "Hello", "max_tokens": 4})
    assert reply["usage"]["completion_tokens"] == 4
