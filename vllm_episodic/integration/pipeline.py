"""Pipeline parallel: every stage forms the same events, from the surprise that only the
last stage can compute.

Segmentation needs each token's surprise, −log p(token), from the logits; under
``--pipeline-parallel-size N`` only the last stage has the final hidden states. Each
stage holds the memory of its own layers (its host store, events and retrieval), and
every stage must cut the same events. So the last stage sends the step's surprise back
to the others over vLLM's pipeline-parallel group, and a stage before it ends its step
(records the surprise, forms events: ``EpisodicMemory.end_step``) when its next step
begins — before that step is planned, so every stage plans it over the same events.

Why a receive posted when the step is planned and taken at the next step: a stage
before the last returns from its step before the last stage has run it (its output is
what the last stage runs on), and the last stage must not wait for a stage that has no
next step to run (an idle server): the last stage broadcasts into receives that are
already posted, and only the earlier stages wait, at their next step, for a step the
last stage has already been sent. The same pattern as vLLM's own broadcast of sampled
token ids to earlier stages under async scheduling (``GPUModelRunner.
_pp_broadcast_prev_sampled_token_ids``). Removal: when vLLM hands a stage's output (or
per-token logprobs of the prompt) to every stage.
"""

from __future__ import annotations

import torch

from vllm_episodic.core.plan import RowPlan
from vllm_episodic.core.surprise import surprise_from_logits, token_surprise


class SurpriseRelay:
    """The step's surprise from the last pipeline stage to the others (one flat float32
    tensor per step: the surprise of every scheduled token of the rows that need it, in
    row order, NaN where unknown). With one stage every call is a no-op."""

    def __init__(self, device: torch.device | str = "cpu"):
        from vllm.distributed import get_pp_group

        group = get_pp_group()
        self.stages = group.world_size
        self.is_last = group.is_last_rank
        self._group = group
        self._device = device
        self._posted: tuple[torch.Tensor, object] | None = None

    @property
    def relays(self) -> bool:
        return self.stages > 1

    def post(self, tokens: int) -> None:
        """A stage before the last: receive the surprise of the step just planned
        (``tokens`` values; none when no row needs surprise)."""
        if not self.relays or self.is_last or tokens == 0:
            self._posted = None
            return
        if self._posted is not None:
            raise RuntimeError("a surprise receive was posted while the previous one was not taken")
        buffer = torch.empty(tokens, dtype=torch.float32, device=self._device)
        work = torch.distributed.broadcast(buffer, src=self._group.ranks[-1], group=self._group.device_group,
                                           async_op=True)
        self._posted = (buffer, work)

    def take(self) -> torch.Tensor | None:
        """The posted step's surprise, once the last stage has sent it (None if none was
        posted)."""
        posted, self._posted = self._posted, None
        if posted is None:
            return None
        buffer, work = posted
        work.wait()
        return buffer.cpu()

    def send(self, values: torch.Tensor) -> None:
        """The last stage: the step's surprise to every earlier stage (which posted
        their receives when they planned the step)."""
        if not self.relays or not values.numel():
            return
        out = values.to(device=self._device, dtype=torch.float32).contiguous()
        torch.distributed.broadcast(out, src=self._group.ranks[-1], group=self._group.device_group)


def step_surprise(plans: list[RowPlan], input_ids: torch.Tensor, hidden: torch.Tensor,
                  compute_logits) -> torch.Tensor:
    """``(Σ num_scheduled,)`` float32: the surprise of every scheduled token of ``plans``
    (the rows that need it), in row order — what the relay carries. A row's first token
    from the logits kept when it was sampled (NaN when there are none: the request's
    first step, or its first after attaching); the others from this step's final hidden
    states ``[num_tokens, hidden_size]`` (``input_ids`` the step's flattened tokens)."""
    parts, rows, targets = [], [], []
    for plan in plans:
        first, n = plan.first_query, plan.num_scheduled
        part = torch.full((n,), float("nan"))
        carry = plan.memory.carry_logits
        if carry is not None and plan.num_computed > 0:
            part[0] = surprise_from_logits(carry, input_ids[first : first + 1])[0]
        plan.memory.carry_logits = None
        if n > 1:
            rows.append(hidden[first : first + n - 1])
            targets.append(input_ids[first + 1 : first + n])
        parts.append(part)
    if rows:
        values = token_surprise(torch.cat(rows), torch.cat(targets), compute_logits)
        offset = 0
        for part in parts:
            part[1:] = values[offset : offset + part.numel() - 1]
            offset += part.numel() - 1
    return torch.cat(parts) if parts else torch.empty(0)


def record_step_surprise(plans: list[RowPlan], values: torch.Tensor) -> None:
    """Record :func:`step_surprise`'s ``values`` in the rows' memories."""
    offset = 0
    for plan in plans:
        part = values[offset : offset + plan.num_scheduled]
        offset += plan.num_scheduled
        if bool(part[0].isnan()):
            plan.memory.record_surprise(plan.num_computed + 1, part[1:])
        else:
            plan.memory.record_surprise(plan.num_computed, part)
