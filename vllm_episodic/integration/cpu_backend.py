"""The episodic attention backend on vLLM's CPU platform.

Subclasses of the CPU platform's own backend classes (``cpu_attn.py``): the paged KV
cache, its layout and the C++ attention op stay vLLM's; what the backend does around
the op is ``attention_step.py``.
"""

from __future__ import annotations

from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from vllm_episodic.integration import attention_step
from vllm_episodic.integration.paged_kv import CpuPagedKV


class EpisodicCPUBackend(CPUAttentionBackend):
    @staticmethod
    def get_name() -> str:
        # vLLM maps the name back to an enum member; ours is the CUSTOM slot
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[EpisodicCPUImpl]:
        return EpisodicCPUImpl

    @staticmethod
    def get_builder_cls() -> type[EpisodicCPUMetadataBuilder]:
        return EpisodicCPUMetadataBuilder

    @staticmethod
    def paged_kv(runner, shape) -> CpuPagedKV:
        """How the runtime reads and writes this backend's cache (one ISA for all layers)."""
        layers = runner.vllm_config.compilation_config.static_forward_context.values()
        isas = {getattr(layer, "isa", None) for layer in layers} - {None}
        if len(isas) != 1:
            raise ValueError(f"expected one CPU attention ISA for all layers, found {isas}")
        return CpuPagedKV(runner, isas.pop(), shape.dtype, shape.block_size, shape.head_size, shape.num_kv_heads)


class EpisodicCPUMetadataBuilder(attention_step.EpisodicBuilder, CPUAttentionMetadataBuilder):
    pass


class EpisodicCPUImpl(attention_step.EpisodicImpl, CPUAttentionBackendImpl):
    pass
