"""The episodic attention backend on vLLM's CPU platform.

Subclasses of the CPU platform's own backend classes (``cpu_attn.py``): the paged KV
cache, its layout and the C++ attention op stay vLLM's.

- While no part of a request's context has moved to memory (it fits in sinks + local
  window), its attention is the stock op: output identical to stock vLLM.
- Otherwise the row's attention is ``RequestMemory.attend``: local window from the
  paged cache, sinks + retrieved events, merged exactly.

A batch can mix both kinds of rows: the stock op then runs on the inactive rows only
(with metadata built for them alone).
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

from vllm_episodic.core.memory import RowPlan
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
    plans: list[RowPlan] | None
    """(num_reqs,) what each row does; None in dummy/profiling runs"""
    stock: CPUAttentionMetadata | None
    """metadata of the rows attended by the stock op (all rows, or the inactive ones)"""
    stock_tokens: torch.Tensor | None
    """query indices of the stock rows when they are a subset of the batch"""
    runtime: object | None


class EpisodicCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        runtime = worker_runtime.runtime_for(self.vllm_config)
        plans = runtime.plan_step(common_attn_metadata) if runtime is not None else None
        cam = common_attn_metadata
        active = [i for i, p in enumerate(plans)] if plans else []
        active = [i for i in active if plans[i].active]
        stock = stock_tokens = None
        if not active:
            stock = super().build(common_prefix_len, cam, fast_build)
        elif len(active) < cam.num_reqs:
            inactive = [i for i in range(cam.num_reqs) if i not in set(active)]
            subset, stock_tokens = _rows_subset(cam, inactive)
            stock = super().build(common_prefix_len, subset, fast_build)
        return EpisodicCPUMetadata(
            num_actual_tokens=cam.num_actual_tokens, plans=plans, stock=stock,
            stock_tokens=stock_tokens, runtime=runtime,
        )


def _rows_subset(cam: CommonAttentionMetadata, rows: list[int]):
    """Common metadata of some rows of a batch, and their query indices in it."""
    qsl = cam.query_start_loc_cpu
    lengths = (qsl[1:] - qsl[:-1])[rows]
    tokens = torch.cat([torch.arange(int(qsl[r]), int(qsl[r + 1])) for r in rows])
    new_qsl = torch.zeros(len(rows) + 1, dtype=qsl.dtype)
    new_qsl[1:] = torch.cumsum(lengths, 0)
    seq_lens = cam.seq_lens[rows]
    subset = cam.replace(
        query_start_loc=new_qsl.to(cam.query_start_loc.device),
        query_start_loc_cpu=new_qsl,
        seq_lens=seq_lens,
        num_reqs=len(rows),
        num_actual_tokens=int(lengths.sum()),
        max_query_len=int(lengths.max()),
        max_seq_len=int(seq_lens.max()),
        block_table_tensor=cam.block_table_tensor[rows],
        slot_mapping=cam.slot_mapping[tokens],
        positions=None,
        is_prefilling=None if cam.is_prefilling is None else cam.is_prefilling[rows],
        seq_lens_cpu_upper_bound=None,
        _num_computed_tokens_cache=None,
        _token_to_req_indices_cache=None,
    )
    return subset, tokens


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
        out = output[:num_tokens].view(num_tokens, self.num_heads, self.head_size)
        if meta.stock is not None and meta.stock_tokens is None:
            super().forward(layer, query, key, value, kv_cache, meta.stock, output,
                            output_scale, output_block_scale)
        elif meta.stock is not None:
            index = meta.stock_tokens
            part = out.new_empty((index.numel(), self.num_heads, self.head_size))
            super().forward(layer, q.index_select(0, index), key, value, kv_cache, meta.stock, part)
            out.index_copy_(0, index, part)
        sinks = runtime.config.sink_tokens
        for plan in meta.plans:
            rows = slice(plan.first_query, plan.first_query + plan.num_scheduled)
            if plan.active:
                local_k, local_v = runtime.read_tokens(plan, layer_index, plan.local_start, plan.end)
                sink_k, sink_v = runtime.read_tokens(plan, layer_index, 0, sinks)
                out[rows] = plan.memory.attend(
                    layer_index, plan, q[rows], local_k, local_v, sink_k, sink_v, self.scale, runtime.rope
                ).to(out.dtype)
            if plan.observe:
                plan.memory.observe(layer_index, q[rows])
        return output
