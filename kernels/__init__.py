"""Kernels of the episodic memory, each with its pure-torch reference, and the one place
that chooses between them.

Triton kernels run where the tensors are on a GPU and Triton is importable (or, with
``VLLM_EPISODIC_TRITON_ON_CPU=1``, on the CPU under Triton's interpreter); the torch
references run everywhere else (Triton has no CPU driver, only its interpreter, which
the tests use). ``VLLM_EPISODIC_TORCH_KERNELS=1`` forces the references.

Importable without vLLM or pydantic: the GPU check runs these on a machine with only
torch and Triton.
"""

from __future__ import annotations

import torch
from vllm_episodic.kernels.block_attention import block_attention_reference
from vllm_episodic.kernels.gather import gather_rotate_reference
from vllm_episodic.kernels.prefetch import Prefetcher
from vllm_episodic.kernels.score import (
    event_mass_reference,
    rank_within_budget,
    ranking_key,
    score_events_reference,
    score_layer_events_reference,
    select_within_budget,
    token_mass_reference,
)

from vllm_episodic import envs

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

__all__ = ["Prefetcher", "block_attention", "event_mass", "gather_rotate", "rank_within_budget", "ranking_key", "score_events",
           "score_layer_events", "select_within_budget", "token_mass", "uses_triton"]


def uses_triton(tensor: torch.Tensor) -> bool:
    """Whether work on ``tensor`` goes to the Triton kernels: on a GPU, or on the CPU
    under Triton's interpreter when the Triton path is asked for there
    (``VLLM_EPISODIC_TRITON_ON_CPU``)."""
    on_device = tensor.is_cuda or envs.get("VLLM_EPISODIC_TRITON_ON_CPU")
    return bool(on_device) and HAS_TRITON and not envs.get("VLLM_EPISODIC_TORCH_KERNELS")


def score_events(query, reps, owner, available) -> torch.Tensor:
    """Scores ``(events,)`` of every event of every batch row: see :mod:`.score`."""
    if uses_triton(reps):
        from vllm_episodic.kernels.score import score_events_triton

        return score_events_triton(query, reps, owner, available)
    return score_events_reference(query, reps, owner, available)


def score_layer_events(query, reps, available) -> torch.Tensor:
    """Scores ``[layers, events]`` of one request's events for every layer: see
    :func:`.score.score_layer_events_reference`."""
    if uses_triton(reps):
        from vllm_episodic.kernels.score import score_events_triton

        layers, events = reps.shape[:2]
        owner = torch.arange(layers, device=reps.device).repeat_interleave(events)
        flat = score_events_triton(query, reps.reshape(layers * events, *reps.shape[2:]), owner,
                                   available.repeat(layers))
        return flat.view(layers, events)
    return score_layer_events_reference(query, reps, available)


def event_mass(queries, reps, available) -> torch.Tensor:
    """Scores ``[layers, events]`` as estimated attention shares: see
    :func:`.score.event_mass_reference`. Torch ops on every device (one GEMM and a
    softmax per layer; no Triton kernel of its own)."""
    return event_mass_reference(queries, reps, available)


def token_mass(queries, keys, owner, events: int, **options) -> torch.Tensor:
    """Scores ``(events,)`` from every memory token's key: see
    :func:`.score.token_mass_reference` (torch ops on every device)."""
    return token_mass_reference(queries, keys, owner, events, **options)


def gather_rotate(src_k, src_v, src_index, dst_k, dst_v, dst_slot, cos_sin, position, is_neox_style: bool) -> None:
    """Selected tokens into cache slots, keys rotated: see :mod:`.gather`."""
    if uses_triton(dst_k):
        from vllm_episodic.kernels.gather import gather_rotate_triton

        return gather_rotate_triton(src_k, src_v, src_index, dst_k, dst_v, dst_slot, cos_sin, position,
                                    is_neox_style)
    return gather_rotate_reference(src_k, src_v, src_index, dst_k, dst_v, dst_slot, cos_sin, position,
                                   is_neox_style)


def block_attention(q, k_cache, v_cache, block_table, row_of, visible, scale: float):
    """Attention over assembled block lists: see :mod:`.block_attention`."""
    if uses_triton(q):
        from vllm_episodic.kernels.block_attention import block_attention_triton

        return block_attention_triton(q, k_cache, v_cache, block_table, row_of, visible, scale)
    return block_attention_reference(q, k_cache, v_cache, block_table, row_of, visible, scale)
