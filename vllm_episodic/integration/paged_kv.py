"""Reading and writing tokens of vLLM's paged KV cache, for each backend we subclass.

The runtime moves tokens in and out of the paged cache through one interface,
:class:`PagedKV` (``locate`` slots once, ``read`` them for many layers, ``write``):
:class:`CpuPagedKV` for vLLM's CPU op, :class:`FlashPagedKV` for its Triton backend.

**CPU op.** A layer's cache is ``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` in shape;
per (block, KV head) the first ``block_size * head_size`` elements hold keys and the
rest values. *Inside* those halves the C++ op lays elements out for its SIMD kernels,
and the layout depends on the ISA it picked (measured: ``vec``/``vec16`` store keys
transposed, ``[head_size, block_size]``; ``amx`` interleaves pairs of features in
16-token tiles; values are row-major). Rather than hard-coding layouts, the runtime
*probes* once at start-up: it writes index-coded keys and values with vLLM's own
``cpu_attn_reshape_and_cache`` and records where each (token, feature) landed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from vllm_episodic.core.codes import rotated
from vllm_episodic.kernels import gather_rotate


@dataclass(frozen=True)
class BlockLayout:
    """Where (token, feature) of a block half lives: flat index ``[block_size * head_size]``
    into the half, in (token, feature) order."""

    key_index: torch.Tensor
    value_index: torch.Tensor
    block_size: int
    head_size: int


def probe_layout(isa: str, dtype: torch.dtype, block_size: int, head_size: int) -> BlockLayout:
    """Discover the op's in-block layout by writing coded keys/values through it."""
    from vllm import _custom_ops as ops

    index = []
    for half in (0, 1):
        coords = []
        # two passes with small integers (exact even in bfloat16): token, then feature
        for code in (torch.arange(block_size)[:, None].expand(block_size, head_size),
                     torch.arange(head_size)[None, :].expand(block_size, head_size)):
            cache = torch.full((1, 1, block_size, 2 * head_size), -1.0, dtype=dtype)
            view = cache.view(1, 1, 2 * block_size, head_size)
            key_cache, value_cache = view.chunk(2, dim=2)
            data = code.to(dtype).reshape(block_size, 1, head_size).contiguous()
            zeros = torch.zeros_like(data)
            keys, values = (data, zeros) if half == 0 else (zeros, data)
            ops.cpu_attn_reshape_and_cache(
                keys, values, key_cache, value_cache, torch.arange(block_size), isa,
                k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto",
            )
            coords.append(cache.view(2, block_size * head_size)[half].float().round().long())
        token, feature = coords
        flat = token * head_size + feature  # logical (t, d) stored at each offset
        if sorted(flat.tolist()) != list(range(block_size * head_size)):
            raise ValueError(f"could not map the CPU KV cache layout of ISA {isa!r}")
        where = torch.empty_like(flat)
        where[flat] = torch.arange(flat.numel())
        index.append(where)
    return BlockLayout(index[0], index[1], block_size, head_size)


def slot_offsets(layout: BlockLayout, slots: torch.Tensor, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat element offsets of the keys and values of token ``slots`` (absolute slot =
    block * block_size + offset) in a layer's cache viewed as 1-D.

    Returns:
        two ``[n, num_kv_heads, head_size]`` int64 tensors.
    """
    bs, d = layout.block_size, layout.head_size
    block, within = slots // bs, slots % bs
    head = torch.arange(num_kv_heads)
    # element (block, head, half, *) starts at ((block * kvH + head) * 2 + half) * bs * d
    base = (block[:, None] * num_kv_heads + head[None, :]) * 2 * bs * d  # [n, kvH]
    feature = within[:, None] * d + torch.arange(d)[None, :]  # [n, d] logical (t, d)
    keys = base[:, :, None] + layout.key_index[feature][:, None, :]
    values = base[:, :, None] + bs * d + layout.value_index[feature][:, None, :]
    return keys, values


def write_slots(kv_cache: torch.Tensor, isa: str, slots: torch.Tensor, keys: torch.Tensor,
                values: torch.Tensor) -> None:
    """Write ``keys``/``values`` ``[n, num_kv_heads, head_size]`` at token ``slots`` with
    vLLM's own cache-write op (it knows the layout)."""
    from vllm import _custom_ops as ops

    num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
    view = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, -1)
    key_cache, value_cache = view.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(
        keys.to(kv_cache.dtype).contiguous(), values.to(kv_cache.dtype).contiguous(),
        key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto",
    )


@dataclass(frozen=True)
class StackedCaches:
    """Every layer's paged KV cache seen as one cache, so that reads and writes for many
    layers are one gather or one op call.

    vLLM 0.32 allocates all layers' caches in one backing buffer (``allocate_kv_cache``),
    each layer's contiguous: block ``b`` of layer ``l`` is block ``first_block[l] + b`` of
    the buffer seen as a cache of the same block shape.
    """

    cache: torch.Tensor  # [all blocks, num_kv_heads, block_size, 2 * head_size]
    first_block: torch.Tensor  # [layers] int64

    @classmethod
    def of(cls, caches: list[torch.Tensor]) -> StackedCaches:
        first = caches[0]
        page_bytes = first[0].numel() * first.element_size()
        storage = first.untyped_storage().data_ptr()
        if any(c.shape != first.shape or c.dtype != first.dtype or not c.is_contiguous()
               or c.untyped_storage().data_ptr() != storage for c in caches):
            raise ValueError("the episodic backend expects every layer's KV cache contiguous, of one "
                             "shape, in one allocation (vLLM 0.32's layout); this vLLM lays them out "
                             "otherwise")
        starts = torch.tensor([c.data_ptr() for c in caches])
        offsets = starts - starts.min()
        if bool((offsets % page_bytes).any()):
            raise ValueError("the layers' KV caches are not a whole number of blocks apart")
        lowest = caches[int(starts.argmin())]
        blocks = int(offsets.max()) // page_bytes + first.shape[0]
        cache = lowest.as_strided((blocks, *first.shape[1:]), first.stride(), lowest.storage_offset())
        return cls(cache, offsets // page_bytes)

    @property
    def block_size(self) -> int:
        return self.cache.shape[2]

    def slots(self, layers: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Slots of the stacked cache of each layer's (absolute) ``slots``; broadcasts."""
        return self.first_block[layers] * self.block_size + slots

    def element_base(self, layers: torch.Tensor) -> torch.Tensor:
        """Flat element offset of each layer's cache in :attr:`cache` viewed as 1-D."""
        return self.first_block[layers] * self.cache[0].numel()

    def read(self, layers: torch.Tensor, key_at: torch.Tensor, value_at: torch.Tensor):
        """K/V at flat element offsets ``key_at``/``value_at`` (:func:`slot_offsets`) of
        each layer's cache, one gather each; ``layers`` broadcasts against the offsets
        (``[n, 1, 1]``: one layer per token, ``[L, 1, 1, 1]``: every token in L layers)."""
        flat = self.cache.view(-1)
        base = self.element_base(layers)
        return flat[base + key_at], flat[base + value_at]

    def write(self, isa: str, layers: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor,
              values: torch.Tensor) -> None:
        """Write ``keys``/``values`` ``[n, num_kv_heads, head_size]`` at each token's layer
        and slot (``layers``, ``slots``: ``(n,)`` or broadcastable), one op call."""
        write_slots(self.cache, isa, self.slots(layers, slots).flatten(), keys, values)


class PagedKV(Protocol):
    """Token moves between the runtime and a runner's paged KV caches (all layers).

    ``locate(slots)`` returns tensors indexed by token along dim 0 (a request keeps
    them while its blocks stay the same); ``read(layers, where)`` gives K/V ``[L, n,
    num_kv_heads, head_size]`` of every located token in each of ``layers (L,)``, or,
    with ``each=True`` and ``layers (n,)``, ``[n, num_kv_heads, head_size]`` of token i
    in layer ``layers[i]``; ``write(layers, slots, keys, values)`` stores ``keys`` /
    ``values`` ``[m, num_kv_heads, head_size]`` at ``layers`` x ``slots`` broadcast
    together and flattened (m entries)."""

    block_size: int

    def locate(self, slots: torch.Tensor) -> tuple[torch.Tensor, ...]: ...

    def read(self, layers: torch.Tensor, where: tuple[torch.Tensor, ...], each: bool = False): ...

    def write(self, layers: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None: ...

    def write_rotated(self, layers: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      target: torch.Tensor, rope) -> None:
        """:meth:`write` of un-rotated ``keys`` rotated to ``target (m,)`` positions on
        the way (``layers``, ``slots``: ``(m,)``)."""


class CpuPagedKV:
    """The CPU op's caches: the in-block layout probed once, every layer's cache one
    :class:`StackedCaches` (rebuilt if vLLM allocates the caches anew)."""

    def __init__(self, runner, isa: str, dtype: torch.dtype, block_size: int, head_size: int, num_kv_heads: int):
        self.runner = runner
        self.isa = isa
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.layout = probe_layout(isa, dtype, block_size, head_size)
        # built now so that a KV layout the view cannot address fails at start-up
        self._stacked: tuple[torch.Tensor, StackedCaches] = self._stack()

    def _stack(self) -> tuple[torch.Tensor, StackedCaches]:
        return self.runner.kv_caches[0], StackedCaches.of(list(self.runner.kv_caches))

    @property
    def caches(self) -> StackedCaches:
        if self._stacked[0] is not self.runner.kv_caches[0]:
            self._stacked = self._stack()
        return self._stacked[1]

    def locate(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return slot_offsets(self.layout, slots, self.num_kv_heads)

    def read(self, layers: torch.Tensor, where: tuple[torch.Tensor, ...], each: bool = False):
        return self.caches.read(layers.view(-1, 1, 1) if each else layers.view(-1, 1, 1, 1), *where)

    def write(self, layers, slots, keys, values) -> None:
        self.caches.write(self.isa, layers, slots, keys, values)

    def write_rotated(self, layers, slots, keys, values, target, rope) -> None:
        # the op writes through its own layout: rotate first (the engine's fused op)
        self.write(layers, slots, *rotated(keys, values, target, rope))


class FlashPagedKV:
    """vLLM's Triton backend caches: per layer ``[num_blocks, num_kv_heads, block_size,
    2 * head_size]`` in logical order (keys in the first ``head_size`` features, values
    in the rest; the physical order is the tensor's strides, e.g. vLLM's ``NHD``
    layout), one tensor per layer. Tokens are addressed by slot through plain indexing,
    layer by layer."""

    def __init__(self, runner, block_size: int, head_size: int):
        self.runner = runner
        self.block_size = block_size
        self.head_size = head_size

    def locate(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return slots // self.block_size, slots % self.block_size

    def _halves(self, layer: int):
        cache = self.runner.kv_caches[layer]
        return cache[..., : self.head_size], cache[..., self.head_size :]

    def read(self, layers: torch.Tensor, where: tuple[torch.Tensor, ...], each: bool = False):
        block, offset = where
        if not each:
            parts = [tuple(half[block, :, offset] for half in self._halves(layer)) for layer in layers.tolist()]
            return tuple(torch.stack(kind) for kind in zip(*parts))
        cache = self.runner.kv_caches[0]
        keys = cache.new_empty((block.numel(), cache.shape[1], self.head_size))
        values = torch.empty_like(keys)
        for layer in torch.unique(layers).tolist():
            mine = (layers == layer).nonzero().flatten()
            key_half, value_half = self._halves(layer)
            keys[mine] = key_half[block[mine], :, offset[mine]]
            values[mine] = value_half[block[mine], :, offset[mine]]
        return keys, values

    def write_rotated(self, layers, slots, keys, values, target, rope) -> None:
        """One launch of :func:`~vllm_episodic.kernels.gather_rotate` per layer: the keys
        are rotated by our Triton kernel (on a GPU, or under the interpreter) as they
        land in the layer's cache slots (host tensors are copied to the cache's device
        first)."""
        device = self.runner.kv_caches[0].device
        keys, values, slots, target = (t.to(device, non_blocking=True) for t in (keys, values, slots, target))
        rows = torch.arange(slots.numel(), device=device)
        layers = layers.to(device)
        for layer in torch.unique(layers).tolist():
            mine = rows[layers == layer]
            dst_k, dst_v = self._slot_views(layer)
            gather_rotate(keys, values, mine, dst_k, dst_v, slots[mine], rope.table, target[mine],
                          rope.is_neox_style)

    def _slot_views(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's keys and values as ``[num_blocks * block_size, num_kv_heads,
        head_size]`` views (slot-major: vLLM's ``NHD`` layout; another fails here)."""
        cache = self.runner.kv_caches[layer]
        blocks, heads, block_size, width = cache.shape
        by_slot = cache.transpose(1, 2).view(blocks * block_size, heads, width)
        return by_slot[..., : self.head_size], by_slot[..., self.head_size :]

    def write(self, layers, slots, keys, values) -> None:
        layers, slots = (t.flatten() for t in torch.broadcast_tensors(layers, slots))
        block, offset = self.locate(slots)
        for layer in torch.unique(layers).tolist():
            mine = (layers == layer).nonzero().flatten()
            key_half, value_half = self._halves(layer)
            key_half[block[mine], :, offset[mine]] = keys[mine].to(key_half.dtype)
            value_half[block[mine], :, offset[mine]] = values[mine].to(value_half.dtype)
