"""The GPU-shaped serving path on this CPU: vLLM's Triton attention backend under
Triton's interpreter (``VLLM_EPISODIC_TRITON_ON_CPU=1``), stock and episodic.

The Triton runs happen in a process of their own (``triton_path.py``: the switch
changes what every engine of a process selects), and so do the CPU op's on the same
prompts (the session's engines already fill most of the machine's memory); one-layer
cut of SmolLM2 (every kernel launch is interpreted: ~0.1 s a program), float32. Tolerance on log-probabilities: 1e-5 (two kernels summing in other orders:
measured under 1e-6; what memory changes on this one-layer model is ~1e-3).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import cut_model
from vllm_episodic.workloads import filler_text

pytestmark = pytest.mark.engine

# memory forms past 32 + 64 tokens; a 32-token budget is smaller than what the long
# prompt leaves in memory, so decode steps retrieve; `dot` scoring runs our Triton
# scoring kernel (`mass` scoring is torch on every device)
TINY = {
    "sink_tokens": 32, "window_tokens": 64, "retrieval_budget_tokens": 32,
    "min_event_tokens": 4, "max_event_tokens": 16, "device_event_cache_tokens": 64,
    "representatives_dtype": "float32", "kept_memory_gib": 0, "retrieval_scoring": "dot",
    "retrieval_interval": 1,  # every decode step retrieves (the model's default: every 8th)
}
MAX_TOKENS = 6
# the CPU op takes multiples of 32 (its default, 128, would round the sinks and window up)
BLOCK_SIZE = 32
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def one_layer(model_dir, tmp_path_factory):
    return str(cut_model(model_dir, tmp_path_factory.mktemp("smollm2-1-layer"), layers=1))


@pytest.fixture(scope="module")
def prompts(one_layer):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(one_layer)
    short = tokenizer(filler_text(30, seed=3))["input_ids"][:40]  # + 6 new tokens: inside sinks + window
    long = tokenizer(filler_text(200, seed=4))["input_ids"][:220]
    return {"short": short, "long": long}


def _run(platform_op: str, one_layer: str, prompts: dict, tmp_path_factory) -> dict:
    spec = tmp_path_factory.mktemp(platform_op) / "spec.json"
    spec.write_text(json.dumps({"prompts": prompts, "max_tokens": MAX_TOKENS, "block_size": BLOCK_SIZE,
                                "episodic": TINY, "abort": "long"}))
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, str(root / "tests" / "triton_path.py"), platform_op, one_layer,
                           str(spec)], capture_output=True, text=True, timeout=900, cwd=root)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def triton_run(one_layer, prompts, tmp_path_factory):
    return _run("triton", one_layer, prompts, tmp_path_factory)


@pytest.fixture(scope="module")
def cpu_run(one_layer, prompts, tmp_path_factory):
    return _run("cpu", one_layer, prompts, tmp_path_factory)


def _same(mine: dict, theirs: dict) -> None:
    assert mine["tokens"] == theirs["tokens"]
    assert max(abs(a - b) for a, b in zip(mine["logprobs"], theirs["logprobs"])) < TOLERANCE


def test_stock_triton_attn_under_the_interpreter_gives_the_cpu_ops_output(triton_run, cpu_run, prompts):
    assert triton_run["stock"]["impl"] == "TritonAttentionImpl" and cpu_run["stock"]["impl"] == "CPUAttentionBackendImpl"
    assert triton_run["stock_launches"]["unified_attention"] > 0
    for name in prompts:
        _same(triton_run["stock"][name], cpu_run["stock"][name])


def test_episodic_triton_backend_inside_the_window_is_stock_triton(triton_run):
    """While the context fits sinks + window, the episodic backend is the stock kernel
    over the request's own blocks: token-identical, same log-probabilities."""
    assert triton_run["episodic"]["impl"] == "EpisodicTritonImpl"
    assert triton_run["episodic"]["short"]["tokens"] == triton_run["stock"]["short"]["tokens"]
    assert triton_run["episodic"]["short"]["logprobs"] == triton_run["stock"]["short"]["logprobs"]


def test_episodic_triton_backend_with_memory_is_the_cpu_backend(triton_run, cpu_run):
    """Past sinks + window: events form, decode steps retrieve (scored by our Triton
    kernel) and the event cache is filled through our Triton gather; the output is the
    CPU backend's."""
    assert triton_run["stats"]["events_created"] > 0 and triton_run["stats"]["device_cache_misses"] > 0
    launches = triton_run["episodic_launches"]
    assert launches["unified_attention"] > 0, launches
    assert launches.get("score_events_triton", 0) > 0 and launches.get("gather_rotate_triton", 0) > 0, launches
    assert cpu_run["episodic"]["impl"] == "EpisodicCPUImpl" and cpu_run["stats"] == triton_run["stats"]
    _same(triton_run["episodic"]["long"], cpu_run["episodic"]["long"])
    # and memory is what it attended: stock's output over the whole context differs
    moved = zip(triton_run["episodic"]["long"]["logprobs"], triton_run["stock"]["long"]["logprobs"])
    assert max(abs(a - b) for a, b in moved) > 10 * TOLERANCE


def test_an_aborted_request_on_the_triton_path_frees_everything(triton_run):
    assert triton_run["held_before_abort"] == 1
    assert triton_run["held_after_abort"] == 0 and triton_run["host_bytes_after_abort"] == 0


def test_the_switch_without_the_interpreter_fails_naming_it(monkeypatch):
    from vllm_episodic.integration import triton_on_cpu

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        triton_on_cpu.install()
