"""A real `vllm serve` subprocess with the episodic backend, for tests of the CLI/API."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from vllm_episodic import envs
from vllm_episodic.core.store import PAGE_TOKENS

VLLM = str(Path(sys.executable).with_name("vllm"))


def env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # a real server: separate processes
    # its own metrics directory: inherited, its /metrics would also sum the snapshots of
    # this test process's in-process engines
    env.pop(envs.METRICS_DIR, None)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# one host-store page of SmolLM2 (30 layers, 3 KV heads of 64) in float32, as served below
PAGE_BYTES = 2 * 30 * 3 * PAGE_TOKENS * 64 * 4

# small window and cache: a 1.5K-token prompt already forms events
SMALL = {"sink_tokens": 64, "window_tokens": 256, "retrieval_budget_tokens": 256,
         "max_event_tokens": 64, "device_event_cache_tokens": 512, "kept_memory_gib": 0.25}


def serve_args(model_dir: str, port: int, *extra: str) -> list[str]:
    # float32: in bfloat16 this 135M model's greedy answers depend on the CPU (on an
    # Intel Xeon stock vLLM answers "What is the capital of France?" with "L'Étoile, la
    # Marseillaise, …", on an AMD EPYC it named Paris); in float32 the Xeon names Paris
    return [VLLM, "serve", model_dir, "--host", "127.0.0.1", "--port", str(port),
            "--enforce-eager", "--max-model-len", "8192", "--attention-backend", "episodic",
            "--dtype", "float32", *extra]


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode()


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not on /metrics")


def metrics(server: str) -> dict[str, float]:
    text = get(server + "/metrics")
    names = ("vllm_episodic_requests_tracked", "vllm_episodic_host_bytes", "vllm_episodic_kept_bytes",
             "vllm_episodic_tokens_held",
             "vllm_episodic_device_cache_tokens", "vllm_episodic_events_created_total")
    return {name: metric(text, name) for name in names}


def wait_idle(server: str, timeout: float = 60) -> dict[str, float]:
    deadline = time.time() + timeout
    while True:
        values = metrics(server)
        if values["vllm_episodic_requests_tracked"] == 0 or time.time() > deadline:
            return values
        time.sleep(0.5)


def abandon(server: str, body: dict, read_chunks: int, wait: float) -> None:
    """Send a streaming request and disconnect: before the first token (read_chunks=0,
    after ``wait`` seconds) or after ``read_chunks`` streamed chunks."""
    import http.client

    host, port = server.rsplit("/", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json"})
    if read_chunks == 0:
        time.sleep(wait)
    else:
        response = conn.getresponse()
        for _ in range(read_chunks):
            response.fp.readline()
            response.fp.readline()
    conn.close()


def long_prompt(n: int, seed: int) -> str:
    from vllm_episodic.workloads import filler_text

    return filler_text(n, seed=seed)


def post_status(url: str, body: dict) -> tuple[int, str]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def log_path(port: int | str) -> Path:
    """Where :func:`running_server` writes the server's output."""
    return Path(os.environ.get("TMPDIR", "/tmp")) / f"vllm-episodic-serve-{port}.log"


@contextmanager
def running_server(model_dir: str, settings: dict, *extra: str, environ: dict[str, str] | None = None):
    """``vllm serve`` of ``model_dir`` as "smollm2" with the episodic ``settings``, more
    ``extra`` arguments and ``environ`` over :func:`env`; yields its base URL."""
    port = free_port()
    log = open(log_path(port), "w+")
    proc = subprocess.Popen(serve_args(model_dir, port, "--served-model-name", "smollm2",
                                        "--additional-config", json.dumps({"episodic": settings}), *extra),
                            env={**env(), **(environ or {})}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while True:
        try:
            get(base + "/health")
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                log.seek(0)
                raise RuntimeError("server did not come up:\n" + log.read()[-4000:])
            time.sleep(1)
    yield base
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()
