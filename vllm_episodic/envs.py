"""Every environment variable the plugin reads, in one place. Settings belong in
EpisodicConfig; these are debug toggles and process plumbing. A leaf module (``os``
only): the kernels, the core and the integration may all read it."""

from __future__ import annotations

import os

#: the directory the processes of one server share for metric snapshots (``metrics.py``
#: creates it and sets the variable for the processes it spawns)
METRICS_DIR = "VLLM_EPISODIC_METRICS_DIR"

ENVIRONMENT = {
    # attend memory with the torch reference implementation instead of the platform op
    # over an assembled block table (slow; for checking the fast path)
    "VLLM_EPISODIC_REFERENCE": lambda: os.environ.get("VLLM_EPISODIC_REFERENCE", "0") == "1",
    # run the kernels' torch references even where Triton could run (GPU tensors)
    "VLLM_EPISODIC_TORCH_KERNELS": lambda: os.environ.get("VLLM_EPISODIC_TORCH_KERNELS", "0") == "1",
    # on the CPU platform, serve through vLLM's Triton attention backend (and run our
    # Triton kernels) under Triton's interpreter: the GPU path, testable without a GPU
    "VLLM_EPISODIC_TRITON_ON_CPU": lambda: os.environ.get("VLLM_EPISODIC_TRITON_ON_CPU", "0") == "1",
    METRICS_DIR: lambda: os.environ.get(METRICS_DIR) or None,
    # where converted models live (``models.py``); else $XDG_CACHE_HOME (or ~/.cache)
    "VLLM_EPISODIC_MODELS": lambda: os.environ.get("VLLM_EPISODIC_MODELS") or None,
    "XDG_CACHE_HOME": lambda: os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
}


def get(name: str):
    return ENVIRONMENT[name]()
