"""Reject new requests while the event store is at its host memory cap.

Patch: ``BaseServing._check_model`` (API-server process; every OpenAI endpoint calls
it before doing any work).
Why: with ``host_memory_policy: reject`` a request that would need host memory the
server does not have must get a clear HTTP error instead of pushing the worker over
its cap. The worker publishes its host bytes (``metrics.py``); this check reads them.
How: after vLLM's own check passes, answer 503 when the workers' host bytes plus one
page of the store exceed the cap, and count it (``requests_rejected``, this process's
own number on ``/metrics``). Requests already running are never cut: should
they outgrow the cap, the worker evicts their least recently retrieved pages.
Removal: when vLLM has an admission hook for plugins.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from http import HTTPStatus

from vllm_episodic.metrics import local_stats, metrics_dir, read_snapshots


@dataclass(frozen=True)
class HostBudget:
    cap_bytes: int
    headroom_bytes: int
    """bytes one more request needs at least (a page of the host store)"""


_budget: HostBudget | None = None


def set_budget(budget: HostBudget | None) -> None:
    """Called while the API server builds its config (episodic with ``reject`` policy)."""
    global _budget
    _budget = budget


def host_bytes_in_use() -> int:
    """Host bytes of live requests (kept memories yield to them: the scheduler drops
    the least recently used when live requests need the room, ``prefix_reuse.py``)."""
    values = [s["values"] for s in read_snapshots(metrics_dir())]
    return int(sum(v.get("host_bytes", 0) - v.get("kept_bytes", 0) for v in values))


def rejection(budget: HostBudget | None) -> str | None:
    """Why a new request must wait, or None."""
    if budget is None:
        return None
    used = host_bytes_in_use()
    if used + budget.headroom_bytes <= budget.cap_bytes:
        return None
    return (
        f"episodic memory is full: {used / 2**30:.2f} GiB of its {budget.cap_bytes / 2**30:.2f} GiB "
        "host memory cap in use (host_memory_policy=reject); retry when running requests finish"
    )


def install() -> None:
    from vllm.entrypoints.serve.engine.serving import BaseServing

    original = BaseServing._check_model
    if getattr(original, "_episodic", False):
        return

    @functools.wraps(original)
    async def _check_model(self, request):
        error = await original(self, request)
        if error is not None:
            return error
        reason = rejection(_budget)
        if reason is None:
            return None
        local_stats.inc("requests_rejected")
        return self.create_error_response(
            message=reason, err_type="ServiceUnavailableError", status_code=HTTPStatus.SERVICE_UNAVAILABLE
        )

    _check_model._episodic = True
    BaseServing._check_model = _check_model
