"""vllm-episodic: an EM-LLM-style episodic-memory attention backend for vLLM.

vLLM loads :func:`register` (entry point ``vllm.general_plugins: episodic``) in every
process it starts; it then accepts ``--attention-backend episodic``.
"""

__version__ = "0.1.0"


def register() -> None:
    """vLLM plugin hook: idempotent, imports vLLM glue lazily."""
    from vllm_episodic.integration import register as register_integration

    register_integration()
