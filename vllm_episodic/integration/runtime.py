"""The episodic state of one vLLM model runner, and how the backend finds it.

vLLM gives attention metadata builders no handle on the model runner, and its
metadata carries no request ids. The runner hooks (``runner_hooks.py``) therefore
create one :class:`WorkerRuntime` per model runner, keyed by the runner's
``VllmConfig`` object (the very object vLLM hands the builders), record each step's
batch in it, and the builders find it with :func:`runtime_for`.

A step, as the runtime sees it:

1. ``_update_states`` hook: keep or release finished/aborted/preempted requests, drop
   the kept memories the scheduler dropped, note the batch's request ids and which new
   ones attach to a kept memory (:meth:`on_requests_gone`, :meth:`on_batch_updated`;
   ``prefix_reuse.py``);
2. metadata build: :meth:`plan_step` plans every row (``EpisodicMemory.plan_step``;
   a new request that attaches to a kept memory gets its host state from it first) and
   nothing else: no selection, no write to the KV cache;
3. model-forward pre-hook: :meth:`before_forward` restores attached requests' sinks and
   local window into their blocks, and the decode rows' retrieval for every layer
   fills their event-cache slots (:meth:`select_ahead`);
4. the layers attend (``cpu_backend.EpisodicCPUImpl``; rows that retrieve per layer
   fill their slots there, before the op);
5. model-forward hook: surprise of the step's tokens, then ``EpisodicMemory.end_step``
   moves the tokens that left the window into events (:meth:`after_forward`);
6. logits hook: keep each row's next-token logits for the next token's surprise.

``runner_hooks._runtime_of`` creates the runtime, installs its model hooks and
registers it (:func:`register`); the registry holds runtimes weakly, so an engine that
goes away takes its runtime with it.
"""

from __future__ import annotations

import time
import weakref

import torch

from vllm_episodic import envs
from vllm_episodic.core.kept import kept_tokens
from vllm_episodic.core.memory import EpisodicMemory
from vllm_episodic.core.plan import BatchRow, Mode, ModelShape, RowPlan
from vllm_episodic.core.select import select_ahead, select_layer
from vllm_episodic.core.retrieval import Selection
from vllm_episodic.core.rope import Rope
from vllm_episodic.integration.paged_kv import PagedKV
from vllm_episodic.integration.pipeline import SurpriseRelay, record_step_surprise, step_surprise
from vllm_episodic.metrics import Stats, StatsPublisher, metrics_dir

# id(VllmConfig) -> runtime, held weakly (the runner holds its runtime); a runtime
# keeps its config alive, so an id is not reused while its entry exists
_runtimes: weakref.WeakValueDictionary[int, WorkerRuntime] = weakref.WeakValueDictionary()


def register(runtime: WorkerRuntime) -> None:
    """Make ``runtime`` what :func:`runtime_for` returns for its runner's config."""
    _runtimes[id(runtime.vllm_config)] = runtime


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


def _cache_slots(plan: RowPlan, layout, kv: PagedKV) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The row's event-cache slots in the paged KV cache: absolute slot ``(slots,)`` and
    where the cache holds them (:meth:`PagedKV.locate`; moves read through it). Kept
    with the request while its cache blocks stay the same."""
    bs = kv.block_size
    blocks = plan.block_row[layout.sinks // bs : layout.cache_end // bs].long()
    cached = plan.memory.engine_state.get("cache_slots")
    if cached is None or not torch.equal(cached[0], blocks):
        slots = _token_slots(plan.block_row, layout.sinks, layout.cache_end, bs)
        cached = (blocks, slots, kv.locate(slots))
        plan.memory.engine_state["cache_slots"] = cached
    return cached[1], cached[2]


def _episodic_backend(vllm_config):
    """The (one) attention backend class of this model's layers."""
    layers = vllm_config.compilation_config.static_forward_context.values()
    backends = {layer.get_attn_backend() for layer in layers if hasattr(layer, "get_attn_backend")}
    if len(backends) != 1:
        raise ValueError(f"expected one attention backend for all layers, found {backends}")
    return backends.pop()


class WorkerRuntime:
    """Per-runner episodic state: the memory, the current step and the metrics."""

    def __init__(self, runner):
        from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
        from vllm.distributed.utils import get_pp_indices
        from vllm.model_executor.models.utils import extract_layer_index

        from vllm_episodic.integration.rope_patch import model_rope
        from vllm_episodic.integration.selection import episodic_config, trained_len

        vllm_config = runner.vllm_config
        model_config, parallel = vllm_config.model_config, vllm_config.parallel_config
        self.runner = runner
        self.vllm_config = vllm_config
        self.config = episodic_config(vllm_config)
        ranks, stage = get_tensor_model_parallel_world_size(), get_pp_group()
        total_layers = model_config.get_total_num_hidden_layers()
        # this pipeline stage's layers (vLLM's split, as make_layers does)
        self.first_layer, end_layer = get_pp_indices(total_layers, stage.rank_in_group, stage.world_size)
        share = (end_layer - self.first_layer) / total_layers / ranks
        if share < 1:
            # each tensor-parallel rank holds every token for its own KV heads, each
            # pipeline stage for its own layers: the server's caps are shared out in
            # proportion to the bytes each holds (the API server admits by the sum), so
            # every worker reaches its cap at the same token and evicts alike
            self.config = self.config.model_copy(update={
                "host_memory_gib": self.config.host_memory_gib * share,
                "kept_memory_gib": (self.config.kept_memory_gib or 0.0) * share})
        self.max_model_len = model_config.max_model_len
        self.stats = Stats()
        self.publisher = StatsPublisher(metrics_dir(), tp_rank=get_tensor_model_parallel_rank(),
                                        pp_rank=stage.rank_in_group)
        self.rope: Rope = model_rope(runner.get_model(), self.max_model_len)
        shape = ModelShape(
            num_layers=end_layer - self.first_layer,
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
        # how this backend's paged KV cache is read and written
        self.kv: PagedKV = _episodic_backend(vllm_config).paged_kv(runner, shape)
        # request ids of the batch that _update_states prepared, in row order;
        # consumed by the first metadata build of the step (dummy runs find None)
        self._pending_req_ids: list[str] | None = None
        # request id -> (kept id, tokens): new requests that attach to a kept memory
        self._attach: dict[str, tuple[str, int]] = {}
        self.plans: list[RowPlan] | None = None
        # what the step's plan leaves to :meth:`before_forward`: attached rows whose
        # blocks to restore (row, kept id, tokens, block row), decode rows to select ahead
        self._restores: list[tuple[BatchRow, str, int, torch.Tensor]] = []
        self._ahead: list[RowPlan] = []
        self._computing_surprise = False
        self.relay = SurpriseRelay(runner.device)
        # a stage before the last: the step whose surprise it waits for (its plans)
        self._deferred: list[RowPlan] | None = None

    def layer_index(self, layer_name: str) -> int:
        """The layer's index in this stage's memory (its layers, from 0)."""
        return self._layer_index(layer_name) - self.first_layer

    # ---- scheduler-side events ---------------------------------------------------

    def on_batch_updated(self, req_ids: list[str], ops=None) -> None:
        self._pending_req_ids = list(req_ids)
        if ops is not None:
            self._attach.update(ops.attach)

    def on_requests_gone(self, req_ids, ops=None) -> None:
        """Finished, aborted and preempted requests: keep those the scheduler keeps (while
        their blocks still hold their window), release the others; then drop the kept
        memories the scheduler dropped."""
        keep = set(ops.keep) if ops is not None else set()
        for req_id in keep:
            self._keep(req_id)
        gone = set(req_ids or ()) - keep
        if gone:
            self.memory.release(gone)
        if ops is not None and ops.drop:
            self.memory.drop_kept(ops.drop)
        if req_ids or ops is not None:
            self.publish(force=True)

    def _keep(self, req_id: str) -> None:
        state = self.runner.requests[req_id]
        memory = self.memory.requests[req_id]
        tokens = torch.tensor((list(state.prompt_token_ids) + list(state.output_token_ids))[: memory.num_tokens])
        block_row = torch.tensor(state.block_ids[0])
        every = torch.arange(self.memory.shape.num_layers)
        self.memory.keep(req_id, req_id, tokens,
                         lambda _, start, end: self._read_row(block_row, every, start, end))

    def _restore(self, row: BatchRow, kept_id: str, tokens: int, block_row: torch.Tensor) -> None:
        """Write what an attached request's first step reads from the paged cache: the
        kept natural K/V of its sinks and event-cache blocks, and of its local part (the
        blocks between are null)."""
        memory = self.memory.requests[row.req_id]
        kept = self.memory.kept.get(kept_id)
        bs = self.kv.block_size
        head = min(tokens, self.memory.layout.cache_end)
        local = max(head, memory.open_start // bs * bs)
        every = torch.arange(self.memory.shape.num_layers)
        for start, end in ((0, head), (local, tokens)):
            if end <= start:
                continue
            keys, values = kept_tokens(kept, self.rope, start, end)  # [layers, n, kv_heads, head_size]
            slots = _token_slots(block_row, start, end, bs)
            self.kv.write(every[:, None], slots[None, :], keys.flatten(0, 1), values.flatten(0, 1))

    def publish(self, force: bool = False) -> None:
        if force or self.publisher.due():
            self.memory.update_slow_gauges()
            self.publisher.publish(self.stats, force=True)

    # ---- step --------------------------------------------------------------------

    def plan_step(self, common_attn_metadata) -> list[RowPlan] | None:
        """Plan every row of the step being built; None in dummy/profiling runs. Writes
        nothing to the KV cache and selects nothing: :meth:`before_forward` does."""
        req_ids, self._pending_req_ids = self._pending_req_ids, None
        num_reqs = common_attn_metadata.num_reqs
        self._restores, self._ahead = [], []
        if req_ids is None or len(req_ids) != num_reqs:
            self.plans = None
            return None
        qsl = common_attn_metadata.query_start_loc_cpu[: num_reqs + 1]
        query_lens = (qsl[1:] - qsl[:-1]).tolist()
        seq_lens = common_attn_metadata.seq_lens[:num_reqs].cpu().tolist()
        rows = [self._row(req_id, seq_len, q) for req_id, seq_len, q in zip(req_ids, seq_lens, query_lens)]
        for index, row in enumerate(rows):
            attach = self._attach.pop(row.req_id, None)
            if attach is not None:
                self._attach_memory(row, *attach)
                self._restores.append((row, *attach, common_attn_metadata.block_table_tensor[index]))
        self.plans = self.memory.plan_step(rows, common_attn_metadata.block_table_tensor[:num_reqs])
        self.relay.post(sum(plan.num_scheduled for plan in self.plans if self.needs_surprise(plan)))
        self._ahead = [plan for plan in self.plans if plan.memory.can_select_ahead(plan)]
        for plan in self._ahead:
            # :meth:`before_forward` selects and fills them before any layer runs: the
            # metadata must not make the layers retrieve for them again
            plan.selected_ahead = True
        self.publish()
        return self.plans

    def _attach_memory(self, row: BatchRow, kept_id: str, tokens: int) -> None:
        """A new request's host state from the kept memory it attaches to at ``tokens``."""
        if row.num_computed != tokens:
            raise RuntimeError(f"request {row.req_id} was to attach at token {tokens}, "
                               f"its first step starts at {row.num_computed}")
        prompt = self.runner.requests[row.req_id].prompt_token_ids
        self.memory.attach(row, kept_id, prompt[tokens] if tokens < len(prompt) else None)

    def before_forward(self) -> None:
        """The step's writes to the KV cache, once its metadata is built and before any
        layer runs: attached requests' blocks restored, then the decode rows' retrieval
        for every layer and their slot fills."""
        restores, self._restores = self._restores, []
        for restore in restores:
            self._restore(*restore)
        ahead, self._ahead = self._ahead, []
        if ahead:
            self.select_ahead(ahead)

    def _row(self, req_id: str, seq_len: int, num_scheduled: int) -> BatchRow:
        """A batch row from the runner's request state: its capacity (prompt + max new
        tokens) and prompt length (unknown to a request the runner no longer holds)."""
        state = self.runner.requests.get(req_id)
        capacity, prompt = self.max_model_len, 0
        if state is not None:
            prompt = state.num_prompt_tokens
            if state.sampling_params is not None:
                max_tokens = state.sampling_params.max_tokens or self.max_model_len
                capacity = max(seq_len, min(self.max_model_len, prompt + max_tokens))
        return BatchRow(req_id, seq_len - num_scheduled, num_scheduled, capacity, prompt)

    def read_tokens(self, plan: RowPlan, layers: torch.Tensor, start: int, end: int):
        """K/V ``[len(layers), end - start, num_kv_heads, head_size]`` of tokens
        [start, end) of a row from the layers' paged KV caches (one gather each)."""
        return self._read_row(plan.block_row, layers, start, end)

    def _read_row(self, block_row: torch.Tensor, layers: torch.Tensor, start: int, end: int):
        slots = _token_slots(block_row, start, end, self.kv.block_size)
        return self.kv.read(layers, self.kv.locate(slots))

    def fill_caches(self, layer: int, rows: list[tuple[RowPlan, torch.Tensor]]) -> None:
        """Retrieve this layer's events for these rows (each with its queries; one
        retrieval for all) and copy them into each row's cache slots, so that the
        attended blocks hold sinks + exactly the selected tokens."""
        only = torch.tensor([layer])
        for (plan, _), selection in zip(rows, select_layer(layer, rows)):
            self._fill_slots(plan, only, selection)

    def select_ahead(self, plans: list[RowPlan]) -> None:
        """The decode rows' retrieval for every layer before the layers run (from the
        previous token's queries, all rows in one retrieval), then each row's slot copies
        for all layers at once."""
        every = torch.arange(self.memory.shape.num_layers)
        for plan, selection in zip(plans, select_ahead(plans)):
            if plan.mode is Mode.ASSEMBLED:
                self._fill_slots(plan, every, selection)

    def _fill_slots(self, plan: RowPlan, layers: torch.Tensor, selection: Selection) -> None:
        """Make each layer's attended cache slots hold its row of ``selection``: one
        slot-table update, one gather (and rotation) from the host store for all the
        layers' missing tokens, one copy within the caches and one write (on the CPU op
        all layers' caches are one :class:`~.paged_kv.StackedCaches`)."""
        memory = plan.memory
        layout = self.memory.layout
        kv = self.kv
        stale = layers[memory.sink_rotation[layers] != plan.rotation]
        if stale.numel():
            sink_slots = _token_slots(plan.block_row, 0, layout.sinks, kv.block_size)
            keys, values = memory.sink_keys(stale, plan.frame, plan.anchor, self.rope)
            kv.write(stale[:, None], sink_slots[None, :], keys, values)
            memory.sink_rotation[stale] = plan.rotation
        # layers whose slots already hold their selection (steps between retrievals) skip
        todo = memory.unfilled(layers, selection)
        if not todo.numel():
            return
        began = time.perf_counter()
        if todo.numel() < layers.numel():
            layers, selection = layers[todo], selection.rows(todo)
        codes = memory.token_codes(selection, plan.frame)
        changes = memory.slots.update(layers, codes, plan.cache_slots)
        absolute, where = _cache_slots(plan, layout, kv)
        if changes.move_layer.numel():
            # every source is read before any slot is written (a slot can be both)
            source = changes.move_from
            keys, values = kv.read(changes.move_layer, tuple(w[source] for w in where), each=True)
            kv.write(changes.move_layer, absolute[changes.move_to], keys, values)
        if changes.load_layer.numel():
            which = int(layers[0]) if layers.numel() == 1 else changes.load_layer
            keys, values, target = memory.code_tokens(which, changes.load_code, plan.frame, plan.anchor)
            kv.write_rotated(changes.load_layer, absolute[changes.load_to], keys, values, target, self.rope)
            self.stats.observe("prefetch_latency_seconds", time.perf_counter() - began)
        memory.mark_filled(layers, selection)
        self.stats.inc("device_cache_hits", changes.hits)
        self.stats.inc("device_cache_misses", changes.misses)

    def needs_surprise(self, plan: RowPlan) -> bool:
        """Surprise matters only for requests that can outgrow sinks + window."""
        c = self.config
        return c.segmentation == "surprise" and plan.memory.capacity > c.sink_tokens + c.window_tokens

    def after_forward(self, model, input_ids: torch.Tensor, hidden: torch.Tensor) -> None:
        """The last (or only) pipeline stage, whose model output is the final hidden
        states: the surprise of the step's tokens (sent to the earlier stages), then
        events out of the tokens that left the window."""
        plans = self.plans
        if plans is None:
            return
        values = self._surprise(plans, model, input_ids, hidden)
        self.relay.send(values)
        self._end_step(plans, values)

    def after_stage(self) -> None:
        """A pipeline stage before the last: its step ends once the last stage's
        surprise arrives, when the next step begins (:meth:`finish_deferred`)."""
        self._deferred = self.plans

    def finish_deferred(self) -> None:
        """A stage before the last, as its next step begins (before it is planned): the
        previous step's surprise and events."""
        plans, self._deferred = self._deferred, None
        if plans is not None:
            self._end_step(plans, self.relay.take())

    def _surprise(self, plans: list[RowPlan], model, input_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        self._computing_surprise = True  # the logits it computes are not a step's
        try:
            return step_surprise([p for p in plans if self.needs_surprise(p)], input_ids, hidden, model.compute_logits)
        finally:
            self._computing_surprise = False

    def _end_step(self, plans: list[RowPlan], values: torch.Tensor | None) -> None:
        """Record the step's surprise, then form events."""
        if values is not None:
            record_step_surprise([p for p in plans if self.needs_surprise(p)], values)
        self.memory.end_step(plans, self.read_tokens)
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
