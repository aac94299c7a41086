"""EpisodicConfig: defaults, presets, overrides and the messages of bad input."""

import pytest

from vllm_episodic.config import MODEL_DERIVED, EpisodicConfig, EpisodicConfigError, preset_names


def test_defaults_are_em_llm_choices():
    config = EpisodicConfig()
    assert (config.sink_tokens, config.window_tokens, config.retrieval_budget_tokens) == (128, 4096, 2048)
    assert (config.min_event_tokens, config.max_event_tokens) == (8, 128)
    assert config.segmentation == "surprise" and config.positions == "auto"


def test_presets_ship_and_validate():
    assert {"default", "fast", "infllm"} <= set(preset_names())
    for name in preset_names():
        EpisodicConfig.from_dict({"preset": name})


def test_knobs_override_the_preset():
    config = EpisodicConfig.from_additional_config(
        {"episodic": {"preset": "fast", "window_tokens": 512}}
    )
    assert config.window_tokens == 512
    assert config.retrieval_budget_tokens == 1024  # from the preset


def test_preset_from_a_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("window_tokens: 777\nsegmentation: fixed\n")
    config = EpisodicConfig.from_dict({"preset": str(path)})
    assert (config.window_tokens, config.segmentation) == (777, "fixed")


def test_no_episodic_section_means_defaults():
    assert EpisodicConfig.from_additional_config({}) == EpisodicConfig()
    assert EpisodicConfig.from_additional_config({"other_plugin": 1}) == EpisodicConfig()


def test_unknown_key_lists_the_valid_keys():
    with pytest.raises(EpisodicConfigError) as err:
        EpisodicConfig.from_dict({"windw_tokens": 10})
    message = str(err.value)
    assert "unknown key 'windw_tokens'" in message and "window_tokens" in message


@pytest.mark.parametrize(
    "values, fragments",
    [
        ({"segmentation": "random"}, ["segmentation", "'surprise'", "'fixed'"]),
        ({"positions": "absolute"}, ["positions", "'auto'", "'exact'", "'bounded'"]),
        ({"representatives_dtype": "float8"}, ["representatives_dtype", "'float16'", "'bfloat16'", "'float32'"]),
        ({"window_tokens": -5}, ["window_tokens", "greater than or equal to 16"]),
        ({"contiguity_share": 1.5}, ["contiguity_share", "less than 1"]),
        ({"prefill_query_tokens": -1}, ["prefill_query_tokens", "greater than or equal to 0"]),
        ({"prefill_chunk_tokens": 100}, ["prefill_chunk_tokens", "greater than or equal to 256"]),
        ({"sink_tokens": "many"}, ["sink_tokens", "valid integer"]),
        ({"min_event_tokens": 64, "max_event_tokens": 32}, ["min_event_tokens", "max_event_tokens"]),
        ({"retrieval_budget_tokens": 64, "max_event_tokens": 128}, ["retrieval_budget_tokens", "one event fits"]),
        ({"device_event_cache_tokens": 100}, ["device_event_cache_tokens", "retrieval_budget_tokens"]),
        ({"bounded_budget_tokens": 1024}, ["bounded_budget_tokens", "retrieval_budget_tokens"]),
        ({"bounded_budget_tokens": 4096, "device_event_cache_tokens": 2048}, ["device_event_cache_tokens", "4096"]),
        ({"host_memory_gib": 2, "kept_memory_gib": 2}, ["kept_memory_gib", "less than host_memory_gib"]),
        ({"kept_memory_gib": -1}, ["kept_memory_gib", "greater than or equal to 0"]),
    ],
)
def test_bad_values_name_the_field_and_what_it_accepts(values, fragments):
    with pytest.raises(EpisodicConfigError) as err:
        EpisodicConfig.from_dict(values)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_bad_preset_and_bad_section():
    with pytest.raises(EpisodicConfigError, match="unknown preset 'nope'.*default"):
        EpisodicConfig.from_dict({"preset": "nope"})
    with pytest.raises(EpisodicConfigError, match="must be a JSON object"):
        EpisodicConfig.from_additional_config({"episodic": [1, 2]})


def test_resolving_for_a_model_keeps_memory_in_trained_range():
    config = EpisodicConfig(window_tokens=8000)
    config.resolved(trained_len=8192, max_model_len=8192, block_size=128)  # fits: nothing to bound
    with pytest.raises(EpisodicConfigError, match="exceed the model's trained length 8192"):
        config.resolved(trained_len=8192, max_model_len=65536, block_size=128)
    EpisodicConfig(window_tokens=8000, positions="exact").resolved(8192, 65536, 128)
    # the span counts the largest budget: 128 + 6656 + 128 + 128 + 1024 + 128 + 128 > 8192
    with pytest.raises(EpisodicConfigError, match="exceed the model's trained length 8192"):
        EpisodicConfig(window_tokens=1024, retrieval_budget_tokens=1024,
                       bounded_budget_tokens=6656).resolved(8192, 65536, 128)


def test_default_event_cache_is_twice_the_budget_within_the_trained_range():
    assert EpisodicConfig().resolved(32768, 65536, 128).device_event_cache_tokens == 4096
    # SmolLM2 (8K) with EM-LLM's window: 8192 - 128 sinks - 4096 window - 128 event - 128 block
    em_llm = EpisodicConfig(window_tokens=4096, retrieval_budget_tokens=2048)
    assert em_llm.resolved(8192, 65536, 128).device_event_cache_tokens == 3712
    assert EpisodicConfig(device_event_cache_tokens=5000).resolved(8192, 65536, 128).device_event_cache_tokens == 5000


def test_default_event_cache_on_the_cpu_platform_is_the_budget():
    """Where the device is host memory the cache holds the retrieved events only (no
    reserve); an explicit size is kept."""
    assert EpisodicConfig().resolved(32768, 65536, 128, device_is_host=True).device_event_cache_tokens == 2048
    # the largest budget any step attends: decode steps past the trained length here
    bounded = EpisodicConfig(retrieval_budget_tokens=1024, bounded_budget_tokens=3072)
    assert bounded.resolved(32768, 65536, 128, device_is_host=True).device_event_cache_tokens == 3072
    config = EpisodicConfig(device_event_cache_tokens=5000)
    assert config.resolved(8192, 65536, 128, device_is_host=True).device_event_cache_tokens == 5000


def test_kept_memory_defaults_to_a_quarter_of_the_host_cap():
    assert EpisodicConfig(host_memory_gib=8).resolved(8192, 8192, 128).kept_memory_gib == 2
    assert EpisodicConfig(kept_memory_gib=0).resolved(8192, 8192, 128).kept_memory_gib == 0


def _for_model(settings: dict, trained: int) -> EpisodicConfig:
    return EpisodicConfig.from_dict(settings).resolved(trained, 4 * trained, 16, device_is_host=True)


def _sizes(config: EpisodicConfig) -> dict:
    """The derived keys as they act (a bounded budget of None is the retrieval budget)."""
    sizes = {key: getattr(config, key) for key in MODEL_DERIVED}
    sizes["bounded_budget_tokens"] = config.largest_budget
    return sizes


@pytest.mark.parametrize("trained, preset", [(8192, "smollm2"), (32768, "qwen2")])
def test_no_config_gives_what_the_model_s_preset_measured(trained, preset):
    """With no settings the sizes follow from the trained length: SmolLM2 (8K) gets the
    ``smollm2`` preset, Qwen2.5 (32K) the ``qwen2`` preset — the values measured on
    each model (docs/natural-text.md), set by hand in the YAML files."""
    assert _for_model({}, trained) == _for_model({"preset": preset}, trained).model_copy(
        update={"bounded_budget_tokens": _for_model({}, trained).bounded_budget_tokens})
    assert _sizes(_for_model({}, trained)) == _sizes(_for_model({"preset": preset}, trained))


def test_given_keys_win_over_the_model_and_sizes_follow_them():
    config = _for_model({"window_tokens": 2048}, 8192)
    assert (config.window_tokens, config.retrieval_budget_tokens, config.prefill_chunk_tokens) == (2048, 1024, 2048)
    assert config.retrieval_interval == 8
    # a given budget is read past the trained length too (no derived 2K floor)
    assert _for_model({"retrieval_budget_tokens": 512}, 8192).largest_budget == 512
    assert _for_model({"retrieval_budget_tokens": 512}, 8192).window_tokens == 1024
    # a preset's explicit null (vLLM's own prefill chunk) is given, not derived
    published = _for_model({"preset": "default"}, 32768)
    assert (published.window_tokens, published.retrieval_budget_tokens) == (4096, 2048)
    assert (published.retrieval_interval, published.prefill_chunk_tokens) == (1, None)


@pytest.mark.parametrize("trained", [2048, 4096, 8192, 32768, 131072, 1 << 20])
def test_derived_sizes_keep_memory_within_the_trained_range(trained):
    """Every trained length gets sizes whose bounded frame fits it (resolving checks the
    span past the trained length and raises otherwise)."""
    config = _for_model({}, trained)
    assert config.bounded_span(16) <= trained
    assert 16 <= config.prompt_end_queries <= 128 and config.window_tokens <= 4096


def test_a_bad_combination_with_derived_sizes_names_them():
    with pytest.raises(EpisodicConfigError, match=r"max_event_tokens \(2048\)[\s\S]*derived from the model"):
        _for_model({"max_event_tokens": 2048}, 8192)
