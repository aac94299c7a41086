"""A paged-KV spec that keeps attention sinks and a sliding window, and its manager.

Why: vLLM allocates KV blocks for a request's whole context. The episodic backend
only reads sinks + the local window from the paged cache (events live in the host
store), so the block manager must free everything else. A plain sliding-window spec
frees from block 0, which would drop the sinks.

How: :class:`SinkWindowSpec` is a ``SlidingWindowSpec`` with ``sink_tokens``;
:class:`SinkWindowManager` frees skipped blocks from the first block after the sinks,
and admission counts the sink blocks. The runner hook on ``get_kv_cache_spec`` hands
vLLM this spec for every layer (:func:`sink_window_spec`; the backend's
``customize_spec`` hook cannot be used: it gets no config); ``register()`` registers
spec → manager in every process (the scheduler runs in the engine-core process).

A request attached to a kept memory (``prefix_reuse.py``) arrives with its computed
tokens as null blocks: the manager gives it fresh blocks for the sinks and for the
window before its first new token (the worker restores their K/V), and nulls between.

Removal: when vLLM has a sink-aware sliding-window spec.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
from vllm.v1.kv_cache_interface import SlidingWindowSpec


@dataclass(frozen=True, kw_only=True)
class SinkWindowSpec(SlidingWindowSpec):
    sink_tokens: int = 0
    """tokens at the start of the request whose blocks are never freed: the sinks and
    the blocks that later hold the request's device event cache"""

    @property
    def sink_blocks(self) -> int:
        return cdiv(self.sink_tokens, self.block_size)

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int, max_model_len: int) -> int:
        window = super().max_admission_blocks_per_request(max_in_flight_tokens, max_model_len)
        return min(window + self.sink_blocks, cdiv(max_model_len, self.block_size) + 1)

    def is_uniform_with_collection(self, kv_cache_specs) -> bool:
        return all(
            isinstance(spec, SinkWindowSpec)
            and spec.sliding_window == self.sliding_window
            and spec.sink_tokens == self.sink_tokens
            for spec in kv_cache_specs.values()
        )


class SinkWindowManager(SlidingWindowManager):
    """Frees blocks that left the window, except the sink blocks."""

    def __init__(self, kv_cache_spec: SinkWindowSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.sink_blocks = kv_cache_spec.sink_blocks

    def _restored(self, new_computed_blocks, total_computed_tokens: int) -> tuple[int, int] | None:
        """For an attached request (computed blocks all null): how many of its computed
        blocks are sinks, and the first one in the window; None for any other request."""
        if not new_computed_blocks or not all(block.is_null for block in new_computed_blocks):
            return None
        n = len(new_computed_blocks)
        window_from = max(self.get_num_skipped_tokens(total_computed_tokens) // self.block_size, self.sink_blocks)
        return min(self.sink_blocks, n), min(window_from, n)

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks, total_computed_tokens,
                                   *args, **kwargs) -> int:
        blocks = super().get_num_blocks_to_allocate(request_id, num_tokens, new_computed_blocks,
                                                    total_computed_tokens, *args, **kwargs)
        restored = self._restored(new_computed_blocks, total_computed_tokens)
        if restored is not None and not self.req_to_blocks.get(request_id):
            sinks, window_from = restored
            blocks += sinks + len(new_computed_blocks) - window_from
        return blocks

    def add_local_computed_blocks(self, request_id, new_computed_blocks, num_local_computed_tokens,
                                  num_external_computed_tokens) -> None:
        restored = self._restored(new_computed_blocks, num_local_computed_tokens + num_external_computed_tokens)
        if restored is None:
            return super().add_local_computed_blocks(request_id, new_computed_blocks, num_local_computed_tokens,
                                                     num_external_computed_tokens)
        sinks, window_from = restored
        n = len(new_computed_blocks)
        fresh = self.block_pool.get_new_blocks(sinks + n - window_from)
        req_blocks = self.req_to_blocks[request_id]
        assert not req_blocks
        req_blocks.extend(fresh[:sinks])
        req_blocks.extend([self._null_block] * (window_from - sinks))
        req_blocks.extend(fresh[sinks:])
        if self._record_new_block_ids:
            self.new_block_ids.extend(block.block_id for block in fresh)

    def remove_skipped_blocks(self, request_id, processed_computed_tokens, num_prompt_tokens=None) -> None:
        skipped = self.get_num_skipped_tokens(processed_computed_tokens)
        if skipped <= 0 or request_id not in self.req_to_blocks:
            return
        last = min(skipped // self.block_size, len(self.req_to_blocks[request_id]))
        self._remove_blocks_in_range(request_id, self.sink_blocks, last)


def sink_window_spec(spec, sink_tokens: int, window: int):
    """The episodic spec for a layer whose stock spec is ``spec`` (full attention)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    if type(spec) is not FullAttentionSpec:
        return spec
    return SinkWindowSpec(
        block_size=spec.block_size,
        num_kv_heads=spec.num_kv_heads,
        head_size=spec.head_size,
        head_size_v=spec.head_size_v,
        dtype=spec.dtype,
        kv_quant_mode=spec.kv_quant_mode,
        page_size_padded=spec.page_size_padded,
        block_stride_alignment=spec.block_stride_alignment,
        sliding_window=window,
        sink_tokens=sink_tokens,
    )


def register_spec() -> None:
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    # the built-ins register only while the registry is empty: go first
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(SinkWindowSpec, SinkWindowManager, uniform_type_base_spec=SinkWindowSpec)
