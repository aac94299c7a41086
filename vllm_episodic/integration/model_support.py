"""Which models and vLLM features the episodic backend can serve, and why not.

Checked in the API-server process while vLLM builds its config, so an unsupported
model or feature fails at start-up with a message instead of misbehaving later.
"""

from __future__ import annotations

from typing import Any

SUPPORTED_MODELS_TEXT = (
    "decoder-only text models with rotary position embeddings and full (global) "
    "attention, e.g. Llama, Mistral, Qwen2, SmolLM2"
)

# head sizes the CPU attention kernels take (vllm cpu_attn.py)
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def _has_rope(hf_config: Any) -> bool:
    if getattr(hf_config, "position_embedding_type", "rope") not in ("rope", "rotary"):
        return False
    if getattr(hf_config, "alibi", False):
        return False
    params = getattr(hf_config, "rope_parameters", None) or {}
    return bool(
        getattr(hf_config, "rope_theta", None)
        or params.get("rope_theta")
        or any(isinstance(v, dict) and v.get("rope_theta") for v in params.values())
    )


def unsupported_model_reasons(model_config: Any) -> list[str]:
    """Every reason this model cannot use episodic attention (empty: supported)."""
    reasons = []
    hf = model_config.hf_text_config
    if model_config.runner_type != "generate":
        reasons.append(f"runner '{model_config.runner_type}' (only text generation is supported)")
    if model_config.is_encoder_decoder:
        reasons.append("encoder-decoder architecture (cross-attention has no episodic memory)")
    if model_config.use_mla:
        reasons.append("multi-head latent attention (MLA): its compressed KV has no per-head keys to retrieve by")
    if model_config.is_hybrid or getattr(hf, "layer_types", None) and any(
        t not in ("full_attention", "attention") for t in hf.layer_types
    ):
        reasons.append("hybrid or mixed layer types (state-space, linear or local-attention layers)")
    if model_config.get_sliding_window() is not None and getattr(hf, "use_sliding_window", True):
        reasons.append("the model's own sliding-window attention (episodic memory replaces long-range attention itself)")
    if model_config.is_multimodal_model or model_config.uses_mrope:
        reasons.append("multimodal inputs / M-RoPE positions")
    if not _has_rope(hf):
        reasons.append("no rotary position embeddings (RoPE) found in the model config (ALiBi or absolute positions)")
    head_size = model_config.get_head_size()
    if head_size not in CPU_HEAD_SIZES:
        reasons.append(f"head size {head_size} (the CPU kernels take {', '.join(map(str, CPU_HEAD_SIZES))})")
    return reasons


def unsupported_feature_reasons(vllm_config: Any) -> list[str]:
    """vLLM features the episodic backend does not handle yet."""
    reasons = []
    if vllm_config.speculative_config is not None:
        reasons.append("speculative decoding (--speculative-config)")
    if vllm_config.cache_config.cache_dtype not in ("auto", None):
        reasons.append(f"quantized KV cache (--kv-cache-dtype {vllm_config.cache_config.cache_dtype})")
    if vllm_config.lora_config is not None:
        reasons.append("LoRA adapters (--enable-lora)")
    if vllm_config.kv_transfer_config is not None:
        reasons.append("KV transfer / disaggregated prefill (--kv-transfer-config)")
    return reasons
