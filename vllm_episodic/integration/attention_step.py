"""What every episodic backend does around vLLM's own attention, whatever the platform.

A backend subclasses a platform backend of vLLM (``cpu_backend.py``: the CPU op;
``triton_backend.py``: the Triton unified-attention kernel) and keeps its paged KV
cache, layout and kernel. Its metadata builder (:func:`build`) plans the step and
hands the stock builder an *assembled* block table for rows that read memory; its
forward (:func:`forward`) runs, per layer:

1. retrieval for rows that retrieve in this layer, filling their event-cache slots;
2. the stock kernel over every row: ``natural`` rows (nothing in memory yet) with their
   own block table, output identical to stock vLLM; ``assembled`` rows with their sink
   blocks, the attended blocks of their event cache and their local blocks — one
   softmax over sinks + events + local window;
3. ``reference`` rows (a debug toggle, bounded positions before the event cache is
   free, or the chunk that ends a prompt attending all of memory) recomputed in torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from vllm.v1.attention.backend import CommonAttentionMetadata

from vllm_episodic.core.plan import Mode, RowPlan
from vllm_episodic.integration import runtime as worker_runtime


@dataclass
class EpisodicMetadata:
    num_actual_tokens: int
    stock: Any
    """the stock builder's metadata; assembled rows have their assembled block tables"""
    plans: list[RowPlan] | None
    """(num_reqs,) what each row does; None in dummy/profiling runs"""
    runtime: object | None
    retrieving: list[RowPlan]
    """assembled rows whose layers retrieve for themselves (not selected ahead)"""
    reference: list[RowPlan]
    """rows attended in torch after the op (reference rows, and chunks that end the
    prompt attending all of memory)"""


def build(builder, stock_build: Callable, common_prefix_len: int, cam: CommonAttentionMetadata,
          fast_build: bool) -> EpisodicMetadata:
    """The step's metadata: plans (nothing written, nothing selected) and the stock
    builder's metadata over assembled block tables."""
    runtime = worker_runtime.runtime_for(builder.vllm_config)
    plans = runtime.plan_step(cam) if runtime is not None else None
    if plans and any(plan.mode is Mode.ASSEMBLED for plan in plans):
        cam = _assembled(cam, plans, runtime.memory.layout.sinks, builder.kv_cache_spec.block_size)
    return EpisodicMetadata(
        num_actual_tokens=cam.num_actual_tokens,
        stock=stock_build(common_prefix_len, cam, fast_build),
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


def forward(impl, stock_forward: Callable, layer, query: torch.Tensor, meta: EpisodicMetadata,
            output: torch.Tensor) -> torch.Tensor:
    """One layer's attention for the step (see the module docstring).

    Args:
        stock_forward: ``stock_forward(stock_metadata)`` runs the platform kernel into
            ``output``.
        query: ``[tokens, num_heads * head_size]`` (or already split by head).
    """
    runtime = meta.runtime
    layer_index = runtime.layer_index(layer.layer_name)
    num_tokens = meta.num_actual_tokens
    q = query[:num_tokens].view(num_tokens, impl.num_heads, impl.head_size)
    if meta.retrieving:
        runtime.fill_caches(layer_index, [(plan, q[plan.query_rows]) for plan in meta.retrieving])
    stock_forward(meta.stock)
    out = output[:num_tokens].view(num_tokens, impl.num_heads, impl.head_size)
    for plan in meta.reference:
        rows = plan.torch_rows
        memory = plan.memory
        selection = memory.attended_in_torch(layer_index, plan, q[plan.query_rows])
        local_k, local_v = (t[0] for t in runtime.read_tokens(
            plan, torch.tensor([layer_index]), plan.local_start, plan.end))
        out[rows] = memory.reference_attention(
            layer_index, plan, q[rows], selection, local_k, local_v, impl.scale, runtime.rope
        ).to(out.dtype)
    runtime.memory.record_queries(layer_index, q)
    return output


class EpisodicBuilder:
    """Mixin before a platform's metadata builder: :func:`build` over its ``build``."""

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        return build(self, super().build, common_prefix_len, common_attn_metadata, fast_build)


class EpisodicImpl:
    """Mixin before a platform's attention impl: :func:`forward` around its ``forward``
    (dummy and profiling runs, which have no plans, go to the stock kernel as they are)."""

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        def stock(metadata):
            return super(EpisodicImpl, self).forward(layer, query, key, value, kv_cache, metadata, output,
                                                     output_scale, output_block_scale)

        meta = attn_metadata
        if meta is None or meta.plans is None:
            return stock(None if meta is None else meta.stock)
        return forward(self, stock, layer, query, meta, output)
