"""Small helpers shared by engine tests."""

from __future__ import annotations

from vllm_episodic.integration.runtime import runtime_for


def runtime_of(llm):
    """The worker runtime of an in-process ``vllm.LLM`` (None for stock engines)."""
    return runtime_for(llm.llm_engine.vllm_config)


def scheduler_of(llm):
    """The scheduler of an in-process engine (engine core runs in this process)."""
    return llm.llm_engine.engine_core.engine_core.scheduler


def flush_finished(llm) -> None:
    """Run the engine step that tells the worker about finished/aborted requests.

    A server's engine loop takes this step on its own; ``LLM.generate`` stops as soon
    as outputs are complete, so in-process tests take it explicitly.
    """
    llm.llm_engine.step()
