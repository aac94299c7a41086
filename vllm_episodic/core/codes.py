"""What the device event cache and the torch reference read of a request's host store:
selected tokens as *codes* (position and rotation, :meth:`FrameKeys.token_codes`) and
their keys rotated for a position frame (exact: true positions; bounded: runs of events
ending at the anchor, sinks before them)."""

from __future__ import annotations

import torch

from vllm_episodic.core.attention import attention
from vllm_episodic.core.plan import Frame, Layout, RowPlan, Settings
from vllm_episodic.core.retrieval import Selection
from vllm_episodic.core.rope import Rope
from vllm_episodic.core.store import HostStore
from vllm_episodic.kernels import gather_rotate


class FrameKeys:
    """Part of :class:`~vllm_episodic.core.request.RequestMemory`: its host store's tokens
    as the device cache and the torch reference see them."""

    store: HostStore | None
    layout: Layout
    settings: Settings

    @property
    def code_span(self) -> int:
        """Codes per position in :meth:`token_codes`: a run spans at most the budget plus
        one event (its last, cut event's untaken tail), so ``back`` stays below this."""
        return self.layout.max_memory + self.settings.max_event_tokens

    def token_codes(self, selection: Selection, frame: Frame) -> torch.Tensor:
        """``[rows, tokens]`` the selected tokens of each row (a layer) as codes of the
        device cache (:class:`SlotTable`): ``position · span + back``, ``back`` being how
        far before the anchor the token's key is rotated to (0 in the exact frame), so
        that a code says everything its slot holds. Every row of ``selection``
        attends equally many tokens.

        In the bounded frame an event sits ``lag`` tokens before the end of its *run*
        (module docstring): it continues the run of the event after it when that one is
        selected too and it is selected whole (no gap between their tokens). The cache
        keys its slots by the codes, so an event whose run changes is rotated anew.
        """
        present = selection.events >= 0
        if not bool(present.any()):
            return torch.empty((len(selection), 0), dtype=torch.long)
        # every row's events, rows in order, each row's ascending: (layer, event) order
        ids, counts = selection.events[present], selection.tokens[present]
        store, span = self.store, self.code_span
        starts, ends = store.starts[ids], store.ends[ids]
        lags = torch.zeros_like(ids)
        if frame is not Frame.EXACT:
            # a run is a stretch of events of one row, each whole but the last
            row = torch.arange(len(selection))[:, None].expand_as(present)[present]
            follows = torch.zeros(ids.numel(), dtype=torch.bool)
            follows[:-1] = (row[1:] == row[:-1]) & (ids[1:] == ids[:-1] + 1)
            whole = counts == ends - starts
            # the last event of each one's run: the first at or after it that does not continue
            index = torch.arange(ids.numel())
            last = torch.where(follows & whole, ids.numel(), index).flip(0).cummin(0).values.flip(0)
            lags = ends[last] - ends
        positions, owner = event_tokens(starts, counts)
        if frame is Frame.EXACT:
            return (positions * span).view(len(selection), -1)
        # every run ends at the anchor: an event ends `lag` tokens before it
        back = (ends + lags)[owner] - 1 - positions
        if int(back.max()) >= span:
            raise ValueError(f"a run of {int(back.max()) + 1} tokens exceeds the code span {span}")
        return (positions * span + back).view(len(selection), -1)

    def code_keys(self, layer: int | torch.Tensor, codes: torch.Tensor, frame: Frame, anchor: int,
                  rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of the tokens named by ``codes (tokens,)`` (:meth:`token_codes`), keys
        rotated for attention: ``keys, values [tokens, num_kv_heads, head_size]``.

        Args:
            layer: the layer, or ``(tokens,)`` each token's layer (several in one gather).
        """
        return rotated(*self.code_tokens(layer, codes, frame, anchor), rope)

    def code_tokens(self, layer: int | torch.Tensor, codes: torch.Tensor, frame: Frame,
                    anchor: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What :meth:`code_keys` rotates: un-rotated ``keys, values [tokens,
        num_kv_heads, head_size]`` from the host store and the ``(tokens,)`` positions
        their keys are rotated to (a device cache may rotate them on its way in)."""
        positions, back = codes // self.code_span, codes % self.code_span
        target = positions if frame is Frame.EXACT else anchor - back
        keys, values = self.store.gather(layer, positions)
        return keys, values, target

    def sink_keys(self, layers: torch.Tensor, frame: Frame, anchor: int, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V ``[len(layers) * sinks, num_kv_heads, head_size]`` (layer-major) of the
        sinks rotated for the frame: true positions, or A − budget − max_event − S + i."""
        sinks = self.layout.sinks
        positions = torch.arange(sinks).repeat(len(layers))
        shift = anchor - self.layout.max_memory - self.settings.max_event_tokens - sinks
        target = positions if frame is Frame.EXACT else positions + shift
        keys, values = self.store.gather(layers.repeat_interleave(sinks), positions)
        return rotated(keys, values, target, rope)

    def reference_attention(self, layer: int, plan: RowPlan, query: torch.Tensor,
                            selection: Selection, local_keys: torch.Tensor,
                            local_values: torch.Tensor, scale: float, rope: Rope) -> torch.Tensor:
        """The assembled attention in torch: sinks + selection + local part, one softmax.

        Args:
            query: ``[q, num_heads, head_size]`` the step's last q queries (all, or its
                :attr:`RowPlan.torch_queries`).
            local_keys, local_values: tokens ``[plan.local_start, plan.end)`` from the paged cache.

        Returns:
            ``[q, num_heads, head_size]`` float32.
        """
        parts = [self.sink_keys(torch.tensor([layer]), plan.frame, plan.anchor, rope)]
        if selection.num_events:
            codes = self.token_codes(selection, plan.frame)[0]
            parts.append(self.code_keys(layer, codes, plan.frame, plan.anchor, rope))
        parts.append((local_keys, local_values))
        keys, values = (torch.cat([t.to(query.dtype) for t in kind]) for kind in zip(*parts))
        # only the local part is causal: sinks and memory precede every query
        before = keys.shape[0] - local_keys.shape[0]
        positions = torch.cat((torch.full((before,), plan.local_start - 1), torch.arange(plan.local_start, plan.end)))
        return attention(query, keys, values, scale, plan.query_positions[-query.shape[0]:], positions)


def event_tokens(starts: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``counts[i]`` tokens of each event ``i`` starting at ``starts[i]``, in
    order: their positions and the index ``i`` each belongs to."""
    owner = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    rank = torch.arange(owner.numel()) - (torch.cumsum(counts, 0) - counts)[owner]
    return starts[owner] + rank, owner


def rotated(keys: torch.Tensor, values: torch.Tensor, target: torch.Tensor,
            rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
    """Un-rotated ``keys`` (and their ``values``) ``[tokens, num_kv_heads, head_size]``
    with keys rotated to ``target (tokens,)`` positions: the engine's fused op where it
    can, else :func:`~vllm_episodic.kernels.gather_rotate`."""
    fused = rope.rotate_keys(keys, target)
    if fused is not None:
        return fused, values
    out_k, out_v = torch.empty_like(keys), torch.empty_like(values)
    rows = torch.arange(target.numel())
    gather_rotate(keys, values, rows, out_k, out_v, rows, rope.table, target, rope.is_neox_style)
    return out_k, out_v
