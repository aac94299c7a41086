"""The episodic state of one vLLM model runner, and how the backend finds it.

vLLM gives attention metadata builders no handle on the model runner, and its
metadata carries no request ids. The runner hooks (``runner_hooks.py``) therefore
create one :class:`WorkerRuntime` per model runner, keyed by the runner's
``VllmConfig`` object (the very object vLLM hands the builders), record each step's
batch in it, and the builders find it with :func:`runtime_for`.

A step, as the runtime sees it:

1. ``_update_states`` hook: release finished/aborted/preempted requests, note the
   batch's request ids (:meth:`on_requests_gone`, :meth:`on_batch_updated`);
2. metadata build: :meth:`plan_step` plans every row (``EpisodicMemory.plan_step``);
3. the layers attend (``cpu_backend.EpisodicCPUImpl``);
4. model-forward hook: surprise of the step's tokens, then ``EpisodicMemory.end_step``
   moves the tokens that left the window into events (:meth:`after_forward`);
5. logits hook: keep each row's next-token logits for the next token's surprise.
"""

from __future__ import annotations

import torch

import time

from vllm_episodic import envs
from vllm_episodic.core.memory import BatchRow, EpisodicMemory, ModelShape, RowPlan, select_ahead, select_layer
from vllm_episodic.core.rope import Rope
from vllm_episodic.core.surprise import surprise_from_logits, token_surprise
from vllm_episodic.metrics import Stats, StatsPublisher, metrics_dir

# id(VllmConfig) -> runtime; each runtime keeps its config alive, so ids stay unique
_runtimes: dict[int, WorkerRuntime] = {}


def runtime_for(vllm_config) -> WorkerRuntime | None:
    """The runtime of the runner built from this config; None if episodic is off."""
    return _runtimes.get(id(vllm_config))


def all_runtimes() -> list[WorkerRuntime]:
    """Runtimes of this process (tests and in-process tools inspect them)."""
    return list(_runtimes.values())


def _token_slots(block_row: torch.Tensor, start: int, end: int, block_size: int) -> torch.Tensor:
    """Absolute paged-KV slot ``(end - start,)`` of a row's tokens [start, end)."""
    tokens = torch.arange(start, max(start, end))
    return block_row.long()[tokens // block_size] * block_size + tokens % block_size


def _cache_slots(plan: RowPlan, layout, kv_layout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The row's event-cache slots in the paged KV cache: absolute slot ``(slots,)`` and
    the flat element offsets of their keys and values ``[slots, num_kv_heads, head_size]``
    (moves read through them). Kept with the request while its cache blocks stay the same."""
    from vllm_episodic.integration.paged_kv import slot_offsets

    bs = kv_layout.block_size
    blocks = plan.block_row[layout.sinks // bs : layout.cache_end // bs].long()
    cached = plan.memory.engine_state.get("cache_slots")
    if cached is None or not torch.equal(cached[0], blocks):
        slots = _token_slots(plan.block_row, layout.sinks, layout.cache_end, bs)
        cached = (blocks, slots, *slot_offsets(kv_layout, slots, plan.memory.shape.num_kv_heads))
        plan.memory.engine_state["cache_slots"] = cached
    return cached[1:]


def _attention_isa(vllm_config) -> str:
    """The ISA the CPU attention builder chose for this model's layers."""
    layers = vllm_config.compilation_config.static_forward_context.values()
    isas = {getattr(layer, "isa", None) for layer in layers} - {None}
    if len(isas) != 1:
        raise ValueError(f"expected one CPU attention ISA for all layers, found {isas}")
    return isas.pop()


class WorkerRuntime:
    """Per-runner episodic state: the memory, the current step and the metrics."""

    def __init__(self, runner):
        from vllm.model_executor.models.utils import extract_layer_index

        from vllm_episodic.integration.paged_kv import probe_layout
        from vllm_episodic.integration.rope_patch import model_rope
        from vllm_episodic.integration.selection import episodic_config, trained_len

        vllm_config = runner.vllm_config
        model_config, parallel = vllm_config.model_config, vllm_config.parallel_config
        self.runner = runner
        self.vllm_config = vllm_config
        self.config = episodic_config(vllm_config)
        self.max_model_len = model_config.max_model_len
        self.stats = Stats()
        self.publisher = StatsPublisher(metrics_dir())
        self.rope: Rope = model_rope(runner.get_model(), self.max_model_len)
        shape = ModelShape(
            num_layers=model_config.get_num_layers(parallel),
            num_heads=model_config.get_num_attention_heads(parallel),
            num_kv_heads=model_config.get_num_kv_heads(parallel),
            head_size=model_config.get_head_size(),
            dtype=model_config.dtype,
            trained_len=trained_len(model_config),
            block_size=vllm_config.cache_config.block_size,
        )
        self.memory = EpisodicMemory(self.config, shape, self.rope, self.stats,
                                     reference=envs.get("VLLM_EPISODIC_REFERENCE"))
        self._layer_index = extract_layer_index
        self.isa = _attention_isa(vllm_config)
        self.layout = probe_layout(
            self.isa, model_config.dtype,
            vllm_config.cache_config.block_size, shape.head_size,
        )
        # request ids of the batch that _update_states prepared, in row order;
        # consumed by the first metadata build of the step (dummy runs find None)
        self._pending_req_ids: list[str] | None = None
        self.plans: list[RowPlan] | None = None
        # (plan, (start, end), key offsets, value offsets) of the last read_tokens range,
        # dropped at the end of each step
        self._read_offsets: tuple | None = None
        self._computing_surprise = False
        _runtimes[id(vllm_config)] = self
        from vllm_episodic.integration.runner_hooks import install_model_hooks

        install_model_hooks(self, runner.get_model())

    def layer_index(self, layer_name: str) -> int:
        return self._layer_index(layer_name)

    # ---- scheduler-side events ---------------------------------------------------

    def on_batch_updated(self, req_ids: list[str]) -> None:
        self._pending_req_ids = list(req_ids)

    def on_requests_gone(self, req_ids) -> None:
        if req_ids:
            self.memory.release(req_ids)
            self.publish(force=True)

    def publish(self, force: bool = False) -> None:
        if force or self.publisher.due():
            self.memory.update_slow_gauges()
            self.publisher.publish(self.stats, force=True)

    # ---- step --------------------------------------------------------------------

    def plan_step(self, common_attn_metadata) -> list[RowPlan] | None:
        """Plan every row of the step being built; None in dummy/profiling runs."""
        req_ids, self._pending_req_ids = self._pending_req_ids, None
        num_reqs = common_attn_metadata.num_reqs
        if req_ids is None or len(req_ids) != num_reqs:
            self.plans = None
            return None
        qsl = common_attn_metadata.query_start_loc_cpu[: num_reqs + 1]
        query_lens = (qsl[1:] - qsl[:-1]).tolist()
        seq_lens = common_attn_metadata.seq_lens[:num_reqs].cpu().tolist()
        rows = [
            BatchRow(req_id, seq_len - q, q, self._capacity(req_id, seq_len))
            for req_id, seq_len, q in zip(req_ids, seq_lens, query_lens)
        ]
        self.plans = self.memory.plan_step(rows, common_attn_metadata.block_table_tensor[:num_reqs])
        ahead = [plan for plan in self.plans if plan.memory.can_select_ahead(plan)]
        if ahead:
            self.select_ahead(ahead)
        self.publish()
        return self.plans

    def _capacity(self, req_id: str, seq_len: int) -> int:
        """The request's largest possible length: prompt + max new tokens."""
        state = self.runner.requests.get(req_id)
        if state is None or state.sampling_params is None:
            return self.max_model_len
        max_tokens = state.sampling_params.max_tokens or self.max_model_len
        return max(seq_len, min(self.max_model_len, state.num_prompt_tokens + max_tokens))

    def read_tokens(self, plan: RowPlan, layer: int, start: int, end: int):
        """K/V ``[end - start, num_kv_heads, head_size]`` of tokens [start, end) of a row
        from layer's paged KV cache. Callers read one range for every layer in turn, so
        the range's element offsets (the same in every layer's cache) are kept between
        calls: each layer costs two gathers."""
        from vllm_episodic.integration.paged_kv import slot_offsets

        cached = self._read_offsets
        if cached is None or cached[0] is not plan or cached[1] != (start, end):
            slots = _token_slots(plan.block_row, start, end, self.layout.block_size)
            cached = (plan, (start, end), *slot_offsets(self.layout, slots, self.memory.shape.num_kv_heads))
            self._read_offsets = cached
        flat = self.runner.kv_caches[layer].view(-1)
        return flat[cached[2]], flat[cached[3]]

    def fill_caches(self, layer: int, rows: list[tuple[RowPlan, torch.Tensor]], kv_cache: torch.Tensor,
                    isa: str) -> None:
        """Retrieve this layer's events for these rows (each with its queries; one
        retrieval for all) and copy them into each row's cache slots, so that the
        attended blocks hold sinks + exactly the selected tokens."""
        for (plan, _), selection in zip(rows, select_layer(layer, rows)):
            self._fill_slots(plan, [layer], [selection], [kv_cache], isa)

    def select_ahead(self, plans: list[RowPlan]) -> None:
        """The decode rows' retrieval for every layer before the layers run (from the
        previous token's queries, all rows in one retrieval), then each row's slot copies
        in one gather for all layers."""
        for plan, selections in zip(plans, select_ahead(plans)):
            if plan.mode == "assembled":
                layers = range(len(selections))
                self._fill_slots(plan, layers, selections, [self.runner.kv_caches[i] for i in layers], self.isa)

    def _fill_slots(self, plan: RowPlan, layers, selections: list[dict[int, int]], caches: list[torch.Tensor],
                    isa: str) -> None:
        """Make each layer's attended cache slots hold its selection: one slot-table
        update, one gather (and rotation) from the host store for all the layers' missing
        tokens, then per layer one copy within the cache and one write.

        Args:
            layers, selections, caches: each layer, its selection and its paged KV cache.
        """
        from vllm_episodic.integration.paged_kv import write_slots

        memory = plan.memory
        layout = self.memory.layout
        wanted = ("natural", None) if plan.frame == "exact" else ("bounded", plan.anchor)
        for layer, kv_cache in zip(layers, caches):
            if memory.sink_state[layer] != wanted:
                sink_slots = _token_slots(plan.block_row, 0, layout.sinks, self.layout.block_size)
                write_slots(kv_cache, isa, sink_slots, *memory.sink_keys(layer, plan.frame, plan.anchor, self.rope))
                memory.sink_state[layer] = wanted
        # layers whose slots already hold their selection (steps between retrievals) skip
        todo = [(layer, selection, kv_cache) for layer, selection, kv_cache in zip(layers, selections, caches)
                if memory.filled[layer] != selection]
        if not todo:
            return
        began = time.perf_counter()
        layers, selections, caches = zip(*todo)
        cache_of = dict(zip(layers, caches))
        codes = memory.token_codes(layers, selections, plan.frame)
        changes = memory.slots.update(torch.tensor(layers), codes, plan.cache_slots)
        absolute, key_at, value_at = _cache_slots(plan, layout, self.layout)
        if changes.move_layer.numel():
            # moves read every source before writing (a slot can be both)
            for layer in changes.move_layer.unique().tolist():
                index = (changes.move_layer == layer).nonzero().flatten()
                flat = cache_of[layer].view(-1)
                source = changes.move_from[index]
                write_slots(cache_of[layer], isa, absolute[changes.move_to[index]],
                            flat[key_at[source]], flat[value_at[source]])
        if changes.load_layer.numel():
            which = layers[0] if len(layers) == 1 else changes.load_layer
            keys, values = memory.code_keys(which, changes.load_code, plan.frame, plan.anchor, self.rope)
            # loads come grouped by layer
            done = 0
            for layer, count in zip(*(t.tolist() for t in torch.unique_consecutive(changes.load_layer,
                                                                                return_counts=True))):
                part = slice(done, done + count)
                write_slots(cache_of[layer], isa, absolute[changes.load_to[part]], keys[part], values[part])
                done += count
            self.stats.observe("prefetch_latency_seconds", time.perf_counter() - began)
        for layer, selection in zip(layers, selections):
            memory.filled[layer] = selection
        self.stats.inc("device_cache_hits", changes.hits)
        self.stats.inc("device_cache_misses", changes.misses)

    def needs_surprise(self, plan: RowPlan) -> bool:
        """Surprise matters only for requests that can outgrow sinks + window."""
        c = self.config
        return c.segmentation == "surprise" and plan.memory.capacity > c.sink_tokens + c.window_tokens

    def after_forward(self, model, input_ids: torch.Tensor, hidden: torch.Tensor) -> None:
        """Surprise of the step's tokens, then events out of the tokens that left the window."""
        plans = self.plans
        if plans is None:
            return
        rows, targets, owners = [], [], []
        for plan in plans:
            if not self.needs_surprise(plan):
                continue
            first, n = plan.first_query, plan.num_scheduled
            carry = plan.memory.carry_logits
            if carry is not None and plan.num_computed > 0:
                token = input_ids[first : first + 1]
                plan.memory.record_surprise(plan.num_computed, surprise_from_logits(carry, token))
            plan.memory.carry_logits = None
            if n > 1:
                rows.append(hidden[first : first + n - 1])
                targets.append(input_ids[first + 1 : first + n])
                owners.append((plan, n - 1))
        if rows:
            self._computing_surprise = True
            try:
                values = token_surprise(torch.cat(rows), torch.cat(targets), model.compute_logits)
            finally:
                self._computing_surprise = False
            offset = 0
            for plan, n in owners:
                plan.memory.record_surprise(plan.num_computed + 1, values[offset : offset + n])
                offset += n
        self.memory.end_step(plans, self.read_tokens)
        self._read_offsets = None  # it holds a plan of this step
        self.publish()

    def after_logits(self, logits: torch.Tensor) -> None:
        """Keep each row's logits: they give the surprise of the token sampled from them."""
        plans = self.plans
        if plans is None or self._computing_surprise or logits.shape[0] != len(plans):
            return
        keep = [i for i, plan in enumerate(plans) if self.needs_surprise(plan)]
        if not keep:
            return
        # the sampler may modify logits in place: keep a copy
        rows = logits[keep].float()
        for j, i in enumerate(keep):
            plans[i].memory.carry_logits = rows[j : j + 1]
