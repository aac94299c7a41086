"""Per-worker bookkeeping of every request's episodic memory."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_episodic.metrics import Stats


@dataclass(frozen=True)
class BatchRow:
    """One request's share of an engine step."""

    req_id: str
    num_computed: int
    """tokens whose KV was computed before this step"""
    num_scheduled: int
    """tokens computed in this step"""


class RequestMemory:
    """Everything the backend holds for one request."""

    def __init__(self, req_id: str):
        self.req_id = req_id
        self.num_tokens = 0


class EpisodicMemory:
    """The requests of one worker, created on first sight and freed on release."""

    def __init__(self, stats: Stats):
        self.stats = stats
        self.requests: dict[str, RequestMemory] = {}

    def plan_step(self, rows: list[BatchRow]) -> list[RequestMemory]:
        """Bring each request's memory up to the step that is about to run."""
        batch = []
        for row in rows:
            memory = self.requests.get(row.req_id)
            if memory is None or row.num_computed < memory.num_tokens:
                # new, or recomputed from scratch after preemption
                memory = self.requests[row.req_id] = RequestMemory(row.req_id)
            memory.num_tokens = row.num_computed + row.num_scheduled
            self.stats.inc("tokens_processed", row.num_scheduled)
            batch.append(memory)
        self._update_gauges()
        return batch

    def release(self, req_ids) -> None:
        """Free everything held for these requests (finished, aborted or preempted)."""
        for req_id in req_ids:
            self.requests.pop(req_id, None)
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.stats.set("requests_tracked", len(self.requests))
