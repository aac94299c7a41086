"""The episodic attention backend on vLLM's CPU platform.

Subclasses of the CPU platform's own backend classes (``cpu_attn.py``): the paged KV
cache, its layout and the C++ attention op stay vLLM's.

Every row of a batch goes through the stock op, in one call per layer:

- ``natural`` rows (nothing in memory yet, or memory still in its own blocks) with
  their own block table: output identical to stock vLLM;
- ``assembled`` rows with a block table made of their sink blocks, the attended blocks
  of their event cache (filled with this layer's retrieved events just before the
  call) and their local blocks: one softmax over sinks + events + local window.

``reference`` rows (a debug toggle, or bounded positions before the event cache is
free) are recomputed in torch after the op, and so is the chunk that ends a prompt
when it attends all of memory (``full_memory_at_prompt_end``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.attention.backend import CommonAttentionMetadata

from vllm_episodic.core.plan import Mode, RowPlan
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
class EpisodicCPUMetadata:
    num_actual_tokens: int
    stock: CPUAttentionMetadata
    """the stock op's metadata; assembled rows have their assembled block tables"""
    plans: list[RowPlan] | None
    """(num_reqs,) what each row does; None in dummy/profiling runs"""
    runtime: object | None
    retrieving: list[RowPlan]
    """assembled rows whose layers retrieve for themselves (not selected ahead)"""
    reference: list[RowPlan]
    """rows attended in torch after the op (reference rows, and chunks that end the
    prompt attending all of memory)"""


class EpisodicCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        runtime = worker_runtime.runtime_for(self.vllm_config)
        plans = runtime.plan_step(common_attn_metadata) if runtime is not None else None
        cam = common_attn_metadata
        if plans and any(plan.mode is Mode.ASSEMBLED for plan in plans):
            cam = _assembled(cam, plans, runtime.memory.layout.sinks, self.block_size)
        return EpisodicCPUMetadata(
            num_actual_tokens=cam.num_actual_tokens,
            stock=super().build(common_prefix_len, cam, fast_build),
            plans=plans,
            runtime=runtime,
            retrieving=[p for p in plans or () if p.mode is Mode.ASSEMBLED and not p.selected_ahead],
            reference=[p for p in plans or () if p.mode is Mode.REFERENCE or p.all_memory],
        )


def _assembled(cam: CommonAttentionMetadata, plans: list[RowPlan], sinks: int, block_size: int):
    """Block tables of assembled rows: sink blocks, the attended event-cache blocks,
    then the local blocks from ``local_start``; all but the last block are full."""
    table = cam.block_table_tensor.clone()
    seq_lens = cam.seq_lens.clone()
    sink_blocks = sinks // block_size
    for row, plan in enumerate(plans):
        if plan.mode is not Mode.ASSEMBLED:
            continue
        natural = cam.block_table_tensor[row]
        memory_blocks = plan.memory_tokens // block_size
        local = natural[plan.local_start // block_size : -(-plan.end // block_size)]
        assembled = torch.cat((natural[: sink_blocks + memory_blocks], local))
        table[row, : assembled.numel()] = assembled
        seq_lens[row] = sinks + plan.memory_tokens + plan.end - plan.local_start
    return cam.replace(
        block_table_tensor=table,
        seq_lens=seq_lens,
        max_seq_len=int(seq_lens[: cam.num_reqs].max()),
        seq_lens_cpu_upper_bound=None,
        _num_computed_tokens_cache=None,
    )


class EpisodicCPUImpl(CPUAttentionBackendImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        meta = attn_metadata
        if meta is None:
            return output
        if meta.plans is None:
            return super().forward(layer, query, key, value, kv_cache, meta.stock, output,
                                   output_scale, output_block_scale)
        runtime = meta.runtime
        layer_index = runtime.layer_index(layer.layer_name)
        num_tokens = meta.num_actual_tokens
        q = query[:num_tokens].view(num_tokens, self.num_heads, self.head_size)
        if meta.retrieving:
            runtime.fill_caches(layer_index, [(plan, q[plan.query_rows]) for plan in meta.retrieving])
        super().forward(layer, query, key, value, kv_cache, meta.stock, output,
                        output_scale, output_block_scale)
        out = output[:num_tokens].view(num_tokens, self.num_heads, self.head_size)
        for plan in meta.reference:
            rows = plan.torch_rows
            memory = plan.memory
            selection = memory.attended_in_torch(layer_index, plan, q[plan.query_rows])
            local_k, local_v = (t[0] for t in runtime.read_tokens(
                plan, torch.tensor([layer_index]), plan.local_start, plan.end))
            out[rows] = memory.reference_attention(
                layer_index, plan, q[rows], selection, local_k, local_v, self.scale, runtime.rope
            ).to(out.dtype)
        runtime.memory.record_queries(layer_index, q)
        return output
