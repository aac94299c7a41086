"""The episodic state of one vLLM worker process, and how the backend finds it.

vLLM gives attention metadata builders no handle on the model runner, and its
metadata carries no request ids. The runner hooks (``runner_hooks.py``) therefore
create one :class:`WorkerRuntime` per model runner, keyed by the runner's
``VllmConfig`` object (the very object vLLM hands the builders), record each step's
batch in it, and the builders find it with :func:`runtime_for`.
"""

from __future__ import annotations

from vllm_episodic.core.memory import BatchRow, EpisodicMemory, RequestMemory
from vllm_episodic.metrics import Stats, StatsPublisher, metrics_dir

# id(VllmConfig) -> runtime; each runtime keeps its config alive, so ids stay unique
_runtimes: dict[int, WorkerRuntime] = {}


def runtime_for(vllm_config) -> WorkerRuntime | None:
    """The runtime of the runner built from this config; None if episodic is off."""
    return _runtimes.get(id(vllm_config))


def all_runtimes() -> list[WorkerRuntime]:
    """Runtimes of this process (tests and in-process tools inspect them)."""
    return list(_runtimes.values())


class WorkerRuntime:
    """Per-worker episodic state: the memory, the current batch and the metrics."""

    def __init__(self, runner):
        from vllm_episodic.integration.selection import episodic_config

        self.vllm_config = runner.vllm_config
        self.config = episodic_config(runner.vllm_config)
        self.stats = Stats()
        self.publisher = StatsPublisher(metrics_dir())
        self.memory = EpisodicMemory(self.stats)
        # request ids of the batch that _update_states prepared, in row order;
        # consumed by the first metadata build of the step (dummy runs find None)
        self._pending_req_ids: list[str] | None = None
        _runtimes[id(self.vllm_config)] = self

    def on_batch_updated(self, req_ids: list[str]) -> None:
        self._pending_req_ids = list(req_ids)

    def on_requests_gone(self, req_ids) -> None:
        if req_ids:
            self.memory.release(req_ids)
            self.publisher.publish(self.stats, force=True)

    def plan_step(self, query_start_loc_cpu, seq_lens_cpu) -> list[RequestMemory] | None:
        """Memory of each batch row for the step being built; None in dummy runs."""
        req_ids, self._pending_req_ids = self._pending_req_ids, None
        if req_ids is None or len(req_ids) != len(seq_lens_cpu):
            return None
        query_lens = (query_start_loc_cpu[1:] - query_start_loc_cpu[:-1]).tolist()
        rows = [
            BatchRow(req_id, int(seq_len) - q, q)
            for req_id, seq_len, q in zip(req_ids, seq_lens_cpu.tolist(), query_lens)
        ]
        batch = self.memory.plan_step(rows)
        self.publisher.publish(self.stats)
        return batch
