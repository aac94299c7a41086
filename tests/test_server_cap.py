"""The host memory cap with the `reject` policy, through a real server: a new request
gets HTTP 503 with a clear message while memory is full, and is served once it frees."""

from __future__ import annotations

import json
import threading
import time

import pytest

from servers import PAGE_BYTES, SMALL, get, long_prompt, metric, post, post_status, wait_idle

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server_settings():
    # room for one page: a request that formed memory fills the cap
    return {**SMALL, "host_memory_gib": 1.5 * PAGE_BYTES / 2**30, "kept_memory_gib": None, "host_memory_policy": "reject"}


def test_new_requests_are_rejected_at_the_cap_and_served_after(server):
    assert wait_idle(server)["vllm_episodic_tokens_held"] == 0
    body = {"model": "smollm2", "prompt": long_prompt(3000, 7), "max_tokens": 150, "ignore_eos": True,
            "temperature": 0}
    worker = threading.Thread(target=post, args=(server + "/v1/completions", body))
    worker.start()
    deadline = time.time() + 120
    while metric(get(server + "/metrics"), "vllm_episodic_tokens_held") == 0:
        assert time.time() < deadline and worker.is_alive(), "the first request never formed memory"
        time.sleep(0.2)
    status, text = post_status(server + "/v1/completions", {"model": "smollm2", "prompt": "Hi", "max_tokens": 4})
    assert status == 503, text
    assert "episodic memory is full" in json.loads(text)["error"]["message"]
    assert metric(get(server + "/metrics"), "vllm_episodic_requests_rejected_total") == 1
    worker.join(timeout=300)
    wait_idle(server)
    status, text = post_status(server + "/v1/completions", {"model": "smollm2", "prompt": "Hi", "max_tokens": 4})
    assert status == 200, text
