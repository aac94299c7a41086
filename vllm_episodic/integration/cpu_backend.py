"""The episodic attention backend on vLLM's CPU platform.

Subclasses of the CPU platform's own backend classes (``cpu_attn.py``): the paged KV
cache, its layout and the C++ attention op stay vLLM's. While a request's context
fits in sinks + local window its memory is inactive and attention is the stock op.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from vllm_episodic.core.memory import RequestMemory
from vllm_episodic.integration import runtime as worker_runtime


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


@dataclass
class EpisodicCPUMetadata(CPUAttentionMetadata):
    requests: list[RequestMemory] | None = None
    """(num_reqs,) memory of each batch row; None in dummy/profiling runs"""


class EpisodicCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        stock = super().build(common_prefix_len, common_attn_metadata, fast_build)
        runtime = worker_runtime.runtime_for(self.vllm_config)
        requests = None
        if runtime is not None:
            requests = runtime.plan_step(
                common_attn_metadata.query_start_loc_cpu,
                common_attn_metadata.seq_lens[: common_attn_metadata.num_reqs].cpu(),
            )
        return EpisodicCPUMetadata(**vars(stock), requests=requests)


class EpisodicCPUImpl(CPUAttentionBackendImpl):
    pass
