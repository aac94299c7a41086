"""Make ``--attention-backend episodic`` select our backend in every vLLM process.

Patches (each idempotent, applied by :func:`vllm_episodic.integration.register`):

1. ``AttentionBackendEnum``: ``EPISODIC`` becomes an alias of the ``CUSTOM`` member
   and ``CUSTOM`` points at our backend class for the platform (CPU: the CPU op's;
   CUDA, or CPU with ``VLLM_EPISODIC_TRITON_ON_CPU=1``: the Triton backend's).
   Why: vLLM parses the flag with ``AttentionBackendEnum[name.upper()]``. A new enum
   member would not unpickle in the engine-core process, which reads the config
   before it loads plugins; an alias pickles as ``CUSTOM``.
2. ``CpuPlatform.get_attn_backend_cls``: return our class when ``CUSTOM`` is selected
   (and vLLM's ``TRITON_ATTN`` when selected with the Triton-on-CPU switch).
   Why: the CPU platform ignores the selected backend and always returns CPU_ATTN.
3. ``<platform>.check_and_update_config``: validate the episodic config and the model
   at start-up (API-server process), store the resolved settings back into
   ``additional_config`` for the other processes, and turn off prefix caching.
4. ``EngineArgs.create_model_config``: allow ``--max-model-len`` beyond the model's
   trained length when episodic is selected (vLLM otherwise demands
   VLLM_ALLOW_LONG_MAX_MODEL_LEN=1; the backend keeps positions in range itself), and
   make the config's ``prefill_chunk_tokens`` the default ``max_num_batched_tokens``
   (vLLM picks its default after this call; an explicit ``--max-num-batched-tokens``
   wins).

Removal: when vLLM's CPU platform honours ``CUSTOM`` (1, 2) and plugins can declare
config sections (3).
"""

from __future__ import annotations

import functools
import logging
import os

from vllm_episodic.config import (
    ADDITIONAL_CONFIG_KEY,
    MODEL_DERIVED,
    EpisodicConfig,
    EpisodicConfigError,
)

# a child of vLLM's logger: printed by its handler, at its level, among its start-up lines
logger = logging.getLogger("vllm.episodic")

BACKEND_NAME = "EPISODIC"
# the backend class per platform
TRITON_BACKEND_PATH = "vllm_episodic.integration.triton_backend.EpisodicTritonBackend"
BACKEND_PATHS = {
    "cpu": "vllm_episodic.integration.cpu_backend.EpisodicCPUBackend",
    "cuda": TRITON_BACKEND_PATH,
}


def _platform_key() -> str:
    from vllm.platforms import current_platform

    return "cpu" if current_platform.is_cpu() else current_platform.device_type


def backend_path() -> str | None:
    from vllm_episodic.integration import triton_on_cpu

    if triton_on_cpu.wanted():
        return TRITON_BACKEND_PATH
    return BACKEND_PATHS.get(_platform_key())


def is_episodic(vllm_config) -> bool:
    """Whether this vLLM config selected the episodic backend."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    attention_config = getattr(vllm_config, "attention_config", None)
    return (
        attention_config is not None
        and attention_config.backend is AttentionBackendEnum.CUSTOM
        and _custom_is_ours()
    )


def _custom_is_ours() -> bool:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    path = backend_path()
    return path is not None and AttentionBackendEnum.CUSTOM.is_overridden() and (
        AttentionBackendEnum.CUSTOM.get_path() == path
    )


def install_backend_name() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    AttentionBackendEnum._member_map_[BACKEND_NAME] = AttentionBackendEnum.CUSTOM
    path = backend_path()
    if path is not None:
        register_backend(AttentionBackendEnum.CUSTOM, path)


def patch_platform() -> None:
    from vllm.platforms import current_platform
    from vllm.platforms.cpu import CpuPlatform

    if current_platform.is_cpu():
        _wrap_classmethod(CpuPlatform, "get_attn_backend_cls", _get_attn_backend_cls)
    _wrap_classmethod(type(current_platform), "check_and_update_config", _check_and_update_config)


def patch_engine_args() -> None:
    import vllm.envs as vllm_envs
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_model_config
    if getattr(original, "_episodic", False):
        return

    @functools.wraps(original)
    def create_model_config(self):
        if not _names_episodic(self):
            return original(self)
        # vLLM freezes its env reads once an engine is up (envs cache), so an
        # in-process second engine would not see the override without lifting it.
        cached = vllm_envs._is_envs_cache_enabled()
        vllm_envs.disable_envs_cache()
        previous = os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN")
        os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
        try:
            model_config = original(self)
        finally:
            if previous is None:
                os.environ.pop("VLLM_ALLOW_LONG_MAX_MODEL_LEN", None)
            else:
                os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = previous
            if cached:
                vllm_envs.enable_envs_cache()
        from vllm_episodic.integration.model_support import unsupported_model_reasons

        if unsupported_model_reasons(model_config):
            return model_config  # the platform check then fails saying why
        config = EpisodicConfig.from_additional_config(self.additional_config)
        chunk = config.with_model_defaults(trained_len(model_config)).prefill_chunk_tokens
        # without chunked prefill a prompt must fit one batch: vLLM's own default handles that
        if chunk is not None and self.max_num_batched_tokens is None and self.enable_chunked_prefill is not False:
            self.max_num_batched_tokens = chunk
        return model_config

    create_model_config._episodic = True
    EngineArgs.create_model_config = create_model_config


def _names_episodic(engine_args) -> bool:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    chosen = engine_args.attention_backend
    if chosen is None:
        config = engine_args.attention_config
        chosen = config.get("backend") if isinstance(config, dict) else getattr(config, "backend", None)
    if isinstance(chosen, str):
        return chosen.upper() in (BACKEND_NAME, "CUSTOM") and _custom_is_ours()
    return chosen is AttentionBackendEnum.CUSTOM and _custom_is_ours()


def _wrap_classmethod(cls, name: str, wrapper) -> None:
    original = getattr(cls, name)
    if getattr(original, "_episodic", False):
        return
    function = original.__func__

    @functools.wraps(function)
    def wrapped(klass, *args, **kwargs):
        return wrapper(function, klass, *args, **kwargs)

    wrapped._episodic = True
    setattr(cls, name, classmethod(wrapped))


def _get_attn_backend_cls(original, klass, selected_backend, attn_selector_config, num_heads=None):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if selected_backend is AttentionBackendEnum.CUSTOM and _custom_is_ours():
        reasons = []
        if attn_selector_config.use_mla:
            reasons.append("multi-head latent attention (MLA)")
        if attn_selector_config.use_sparse:
            reasons.append("sparse attention")
        if attn_selector_config.has_sink:
            reasons.append("learned attention-sink logits")
        if attn_selector_config.has_sliding_window:
            reasons.append("the model's own sliding-window attention")
        if reasons:
            raise ValueError(
                "the episodic attention backend cannot serve this model: "
                + "; ".join(reasons)
            )
        return AttentionBackendEnum.CUSTOM.get_path()
    from vllm_episodic.integration import triton_on_cpu

    if selected_backend is AttentionBackendEnum.TRITON_ATTN and triton_on_cpu.wanted():
        return triton_on_cpu.TRITON_ATTN_PATH
    return original(klass, selected_backend, attn_selector_config, num_heads)


def _check_and_update_config(original, klass, vllm_config) -> None:
    original(klass, vllm_config)
    if not is_episodic(vllm_config):
        return
    from vllm_episodic.integration.model_support import (
        SUPPORTED_MODELS_TEXT,
        unsupported_feature_reasons,
        unsupported_model_reasons,
    )

    if backend_path() is None:
        raise ValueError(
            f"the episodic attention backend runs on the CPU and CUDA platforms; this "
            f"platform is {_platform_key()!r}"
        )
    config = EpisodicConfig.from_additional_config(vllm_config.additional_config)
    model_config = vllm_config.model_config
    if model_config is not None:
        reasons = unsupported_model_reasons(model_config)
        if reasons:
            raise ValueError(
                f"the episodic attention backend cannot serve {model_config.model!r}: "
                + "; ".join(reasons)
                + f". Supported: {SUPPORTED_MODELS_TEXT}."
            )
        block_size = vllm_config.cache_config.block_size
        trained = trained_len(model_config)
        given = set(config.model_fields_set)
        config = config.resolved(trained, model_config.max_model_len, block_size,
                                 device_is_host=_platform_key() == "cpu")
        _log_settings(config, given, trained)
        if config.positions != "exact" and model_config.max_model_len > trained:
            _bound_prefill_chunk(vllm_config, trained - config.bounded_span(block_size))
    if not vllm_config.cache_config.enable_prefix_caching:
        config = config.model_copy(update={"kept_memory_gib": 0.0})
    reasons = unsupported_feature_reasons(vllm_config)
    if reasons:
        raise ValueError(
            "the episodic attention backend does not support "
            + "; ".join(reasons)
            + " yet; remove the option or use another attention backend"
        )
    _set_host_budget(config, model_config)
    # every process rebuilds the config from here, presets already resolved
    if not isinstance(vllm_config.additional_config, dict):
        raise EpisodicConfigError("--additional-config must be a JSON object")
    vllm_config.additional_config[ADDITIONAL_CONFIG_KEY] = config.model_dump()
    # vLLM's block hashing would share blocks the backend rewrites; prefixes are reused
    # through kept memories instead (prefix_reuse.py)
    vllm_config.cache_config.enable_prefix_caching = False


def _log_settings(config: EpisodicConfig, given: set[str], trained: int) -> None:
    """Say at start-up which sizes were derived from the model and which were given
    (once: the engine core process checks the resolved config again, every key given)."""
    def listed(keys):
        return ", ".join(f"{key}={getattr(config, key)}" for key in keys) or "none"

    derived = [key for key in MODEL_DERIVED if key not in given]
    chosen = [key for key in MODEL_DERIVED if key in given]
    if not derived:
        return
    logger.info("episodic: from the model (trained length %d): %s; given: %s", trained,
                listed(derived), listed(chosen))


def _bound_prefill_chunk(vllm_config, room: int) -> None:
    """Prefill chunks add to the local window's distances: keep them in the trained range."""
    scheduler = vllm_config.scheduler_config
    if room < 256:
        raise EpisodicConfigError(
            f"episodic config: only {room} tokens of the model's trained range are left for "
            "a prefill chunk; lower window_tokens"
        )
    if scheduler.max_num_batched_tokens > room:
        logger.info("episodic: prefill chunks limited to %d tokens (trained range)", room)
        scheduler.max_num_batched_tokens = room
        scheduler.max_num_seqs = min(scheduler.max_num_seqs, room)


def _set_host_budget(config: EpisodicConfig, model_config) -> None:
    """Let the API server reject requests at the host memory cap (``reject`` policy)."""
    from vllm_episodic.core.store import PAGE_TOKENS
    from vllm_episodic.integration import admission

    if config.host_memory_policy != "reject" or model_config is None:
        admission.set_budget(None)
        return
    admission.set_budget(admission.HostBudget(
        cap_bytes=int(config.host_memory_gib * (1 << 30)),
        headroom_bytes=PAGE_TOKENS * host_bytes_per_token(model_config),
    ))


def host_bytes_per_token(model_config) -> int:
    """Host K/V bytes of one token in the whole server: every layer and KV head, over
    all tensor-parallel ranks and pipeline stages (the caps are the server's)."""
    return (2 * model_config.get_total_num_hidden_layers() * model_config.get_total_num_kv_heads()
            * model_config.get_head_size() * model_config.dtype.itemsize)


def trained_len(model_config) -> int:
    """The context length the model was trained for (before any user override)."""
    hf = model_config.hf_text_config
    return int(
        getattr(hf, "original_max_position_embeddings", None)
        or getattr(hf, "max_position_embeddings", None)
        or model_config.max_model_len
    )


def episodic_config(vllm_config) -> EpisodicConfig:
    return EpisodicConfig.from_additional_config(vllm_config.additional_config)
