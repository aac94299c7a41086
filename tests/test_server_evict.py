"""The host memory cap with the `evict` policy, through a real server: a request whose
memory outgrows the cap is served in full, the least recently retrieved pages go,
the server's host bytes stay within the cap, and the server keeps serving."""

from __future__ import annotations

import threading
import time

import pytest

from servers import PAGE_BYTES, SMALL, get, long_prompt, metric, post, wait_idle

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server_settings():
    # room for one and a half pages; the request below stores three
    return {**SMALL, "host_memory_gib": 1.5 * PAGE_BYTES / 2**30, "kept_memory_gib": 0,
            "host_memory_policy": "evict"}


def test_a_request_past_the_cap_is_served_evicting_its_oldest_pages(server):
    assert wait_idle(server)["vllm_episodic_tokens_held"] == 0
    body = {"model": "smollm2", "prompt": long_prompt(3600, 11), "max_tokens": 24, "ignore_eos": True,
            "temperature": 0}
    replies, peak = [], 0.0
    worker = threading.Thread(target=lambda: replies.append(post(server + "/v1/completions", body)))
    worker.start()
    deadline = time.time() + 300
    while worker.is_alive():
        assert time.time() < deadline, "the request did not finish"
        peak = max(peak, metric(get(server + "/metrics"), "vllm_episodic_host_bytes"))
        time.sleep(0.2)
    worker.join()
    assert replies and replies[0]["usage"]["completion_tokens"] == 24
    text = get(server + "/metrics")
    assert metric(text, "vllm_episodic_events_evicted_total") > 0
    assert metric(text, "vllm_episodic_requests_rejected_total") == 0
    assert 0 < peak <= 1.5 * PAGE_BYTES
    assert wait_idle(server)["vllm_episodic_host_bytes"] == 0
    again = post(server + "/v1/completions", {"model": "smollm2", "prompt": "Hello", "max_tokens": 4})
    assert again["usage"]["completion_tokens"] == 4
