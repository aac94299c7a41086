"""Through the real CLI: `vllm serve ... --attention-backend episodic` in a subprocess."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from servers import abandon, env, free_port, get, log_path, long_prompt, metric, post, post_status, serve_args, wait_idle

pytestmark = pytest.mark.server


@pytest.mark.parametrize(
    "settings, fragments",
    [
        ({"window_tokens": "big"}, ["window_tokens", "valid integer"]),
        ({"segmentation": "random"}, ["segmentation", "'surprise' or 'fixed'"]),
        ({"windw_tokens": 10}, ["unknown key 'windw_tokens'", "valid keys", "window_tokens"]),
        ({"retrieval_budget_tokens": 64}, ["retrieval_budget_tokens (64)", "max_event_tokens (128)"]),
        ({"window_tokens": 7900}, ["exceed the model's trained length 8192", "lower window_tokens"]),
    ],
)
def test_invalid_config_fails_startup_naming_the_field(model_dir, settings, fragments):
    args = serve_args(model_dir, free_port(), "--additional-config",
                       json.dumps({"episodic": settings}))
    args[args.index("8192")] = "32768"  # past the trained length: bounded positions
    proc = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-2000:]
    for fragment in fragments:
        assert fragment in output, output[-3000:]


def test_chat_completion_answers(server):
    reply = post(server + "/v1/chat/completions", {
        "model": "smollm2", "temperature": 0, "max_tokens": 16,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    })
    assert "Paris" in reply["choices"][0]["message"]["content"]


def test_startup_log_says_which_settings_came_from_the_model(server):
    """The module's server gives window and budget (``servers.SMALL``); the other sizes
    are derived from SmolLM2's trained 8K, and vLLM's start-up log says which is which."""
    log = log_path(server.rsplit(":", 1)[1]).read_text()
    lines = [line for line in log.splitlines() if "episodic: from the model" in line]
    assert lines, log[-3000:]
    assert "(trained length 8192): bounded_budget_tokens=None, retrieval_interval=8, prefill_chunk_tokens=2048" in lines[0]
    assert "given: window_tokens=256, retrieval_budget_tokens=256" in lines[0]


def test_worker_metrics_reach_the_api_servers_metrics(server):
    before = metric(get(server + "/metrics"), "vllm_episodic_tokens_processed_total")
    reply = post(server + "/v1/completions", {
        "model": "smollm2", "prompt": "Once upon a time", "max_tokens": 20,
        "temperature": 0, "ignore_eos": True,
    })
    used = reply["usage"]["prompt_tokens"] + reply["usage"]["completion_tokens"]
    # the worker publishes at most every 0.2 s and on every release
    deadline = time.time() + 10
    while True:
        text = get(server + "/metrics")
        processed = metric(text, "vllm_episodic_tokens_processed_total")
        tracked = metric(text, "vllm_episodic_requests_tracked")
        if (processed - before >= used - 1 and tracked == 0) or time.time() > deadline:
            break
        time.sleep(0.2)
    # every token but the last sampled one went through the worker's attention
    assert processed - before == used - 1
    assert tracked == 0  # the finished request was released, on an idle server too
    for name in ("vllm_episodic_tokens_held", "vllm_episodic_events_created_total",
                 "vllm_episodic_host_bytes", "vllm_episodic_device_cache_hit_rate"):
        metric(text, name)
    assert "vllm:" in text  # vLLM's own metrics are still there


def test_a_follow_up_turn_reuses_the_kept_memory_across_processes(server):
    """Through the API (scheduler and worker in separate processes): the second turn of
    a conversation past the window attaches to the first turn's kept memory."""
    messages = [{"role": "user", "content": long_prompt(1500, seed=77) + " What is the special magic number?"}]
    body = {"model": "smollm2", "temperature": 0, "max_tokens": 12, "messages": messages}
    first = post(server + "/v1/chat/completions", body)
    wait_idle(server)
    reused = metric(get(server + "/metrics"), "vllm_episodic_tokens_reused_total")
    messages += [first["choices"][0]["message"], {"role": "user", "content": "Say it again."}]
    second = post(server + "/v1/chat/completions", body)
    assert second["choices"][0]["message"]["content"]
    text = get(server + "/metrics")
    assert metric(text, "vllm_episodic_tokens_reused_total") - reused > 1500
    assert metric(text, "vllm_episodic_kept_memories") >= 1


def test_aborted_clients_leave_no_memory_behind(server):
    """50 clients disconnect mid-prefill or mid-decode; the server ends with no request
    memory held (host bytes, event-cache slots) and keeps serving."""
    from concurrent.futures import ThreadPoolExecutor

    baseline = wait_idle(server)
    # what an idle server holds is kept memories (for requests that share a prefix)
    assert baseline["vllm_episodic_host_bytes"] == baseline["vllm_episodic_kept_bytes"]
    cycles = []
    for i in range(50):
        body = {"model": "smollm2", "prompt": long_prompt(1600 + 40 * i, seed=i), "max_tokens": 200,
                "ignore_eos": True, "temperature": 0}
        cycles.append((body, 0 if i % 2 else 3, 0.3 + 0.1 * (i % 5)))
    with ThreadPoolExecutor(5) as pool:
        list(pool.map(lambda c: abandon(server, *c), cycles))
    after = wait_idle(server, timeout=180)
    assert after["vllm_episodic_events_created_total"] > baseline["vllm_episodic_events_created_total"]
    assert after["vllm_episodic_requests_tracked"] == 0
    assert after["vllm_episodic_host_bytes"] == after["vllm_episodic_kept_bytes"]
    assert after["vllm_episodic_tokens_held"] == 0
    assert after["vllm_episodic_device_cache_tokens"] == 0
    reply = post(server + "/v1/completions", {"model": "smollm2", "prompt": "Hello", "max_tokens": 4})
    assert reply["usage"]["completion_tokens"] == 4


def test_bad_requests_get_vllms_errors_and_the_server_stays_up(server):
    url = server + "/v1/completions"
    too_long, text = post_status(url, {"model": "smollm2", "prompt": long_prompt(9000, 1), "max_tokens": 4})
    assert too_long == 400 and "8192" in text, text  # vLLM's own message names the limit
    huge, text = post_status(url, {"model": "smollm2", "prompt": "Hi", "max_tokens": 10**9})
    assert huge == 400
    empty, text = post_status(url, {"model": "smollm2", "prompt": "", "max_tokens": 4})
    assert empty == 400 and "non-empty" in text, text  # vLLM's own message
    status, text = post_status(url, {"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 4})
    assert status == 200 and json.loads(text)["usage"]["completion_tokens"] == 4
