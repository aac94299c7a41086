"""Tensor and pipeline parallel through vLLM's own executor: `vllm serve
--tensor-parallel-size 2` and `--pipeline-parallel-size 2` with the episodic backend, one
CPU core per worker.

Each tensor-parallel rank holds every token's memory for its own KV heads, each pipeline
stage for its own layers. What must hold: the workers cut the same events (one surprise
per token: from the logits vLLM gathers on every tensor-parallel rank; sent back by the
last pipeline stage to the first), each holds its share of the host bytes, an aborted
request leaves no memory on any worker, and /metrics counts requests and tokens once
while it sums bytes over workers. The model is a small random Qwen2 (4 layers, 2 KV
heads: one head per rank, two layers per stage): the mechanics, not the answers, are
under test."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import tiny_model
from servers import SMALL, abandon, get, long_prompt, metric, post, running_server

pytestmark = pytest.mark.server

VOCAB = 49152  # SmolLM2's tokenizer


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory, model_dir) -> str:
    import transformers

    config = transformers.Qwen2Config(num_hidden_layers=4, hidden_size=256, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=512, vocab_size=VOCAB,
                                      max_position_embeddings=8192, torch_dtype="float32")
    return tiny_model(transformers.Qwen2ForCausalLM(config), tmp_path_factory.mktemp("qwen2-tp"), model_dir)


@pytest.fixture(scope="module", params=["tensor", "pipeline"])
def parallel_server(request, tiny_qwen, tmp_path_factory):
    """A server whose two workers split the model (yields its URL, the workers' snapshot
    folder and which rank field tells the workers apart)."""
    snapshots = tmp_path_factory.mktemp("metrics")
    environ = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_EPISODIC_METRICS_DIR": str(snapshots)}
    with running_server(tiny_qwen, SMALL, f"--{request.param}-parallel-size", "2", environ=environ) as base:
        yield base, snapshots, "tp_rank" if request.param == "tensor" else "pp_rank"


def _ranks(snapshots: Path, rank: str) -> dict[int, dict[str, float]]:
    """Each worker's published numbers, by its tensor-parallel rank or pipeline stage."""
    found = {}
    for path in snapshots.glob("worker-*.json"):
        snap = json.loads(path.read_text())
        found[snap[rank]] = snap["values"]
    return found


def _settled(base: str, snapshots: Path, rank: str, timeout: float = 120) -> dict[int, dict[str, float]]:
    """The workers' numbers once no request is held on any (and both have published)."""
    deadline = time.time() + timeout
    while True:
        ranks = _ranks(snapshots, rank)
        if (len(ranks) == 2 and all(r.get("requests_tracked", 0) == 0 for r in ranks.values())
                and ranks[0].get("tokens_processed") == ranks[1].get("tokens_processed")) or time.time() > deadline:
            return ranks
        time.sleep(0.5)


def test_workers_cut_the_same_events_and_share_the_bytes(parallel_server):
    base, snapshots, rank = parallel_server
    prompt = long_prompt(1500, seed=5)
    reply = post(base + "/v1/completions", {"model": "smollm2", "prompt": prompt,
                                            "max_tokens": 16, "ignore_eos": True, "temperature": 0})
    assert reply["usage"]["completion_tokens"] == 16
    ranks = _settled(base, snapshots, rank)
    assert sorted(ranks) == [0, 1]
    first, second = ranks[0], ranks[1]
    assert first["events_created"] > 0
    # one surprise per token on every worker: the same events, the same tokens
    assert first["events_created"] == second["events_created"]
    assert first["tokens_processed"] == second["tokens_processed"]
    # each keeps the finished request's memory for its KV head or its layers: equal
    # halves (the last stage also keeps the logits the next token's surprise comes from)
    logits = VOCAB * 4 if rank == "pp_rank" else 0
    assert first["host_bytes"] > 0 and first["host_bytes"] + logits == second["host_bytes"]
    text = get(base + "/metrics")
    assert metric(text, "vllm_episodic_tokens_processed_total") == first["tokens_processed"]
    assert metric(text, "vllm_episodic_events_created_total") == first["events_created"]
    assert metric(text, "vllm_episodic_host_bytes") == first["host_bytes"] + second["host_bytes"]
    assert metric(text, "vllm_episodic_kept_memories") == first["kept_memories"] == 1
    # a follow-up attaches to the kept memory on every worker and goes on alike
    follow = post(base + "/v1/completions", {"model": "smollm2", "prompt": prompt + reply["choices"][0]["text"] + " And?",
                                             "max_tokens": 8, "ignore_eos": True, "temperature": 0})
    assert follow["usage"]["completion_tokens"] == 8
    ranks = _settled(base, snapshots, rank)
    assert ranks[0]["tokens_reused"] > 0 and ranks[1]["tokens_reused"] == ranks[0]["tokens_reused"]
    assert ranks[0]["events_created"] > first["events_created"]
    assert ranks[0]["events_created"] == ranks[1]["events_created"]


def test_aborted_requests_leave_no_memory_on_any_worker(parallel_server):
    base, snapshots, rank = parallel_server
    cycles = [({"model": "smollm2", "prompt": long_prompt(1600 + 50 * i, seed=20 + i), "max_tokens": 200,
                "ignore_eos": True, "temperature": 0}, 0 if i % 2 else 3, 0.5 + 0.2 * i) for i in range(6)]
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda c: abandon(base, *c), cycles))
    ranks = _settled(base, snapshots, rank, timeout=240)
    for worker in (0, 1):
        assert ranks[worker]["requests_tracked"] == 0
        assert ranks[worker]["tokens_held"] == 0
        assert ranks[worker]["device_cache_tokens"] == 0
        # what stays is kept memories only
        assert ranks[worker]["host_bytes"] == ranks[worker]["kept_bytes"]
    reply = post(base + "/v1/completions", {"model": "smollm2", "prompt": "Hello", "max_tokens": 4})
    assert reply["usage"]["completion_tokens"] == 4
