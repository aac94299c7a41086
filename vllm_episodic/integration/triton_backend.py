"""The episodic attention backend on vLLM's Triton attention backend (``TRITON_ATTN``).

What ``--attention-backend episodic`` selects on CUDA, and on CPU when
``VLLM_EPISODIC_TRITON_ON_CPU=1`` (the kernels then run under Triton's interpreter:
``triton_on_cpu.py``), so that the GPU-shaped path is tested here. Subclasses of
vLLM's Triton backend classes (``triton_attn.py``): its paged KV cache (per layer
``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` in logical order), cache
writes and unified attention kernel stay vLLM's; what the backend does around the
kernel is ``attention_step.py``, the same as on the CPU op. Retrieval scoring and the
re-rotating gather run our Triton kernels where the tensors are on a GPU (or under
the interpreter with the switch above: ``vllm_episodic.kernels.uses_triton``).

Not yet: CUDA graphs (selection runs in Python between layers: the builder declares
no graph support), a side stream for host-to-device copies, pinned host pages.
"""

from __future__ import annotations

from typing import ClassVar

from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadataBuilder,
)

from vllm_episodic.integration import attention_step
from vllm_episodic.integration.paged_kv import FlashPagedKV


class EpisodicTritonBackend(TritonAttentionBackend):
    @staticmethod
    def get_name() -> str:
        # vLLM maps the name back to an enum member; ours is the CUSTOM slot
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[EpisodicTritonImpl]:
        return EpisodicTritonImpl

    @staticmethod
    def get_builder_cls() -> type[EpisodicTritonMetadataBuilder]:
        return EpisodicTritonMetadataBuilder

    @staticmethod
    def paged_kv(runner, shape) -> FlashPagedKV:
        """How the runtime reads and writes this backend's cache."""
        return FlashPagedKV(runner, shape.block_size, shape.head_size)


class EpisodicTritonMetadataBuilder(attention_step.EpisodicBuilder, TritonAttentionMetadataBuilder):
    # retrieval between layers is Python and data-dependent: no CUDA graph captures it
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER


class EpisodicTritonImpl(attention_step.EpisodicImpl, TritonAttentionImpl):
    pass
