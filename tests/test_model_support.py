"""Models the episodic backend cannot serve fail at start-up, saying why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_model

# (transformers config class, its arguments, a fragment of the expected reason)
UNSUPPORTED = {
    "mla": ("DeepseekV2Config", dict(num_hidden_layers=2, hidden_size=256, num_attention_heads=4,
            num_key_value_heads=4, kv_lora_rank=64, q_lora_rank=None, qk_rope_head_dim=32,
            qk_nope_head_dim=32, v_head_dim=32, intermediate_size=512, moe_intermediate_size=128,
            n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=2, vocab_size=49152,
            max_position_embeddings=4096), "latent attention"),
    "no-rope": ("GPT2Config", dict(n_layer=2, n_embd=128, n_head=2, vocab_size=49152), "RoPE"),
    "alibi": ("BloomConfig", dict(n_layer=2, hidden_size=128, n_head=2, vocab_size=49152), "RoPE"),
    "sliding-window": ("MistralConfig", dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2,
                       num_key_value_heads=1, intermediate_size=256, vocab_size=49152, sliding_window=512,
                       max_position_embeddings=4096), "sliding-window"),
    "encoder-decoder": ("BartConfig", dict(encoder_layers=1, decoder_layers=1, d_model=64, vocab_size=49152,
                        encoder_attention_heads=2, decoder_attention_heads=2), "encoder-decoder"),
    "head-size": ("LlamaConfig", dict(num_hidden_layers=2, hidden_size=120, num_attention_heads=3,
                  num_key_value_heads=1, intermediate_size=256, vocab_size=49152, head_dim=40,
                  max_position_embeddings=4096), "head size 40"),
}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, model_dir):
    import transformers

    root = tmp_path_factory.mktemp("unsupported")
    return {name: tiny_model(getattr(transformers, cls_name)(**kwargs), root / name, model_dir)
            for name, (cls_name, kwargs, _) in UNSUPPORTED.items()}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_model_fails_at_startup_with_reason(tiny_models, name):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=tiny_models[name], attention_backend="episodic", enforce_eager=True,
                      max_model_len=1024)
    with pytest.raises(Exception) as err:
        args.create_engine_config()
    message = str(err.value)
    assert "episodic attention backend cannot serve" in message
    assert UNSUPPORTED[name][2] in message
    assert "Supported: decoder-only text models with rotary position embeddings" in message


def test_supported_model_passes_the_checks(model_dir):
    from vllm.engine.arg_utils import EngineArgs

    config = EngineArgs(model=model_dir, attention_backend="episodic", enforce_eager=True,
                        max_model_len=32768).create_engine_config()
    resolved = config.additional_config["episodic"]
    assert resolved["device_event_cache_tokens"] > 0  # defaults resolved for the model
    assert config.cache_config.enable_prefix_caching is False


@pytest.mark.parametrize(
    "backend, settings, chunk, expected",
    [
        (None, None, None, 2048),
        ("episodic", {}, None, 2048),
        ("episodic", {"preset": "qwen2"}, None, 4096),
        ("episodic", {"prefill_chunk_tokens": 3072}, None, 3072),
        ("episodic", {"preset": "qwen2"}, 2048, 2048),
    ],
)
def test_serving_prefill_chunk(model_dir, backend, settings, chunk, expected):
    """``vllm serve`` chunks prefills by 2,048 tokens on CPU; ``prefill_chunk_tokens``
    (4,096 in the qwen2 preset) replaces that default, ``--max-num-batched-tokens`` wins."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext

    extra = {} if settings is None else {"episodic": settings}
    config = EngineArgs(model=model_dir, attention_backend=backend, enforce_eager=True, max_model_len=8192,
                        max_num_batched_tokens=chunk, additional_config=extra,
                        ).create_engine_config(UsageContext.OPENAI_API_SERVER)
    assert config.scheduler_config.max_num_batched_tokens == expected


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_prefill_chunks_past_the_trained_length_keep_distances_trained(model_dir, prefix_caching):
    """Past SmolLM2's trained 8K, a prefill chunk's queries sit behind sinks + retrieved
    memory + window at bounded distances: the chunk is lowered so that every distance
    stays within 8K, with kept memories on (the default) or off."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_episodic.config import EpisodicConfig

    config = EngineArgs(model=model_dir, attention_backend="episodic", enforce_eager=True, max_model_len=32768,
                        max_num_batched_tokens=8192, enable_prefix_caching=prefix_caching,
                        additional_config={"episodic": {"preset": "smollm2"}}).create_engine_config()
    episodic = EpisodicConfig.model_validate(config.additional_config["episodic"])
    chunk = config.scheduler_config.max_num_batched_tokens
    assert 256 <= chunk < 8192
    assert chunk + episodic.bounded_span(config.cache_config.block_size) <= 8192


@pytest.mark.server
def test_unsupported_model_through_the_cli(tiny_models):
    vllm = str(Path(sys.executable).with_name("vllm"))
    proc = subprocess.run([vllm, "serve", tiny_models["no-rope"], "--attention-backend", "episodic",
                           "--max-model-len", "1024"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "no rotary position embeddings (RoPE)" in proc.stdout + proc.stderr


def _trained_on(model_dir: str, folder: Path, trained: int) -> str:
    """SmolLM2's folder with its config claiming ``trained`` positions (weights linked)."""
    import json

    folder.mkdir()
    for item in Path(model_dir).iterdir():
        (folder / item.name).symlink_to(item)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": trained}))
    return str(folder)


@pytest.mark.parametrize("trained, preset", [(8192, "smollm2"), (32768, "qwen2")])
def test_serving_with_no_config_derives_the_model_s_preset(model_dir, tmp_path, trained, preset):
    """``vllm serve MODEL --attention-backend episodic`` with no settings: the sizes and
    the prefill chunk come from the model's trained length, and equal what the preset
    measured for a model of that length (SmolLM2 8K: ``smollm2``; Qwen2.5 32K:
    ``qwen2``) as vLLM's engine config carries them to every worker."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext

    from vllm_episodic.config import MODEL_DERIVED, EpisodicConfig

    model = _trained_on(model_dir, tmp_path / "model", trained)

    def served(settings):
        config = EngineArgs(model=model, attention_backend="episodic", enforce_eager=True, max_model_len=65536,
                            additional_config={"episodic": settings},
                            ).create_engine_config(UsageContext.OPENAI_API_SERVER)
        episodic = EpisodicConfig.model_validate(config.additional_config["episodic"])
        sizes = {key: getattr(episodic, key) for key in MODEL_DERIVED}
        sizes["bounded_budget_tokens"] = episodic.largest_budget
        return sizes, config.scheduler_config.max_num_batched_tokens

    derived, with_preset = served({}), served({"preset": preset})
    assert derived == with_preset
