"""Shared fixtures: the default model, and in-process engines reused across tests.

Engines are expensive (import + init take ~10 s on 2 cores), so each distinct set of
engine arguments is built once per session and shared by every test that asks for it.
"""

from __future__ import annotations

import gc
import os

# in-process engines (no engine-core subprocess), 1 GiB of KV cache each
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Triton has no CPU driver: its kernels run under the interpreter, a switch Triton reads
# when it is first imported (vLLM imports it), so it is set before anything else
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from vllm_episodic import models


@pytest.fixture(scope="session")
def model_dir() -> str:
    """The default model (SmolLM2-135M-Instruct) as a HF folder, fetched once."""
    return str(models.fetch(models.DEFAULT_MODEL))


#: engines the session keeps at once (each holds 1 GiB of KV cache, the model and the
#: episodic host state; with every distinct engine kept, a fresh-clone run peaked at
#: 23.9 GB of this 24 GiB machine)
CACHED_ENGINES = 4


@pytest.fixture(scope="session")
def make_llm(model_dir):
    """``make_llm(**engine_kwargs)``: a cached in-process ``vllm.LLM``; the least
    recently asked-for engine is dropped beyond ``CACHED_ENGINES`` (freed once no test
    or fixture holds it)."""
    from vllm import LLM

    cache: dict[str, LLM] = {}

    def make(**kwargs):
        key = repr(sorted(kwargs.items()))
        if key in cache:
            cache[key] = cache.pop(key)  # most recently used last
        else:
            while len(cache) >= CACHED_ENGINES:
                cache.pop(next(iter(cache)))
                gc.collect()
            defaults = dict(model=model_dir, enforce_eager=True, max_model_len=8192, seed=0)
            cache[key] = LLM(**{**defaults, **_small_kept_memory(kwargs)})
        return cache[key]

    yield make
    cache.clear()


def _small_kept_memory(kwargs: dict) -> dict:
    """Episodic engines keep finished requests' memories (a quarter of the host cap by
    default, 4 GiB); the session holds many engines at once, so an engine keeps none
    unless its test's settings ask for some (``kept_memory_gib``)."""
    if kwargs.get("attention_backend") != "episodic":
        return kwargs
    additional = dict(kwargs.get("additional_config") or {})
    additional["episodic"] = {"kept_memory_gib": 0, **(additional.get("episodic") or {})}
    return {**kwargs, "additional_config": additional}


@pytest.fixture(scope="module")
def server_settings():
    """Episodic settings of the module's `vllm serve` (a module overrides this fixture)."""
    from servers import SMALL

    return SMALL


@pytest.fixture(scope="module")
def server(model_dir, server_settings):
    """A real `vllm serve` subprocess with the episodic backend, served as "smollm2";
    yields its base URL."""
    from servers import running_server

    with running_server(model_dir, server_settings) as base:
        yield base
