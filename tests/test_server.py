"""Through the real CLI: `vllm serve ... --attention-backend episodic` in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.server

VLLM = str(Path(sys.executable).with_name("vllm"))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # a real server: separate processes
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_args(model_dir: str, port: int, *extra: str) -> list[str]:
    return [VLLM, "serve", model_dir, "--host", "127.0.0.1", "--port", str(port),
            "--enforce-eager", "--max-model-len", "4096", "--attention-backend", "episodic",
            *extra]


@pytest.mark.parametrize(
    "settings, fragments",
    [
        ({"window_tokens": "big"}, ["window_tokens", "valid integer"]),
        ({"segmentation": "random"}, ["segmentation", "'surprise' or 'fixed'"]),
        ({"windw_tokens": 10}, ["unknown key 'windw_tokens'", "valid keys", "window_tokens"]),
    ],
)
def test_invalid_config_fails_startup_naming_the_field(model_dir, settings, fragments):
    args = _serve_args(model_dir, _free_port(), "--additional-config",
                       json.dumps({"episodic": settings}))
    proc = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-2000:]
    for fragment in fragments:
        assert fragment in output, output[-3000:]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode()


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not on /metrics")


@pytest.fixture(scope="module")
def server(model_dir):
    port = _free_port()
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"vllm-episodic-serve-{port}.log", "w+")
    proc = subprocess.Popen(_serve_args(model_dir, port, "--served-model-name", "smollm2"),
                            env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while True:
        try:
            _get(base + "/health")
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                log.seek(0)
                pytest.fail("server did not come up:\n" + log.read()[-4000:])
            time.sleep(1)
    yield base
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def test_chat_completion_answers(server):
    reply = _post(server + "/v1/chat/completions", {
        "model": "smollm2", "temperature": 0, "max_tokens": 16,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    })
    assert "Paris" in reply["choices"][0]["message"]["content"]


def test_worker_metrics_reach_the_api_servers_metrics(server):
    before = _metric(_get(server + "/metrics"), "vllm_episodic_tokens_processed_total")
    reply = _post(server + "/v1/completions", {
        "model": "smollm2", "prompt": "Once upon a time", "max_tokens": 20,
        "temperature": 0, "ignore_eos": True,
    })
    used = reply["usage"]["prompt_tokens"] + reply["usage"]["completion_tokens"]
    # the worker publishes at most every 0.2 s and on every release
    deadline = time.time() + 10
    while True:
        text = _get(server + "/metrics")
        processed = _metric(text, "vllm_episodic_tokens_processed_total")
        tracked = _metric(text, "vllm_episodic_requests_tracked")
        if (processed - before >= used - 1 and tracked == 0) or time.time() > deadline:
            break
        time.sleep(0.2)
    # every token but the last sampled one went through the worker's attention
    assert processed - before == used - 1
    assert tracked == 0  # the finished request was released, on an idle server too
    for name in ("vllm_episodic_tokens_held", "vllm_episodic_events_created_total",
                 "vllm_episodic_host_bytes", "vllm_episodic_device_cache_hit_rate"):
        _metric(text, name)
    assert "vllm:" in text  # vLLM's own metrics are still there
