"""The one configuration model of the episodic backend.

Values come, lowest priority first, from the field defaults, the sizes derived from the
served model's trained length (:func:`model_defaults`, for the keys in
``MODEL_DERIVED``), a YAML preset in ``configs/`` (by name, or a path to a YAML file),
and the keys a user passes through vLLM's own ``--additional-config``::

    vllm serve MODEL --attention-backend episodic \\
        --additional-config '{"episodic": {"preset": "fast", "window_tokens": 2048}}'

Every field is validated; an unknown key or a bad value raises
:class:`EpisodicConfigError`, whose message names the field and what it accepts.
The algorithm modules never import this file (they take plain numbers), so they
run where pydantic is not installed.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vllm_episodic.core.constants import REANCHOR as BOUNDED_DRIFT

#: the key of ``--additional-config`` that holds our settings
ADDITIONAL_CONFIG_KEY = "episodic"

#: keys that, unless a preset or the user gives them, follow from the model's trained
#: length (:func:`model_defaults`); the other keys' defaults suit every model
MODEL_DERIVED = ("window_tokens", "retrieval_budget_tokens", "bounded_budget_tokens",
                 "retrieval_interval", "prefill_chunk_tokens", "prompt_end_queries")


def model_defaults(trained_len: int, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``MODEL_DERIVED`` settings for a model trained on ``trained_len`` tokens that
    ``given`` (the keys a preset or the user set, which win) leaves open. Each is a
    function of the trained length alone, except that a given retrieval budget is also
    the bounded budget.

    The rule reproduces what was measured per model (the ``smollm2`` preset for
    SmolLM2, trained on 8K tokens; ``qwen2`` for Qwen2.5, 32K; docs/natural-text.md):

    - window: 1/16 of the trained length, a power of two between 1,024 and 4,096 (EM-LLM's
      window; a larger one costs every step, and memory forms later), at most 1/8 of it
      (models trained on less than 8K tokens);
    - retrieval budget: the window;
    - bounded budget (decode steps past the trained length): the budget, at least 2,048
      (at most 1/4 of the trained length) — read in the bounded frame, 1K retrieved tokens
      found 8 of 20 SmolLM2 needles at 16K and 2K 11; a budget that is given keeps its own
      value here;
    - retrieval every 8th decode step (on 2 CPU cores retrieving at every step cost more
      than the attention it saved);
    - prefill chunk: twice that window (Qwen2.5 with a 2K window lost QA answers with
      2,048-token chunks; SmolLM2 with a 1K window lost multi-key needles with 4,096);
    - the prompt's end reading all of memory: 2^20 / trained length queries, between 16
      and 128, so that its cost (queries × context) stays the same at the trained length.
    """
    given = given or {}
    derived: dict[str, Any] = {}
    eighth = _power_of_two_below(trained_len // 8)
    window = min(4096, max(min(1024, eighth), _power_of_two_below(trained_len // 16)))
    derived["window_tokens"] = window
    derived["retrieval_budget_tokens"] = window
    derived["bounded_budget_tokens"] = None if "retrieval_budget_tokens" in given else max(window, min(2048, 2 * eighth))
    derived["retrieval_interval"] = 8
    derived["prefill_chunk_tokens"] = 2 * window
    derived["prompt_end_queries"] = min(128, max(16, (1 << 20) // max(trained_len, 1)))
    return {key: value for key, value in derived.items() if key not in given}


def _power_of_two_below(n: int) -> int:
    return 1 << max(n, 1).bit_length() - 1


class EpisodicConfigError(ValueError):
    """A user-facing configuration error; the message says what to change."""


class EpisodicConfig(BaseModel):
    """Settings of the episodic memory. Token counts are per request."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    sink_tokens: int = Field(128, ge=0, le=65536)
    """Tokens at the start of every request that are always attended (attention sinks)."""

    window_tokens: int = Field(4096, ge=16, le=1 << 20)
    """Most recent tokens attended at exact relative positions (the local window). From
    the model: 1/16 of its trained length, a power of two in [1,024, 4,096] (at most 1/8
    of it)."""

    retrieval_budget_tokens: int = Field(2048, ge=0, le=1 << 20)
    """Tokens of retrieved events attended per layer and step (similarity + contiguity).
    From the model: the window."""

    bounded_budget_tokens: int | None = Field(None, ge=0, le=1 << 20)
    """Tokens of retrieved events a decode step attends per layer past the model's
    trained length (bounded positions), at least ``retrieval_budget_tokens`` (None: that
    budget). Memory placed at trained distances reads less well than in place, and
    more of it helps there, while within the trained length it mostly distracts. From
    the model: the budget, at least 2,048 (None when the budget is given)."""

    min_event_tokens: int = Field(8, ge=1, le=65536)
    """Smallest event; surprise boundaries closer than this are dropped."""

    max_event_tokens: int = Field(128, ge=1, le=65536)
    """Largest event; longer unsurprising runs are cut at this size."""

    segmentation: Literal["surprise", "fixed"] = "surprise"
    """``surprise``: EM-LLM boundaries; ``fixed``: InfLLM-style blocks of max_event_tokens."""

    surprise_gamma: float = Field(1.0, ge=0.0, le=10.0)
    """A token opens an event when its surprise exceeds mean + gamma * std."""

    surprise_window: int = Field(128, ge=2, le=1 << 20)
    """How many earlier tokens' surprise the mean and std are taken over."""

    retrieval_interval: int = Field(1, ge=1, le=1024)
    """Decode steps between retrievals (1: every step, as EM-LLM). In between, each layer
    attends the events it last retrieved, so its device cache is not rewritten; prefill
    chunks always retrieve. From the model: 8."""

    retrieval_scoring: Literal["mass", "dot"] = "mass"
    """How events are ranked. ``mass``: each event's estimated share of attention — per
    head a softmax over events of ``q · representative + log(event tokens)``, summed
    over heads, each head's largest over the scoring queries (a decode step's
    ``retrieval_interval`` latest queries; up to 64 of a prefill chunk's, its last 16
    among them): the few heads that look for a fact are not drowned by the many that
    attend broadly. ``dot``: InfLLM's and EM-LLM's sum over heads of the dot product
    with the mean query (the previous query for a decode step)."""

    prefill_query_tokens: int = Field(0, ge=0, le=1 << 20)
    """A prefill chunk scores events with its last this many queries only (0: queries
    from all of the chunk). The chunk's last tokens are the ones the next token (the
    first generated one, after the prompt's last chunk) follows from."""

    prefill_chunk_tokens: int | None = Field(None, ge=256, le=1 << 20)
    """Prefill chunk (``max_num_batched_tokens``) when ``--max-num-batched-tokens`` is not
    given; None: vLLM's default (2,048 for ``vllm serve`` on CPU). Each chunk retrieves
    once and attends its own tokens exactly. Past the trained length the chunk is
    lowered to what keeps positions in range. From the model: twice the window it
    derives."""

    contiguity_share: float = Field(0.3, ge=0.0, lt=1.0)
    """Share of the retrieval budget given to temporal neighbours of retrieved events."""

    refinement: bool = False
    """Move surprise boundaries to improve the key-similarity graph metric."""

    refinement_metric: Literal["modularity", "conductance"] = "modularity"
    """Graph metric the refinement optimises (modularity up, conductance down)."""

    representatives_per_event: int = Field(0, ge=0, le=64)
    """What similarity retrieval scores an event by. 0: the mean key of all its tokens;
    r > 0: EM-LLM's mean key of the r tokens each query head attends most from the
    request's recent queries (on natural prose these ranked needles far lower)."""

    representatives_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """How representative keys are held and scored: the 16-bit dtypes halve their host
    memory and the bytes every retrieval reads (``float16`` rounds scores less than
    ``bfloat16``; queries are scaled so that its scores cannot overflow); ``float32``
    for exact scores."""

    device_event_cache_tokens: int | None = Field(None, ge=0, le=1 << 24)
    """Event tokens kept on the device per request: the retrieved ones plus an LRU reserve.
    Default: twice the budget, capped so that the cache fills before the trained length;
    on the CPU platform just the budget (the device is host memory: a reserve only adds
    copies)."""

    host_memory_gib: float = Field(16.0, gt=0.0, le=1 << 20)
    """Cap on host memory for the event store of the whole server, in GiB."""

    kept_memory_gib: float | None = Field(None, ge=0.0, le=1 << 20)
    """Host memory (GiB, part of ``host_memory_gib``) for *kept memories*: the memory of
    finished requests, reused by later requests whose prompts start with the same
    tokens (the next turn of a conversation, another question on one document), which
    then prefill only what follows. The most they may hold: the least recently used go
    first beyond it, and whenever live requests need the room (kept memories yield to
    them before a live request is rejected or loses pages). Default: a quarter of
    ``host_memory_gib``. 0, or vLLM's ``--no-enable-prefix-caching``, turns reuse off."""

    host_memory_policy: Literal["reject", "evict"] = "reject"
    """At the cap: ``reject`` new requests, or ``evict`` least-recently-retrieved events."""

    positions: Literal["auto", "exact", "bounded"] = "auto"
    """``exact``: true positions; ``bounded``: memory at a fixed distance (InfLLM);
    ``auto``: exact while the context fits the model's trained length."""

    full_memory_at_prompt_end: bool = True
    """The prompt's last ``prompt_end_queries`` tokens (where a question usually sits)
    read all of memory. With exact positions they attend every memory token, not only
    the retrieved ones (in torch over the host store, once per prompt: the first token
    waits for ~queries × context more attention; decode is unchanged), so the
    question's keys and values carry what it read, as with full attention. In both
    frames they score every memory token's key, and the decode steps that answer add
    those scores to their own; in the bounded frame they attend only the budget, to
    keep distances trained."""

    prompt_end_queries: int = Field(128, ge=0, le=1 << 20)
    """How many of the prompt's last tokens ``full_memory_at_prompt_end`` gives all of
    memory (at most the chunk that ends the prompt; 0: that whole chunk). From the
    model: 2^20 / its trained length, in [16, 128] (the cost, queries × context, the
    same at every trained length)."""

    @model_validator(mode="after")
    def _check_consistent(self) -> EpisodicConfig:
        if self.min_event_tokens > self.max_event_tokens:
            raise ValueError(
                f"min_event_tokens ({self.min_event_tokens}) must not exceed "
                f"max_event_tokens ({self.max_event_tokens})"
            )
        if 0 < self.retrieval_budget_tokens < self.max_event_tokens:
            raise ValueError(
                f"retrieval_budget_tokens ({self.retrieval_budget_tokens}) must be 0 "
                f"(no retrieval) or at least max_event_tokens ({self.max_event_tokens}), "
                "so that one event fits"
            )
        if self.kept_memory_gib is not None and self.kept_memory_gib >= self.host_memory_gib:
            raise ValueError(
                f"kept_memory_gib ({self.kept_memory_gib}) must be less than host_memory_gib "
                f"({self.host_memory_gib}): live requests need the rest"
            )
        if self.bounded_budget_tokens is not None and self.bounded_budget_tokens < self.retrieval_budget_tokens:
            raise ValueError(
                f"bounded_budget_tokens ({self.bounded_budget_tokens}) must be at least "
                f"retrieval_budget_tokens ({self.retrieval_budget_tokens})"
            )
        if (self.device_event_cache_tokens is not None
                and self.device_event_cache_tokens < self.largest_budget):
            raise ValueError(
                f"device_event_cache_tokens ({self.device_event_cache_tokens}) must be at "
                f"least the largest retrieval budget ({self.largest_budget}: "
                "retrieval_budget_tokens, bounded_budget_tokens)"
            )
        return self

    @property
    def largest_budget(self) -> int:
        """The most retrieved-event tokens any step attends."""
        return max(self.retrieval_budget_tokens, self.bounded_budget_tokens or 0)

    def bounded_span(self, block_size: int) -> int:
        """Largest distance a query sees in the bounded frame, prefill chunk excluded:
        sinks, memory placed behind the window (a run of consecutive events: at most the
        budget plus the cut event's tail), the window, the open event and the block
        alignment of the local part, and the anchor's drift."""
        sinks = -(-self.sink_tokens // block_size) * block_size
        memory = self.largest_budget + self.max_event_tokens
        return sinks + memory + self.max_event_tokens + self.window_tokens + block_size + BOUNDED_DRIFT

    def with_model_defaults(self, trained_len: int) -> EpisodicConfig:
        """The ``MODEL_DERIVED`` keys that no preset or user gave, filled in for a model
        trained on ``trained_len`` tokens (:func:`model_defaults`); every key is then set."""
        given = {key: getattr(self, key) for key in self.model_fields_set}
        derived = model_defaults(trained_len, given)
        try:
            return EpisodicConfig.model_validate({**self.model_dump(), **derived})
        except ValidationError as exc:
            raise EpisodicConfigError(
                _describe(exc, None) + f"\n  (derived from the model's trained length {trained_len}: "
                + ", ".join(f"{key}={value}" for key, value in derived.items()) + ")"
            ) from None

    def resolved(self, trained_len: int, max_model_len: int, block_size: int,
                 device_is_host: bool = False) -> EpisodicConfig:
        """Settings for one model: the keys no one gave derived from its trained length,
        the default event cache size filled in, checked so that the model stays in its
        trained range.

        ``device_is_host``: the "device" cache is host memory (the CPU platform). Keeping
        dropped events in a reserve then saves no transfer, only adds a copy per dropped
        event (SmolLM2, 30K context: 30.4 → 26.1 ms per decode step without it).
        """
        config = self.with_model_defaults(trained_len)
        sinks = -(-config.sink_tokens // block_size) * block_size
        room = trained_len - sinks - config.window_tokens - config.max_event_tokens - block_size
        cache = config.device_event_cache_tokens
        if cache is None and device_is_host:
            cache = config.largest_budget
        elif cache is None:
            cache = max(config.largest_budget, min(2 * config.largest_budget, room))
        kept = config.host_memory_gib / 4 if config.kept_memory_gib is None else config.kept_memory_gib
        config = config.model_copy(update={"device_event_cache_tokens": cache, "kept_memory_gib": kept})
        if config.positions != "exact" and max_model_len > trained_len:
            span = config.bounded_span(block_size)
            if span > trained_len:
                raise EpisodicConfigError(
                    f"episodic config: sinks + window + events ({span} tokens) exceed the "
                    f"model's trained length {trained_len}; lower window_tokens so that "
                    "memory stays at a trained distance"
                )
        return config

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> EpisodicConfig:
        """Build from vLLM's ``additional_config`` (the ``--additional-config`` JSON)."""
        section = {}
        if isinstance(additional_config, dict):
            section = additional_config.get(ADDITIONAL_CONFIG_KEY) or {}
        if not isinstance(section, dict):
            raise EpisodicConfigError(
                f"--additional-config key {ADDITIONAL_CONFIG_KEY!r} must be a JSON "
                f"object of settings, got {type(section).__name__}"
            )
        return cls.from_dict(section)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EpisodicConfig:
        """Preset (``values["preset"]``, optional) overlaid with the other keys."""
        values = dict(values)
        preset = values.pop("preset", None)
        merged = {**load_preset(preset), **values} if preset is not None else values
        try:
            return cls.model_validate(merged)
        except ValidationError as exc:
            raise EpisodicConfigError(_describe(exc, preset)) from None


def preset_names() -> list[str]:
    folder = resources.files("vllm_episodic.configs")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(preset: Any) -> dict[str, Any]:
    """Values of a preset given by name (``configs/<name>.yaml``) or by file path."""
    if not isinstance(preset, str) or not preset:
        raise EpisodicConfigError(
            f"episodic config: preset must be a name ({', '.join(preset_names())}) "
            f"or a path to a YAML file, got {preset!r}"
        )
    if preset in preset_names():
        text = resources.files("vllm_episodic.configs").joinpath(f"{preset}.yaml").read_text()
    elif Path(preset).is_file():
        text = Path(preset).read_text()
    else:
        raise EpisodicConfigError(
            f"episodic config: unknown preset {preset!r}; use one of "
            f"{', '.join(preset_names())} or a path to a YAML file"
        )
    values = yaml.safe_load(text) or {}
    if not isinstance(values, dict):
        raise EpisodicConfigError(f"episodic preset {preset!r} must be a YAML mapping")
    return values


def _describe(exc: ValidationError, preset: str | None) -> str:
    """One line per problem: the field, what was wrong, and what it accepts."""
    fields = sorted(EpisodicConfig.model_fields)
    lines = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"]) or "(settings)"
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key {name!r}; valid keys: {', '.join(fields)}")
        else:
            doc = EpisodicConfig.model_fields.get(name)
            hint = f" ({doc.description})" if doc is not None and doc.description else ""
            got = f", got {err['input']!r}" if "input" in err and err["type"] != "value_error" else ""
            lines.append(f"{name}: {err['msg']}{got}{hint}")
    origin = f" (preset {preset!r} + --additional-config)" if preset else ""
    return "invalid episodic config" + origin + ":\n  " + "\n  ".join(lines)
