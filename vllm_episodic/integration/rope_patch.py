"""The model's rotary embedding: find it, keep it in bounds, share its angles.

Patch: each RoPE module's ``cos_sin_cache`` is recomputed for ``max_model_len``
positions when it has fewer rows.
Why: vLLM builds the table for ``max_position_embeddings`` rows and indexes it without
bounds checks: positions past the trained length silently produce NaN garbage. With
the episodic backend the absolute positions only set the local window's relative
distances (and exact-mode memory), so a longer table keeps vLLM's own RoPE path in
range without the user passing ``--hf-overrides``. Rows below the trained length are
recomputed by the same code and stay identical.
Removal: when vLLM sizes the table from ``max_model_len``.
"""

from __future__ import annotations

import torch

from vllm_episodic.core.rope import Rope


def _rope_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    seen, modules = set(), []
    for module in model.modules():
        if isinstance(getattr(module, "cos_sin_cache", None), torch.Tensor) and id(module) not in seen:
            seen.add(id(module))
            modules.append(module)
    return modules


def model_rope(model: torch.nn.Module, max_model_len: int) -> Rope:
    """Extend every RoPE table of ``model`` to ``max_model_len`` rows; return their shared
    angles as a :class:`Rope`."""
    modules = _rope_modules(model)
    if not modules:
        raise ValueError(
            "the episodic attention backend needs rotary position embeddings: no RoPE "
            "module (with a cos/sin table) was found in this model"
        )
    for module in modules:
        table = module.cos_sin_cache
        if table.shape[0] < max_model_len:
            module.max_position_embeddings = max_model_len
            longer = module._compute_cos_sin_cache().to(dtype=table.dtype, device=table.device)
            if longer.shape[0] < max_model_len or not torch.equal(longer[: table.shape[0]], table):
                raise ValueError(
                    f"cannot extend the RoPE table of {type(module).__name__} to "
                    f"{max_model_len} positions"
                )
            module.cos_sin_cache = longer
    first = modules[0]
    if any(not torch.equal(m.cos_sin_cache, first.cos_sin_cache) for m in modules[1:]):
        raise ValueError("layers with different RoPE tables are not supported (e.g. local/global RoPE)")
    rope = Rope(first.cos_sin_cache, first.head_size, first.is_neox_style)
    if rope.magnitude_error() > 1e-2:
        raise ValueError(
            f"{type(first).__name__} scales cos/sin (YaRN-style attention scaling); the episodic "
            "backend supports plain, linear, NTK and Llama-3 RoPE"
        )
    if first.cos_sin_cache.device.type == "cpu":
        rope.native = _fused_rotation(first.cos_sin_cache, first.head_size, first.is_neox_style)
    return rope


def _fused_rotation(table: torch.Tensor, head_size: int, is_neox_style: bool):
    """vLLM's CPU rotary op (the one the model's layers use) as ``Rope.native``: ~40x
    faster than rotating in torch (a gather of 2K tokens for 30 layers per retrieval), at
    the precision vLLM rotates the keys of the paged cache (a table in the keys' dtype)."""
    from vllm import _custom_ops as ops

    tables: dict[torch.dtype, torch.Tensor] = {}

    def rotate(x: torch.Tensor, positions: torch.Tensor) -> None:
        cos_sin = tables.get(x.dtype)
        if cos_sin is None:
            cos_sin = tables[x.dtype] = table.to(x.dtype)
        ops.rotary_embedding(positions, x.view(x.shape[0], -1), None, head_size, cos_sin, is_neox_style)

    return rotate
