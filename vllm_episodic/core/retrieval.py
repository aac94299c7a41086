"""Which events a layer attends to: similarity top-k plus temporal contiguity.

EM-LLM's two-stage retrieval, per layer and step:

1. *similarity*: events ranked by query · representative keys (summed over heads),
   taken greedily in rank order while they fit ``(1 − share) × budget`` tokens;
2. *contiguity*: the temporal neighbours (event ± 1) of those events enter a queue of
   ``share × budget`` tokens that persists across steps; new neighbours go in front,
   the oldest fall out when it is full (events with nothing attendable stay out); the
   queue's events join while they fit the budget;
3. the budget is then filled exactly with the least relevant events, the last one cut
   (the device cache's layout wants every layer to attend the same number of tokens).

Everything works on *rows*: one row per (request, layer), events padded to the longest
row. A decode step retrieves for every layer of every request in one call: the
per-row greedy choices run as tensor ops over all rows and candidates at once (in a few
rounds, :func:`greedy_fit`), never as a Python loop over rows or events. The result,
a :class:`Selection`, stays a pair of ``[rows, n]`` tensors up to the device cache's codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_episodic.kernels import rank_within_budget, ranking_key


@dataclass(frozen=True, eq=False)
class Selection:
    """What some rows attend of memory, one row per (request, layer): each row's events
    in ascending order and how many of each one's first tokens it attends.

    ``events [rows, n]`` int64, -1 after a row's last event; ``tokens [rows, n]``, 0
    there. Kept as tensors from retrieval to the cache codes (no Python per event).
    """

    events: torch.Tensor
    tokens: torch.Tensor

    @classmethod
    def of(cls, events: torch.Tensor, tokens: torch.Tensor) -> Selection:
        """The canonical form of events ``[rows, m]`` (-1: none; each at most once per
        row, in any order) and their tokens: ascending, the -1s last, trimmed."""
        keep = events >= 0
        width = int(keep.sum(1).max()) if events.numel() else 0
        order = torch.sort(events.masked_fill(~keep, torch.iinfo(torch.long).max), 1).indices[:, :width]
        return cls(events.gather(1, order), tokens.gather(1, order).masked_fill(~keep.gather(1, order), 0))

    @classmethod
    def empty(cls, rows: int) -> Selection:
        nothing = torch.empty((rows, 0), dtype=torch.long)
        return cls(nothing, nothing)

    def __len__(self) -> int:
        return self.events.shape[0]

    def rows(self, index: slice | torch.Tensor) -> Selection:
        """Some of the rows (a slice gives views)."""
        if isinstance(index, slice):
            return Selection(self.events[index], self.tokens[index])
        return Selection(self.events.index_select(0, index), self.tokens.index_select(0, index))

    def row(self, i: int) -> Selection:
        return self.rows(slice(i, i + 1))

    def widened(self, width: int) -> Selection:
        """The same rows ``width`` columns wide (padded with -1 and 0)."""
        more = width - self.events.shape[1]
        if more <= 0:
            return self
        pad = torch.nn.functional.pad
        return Selection(pad(self.events, (0, more), value=-1), pad(self.tokens, (0, more)))

    def same_rows(self, other: Selection) -> torch.Tensor:
        """``(rows,)`` bool: which rows equal ``other``'s (as many rows)."""
        width = max(self.events.shape[1], other.events.shape[1])
        a, b = self.widened(width), other.widened(width)
        return ((a.events == b.events) & (a.tokens == b.tokens)).all(1)

    def with_rows(self, index: torch.Tensor, other: Selection) -> Selection:
        """A copy whose rows ``index`` are ``other``'s rows."""
        width = max(self.events.shape[1], other.events.shape[1])
        a, b = self.widened(width), other.widened(width)
        events, tokens = a.events.clone(), a.tokens.clone()
        events[index], tokens[index] = b.events, b.tokens
        return Selection(events, tokens)

    @property
    def num_events(self) -> int:
        return int((self.events >= 0).sum())

    def to_dicts(self) -> list[dict[int, int]]:
        """Per row ``{event: tokens}`` (for tests and tracing, not the step's path)."""
        return [{e: t for e, t in zip(es, ts) if e >= 0}
                for es, ts in zip(self.events.tolist(), self.tokens.tolist())]


def empty_queues(rows: int) -> torch.Tensor:
    """``[rows, 0]`` contiguity queues holding nothing (queues widen as they fill)."""
    return torch.empty((rows, 0), dtype=torch.long)


def stack_queues(queues: list[torch.Tensor]) -> torch.Tensor:
    """Queues of several requests ``[layers_i, width_i]`` as one ``[rows, width]``, -1 padded."""
    width = max(q.shape[1] for q in queues)
    return torch.cat([torch.nn.functional.pad(q, (0, width - q.shape[1]), value=-1) for q in queues])


def greedy_fit(sizes: torch.Tensor, room: torch.Tensor) -> torch.Tensor:
    """Per row, walk the columns in order and take each item that still fits.

    Args:
        sizes: ``[rows, columns]`` tokens of each candidate (0: not a candidate).
        room: ``(rows,)`` tokens each row may take.

    Returns:
        ``[rows, columns]`` bool, the items taken. An item that does not fit is skipped
        and the walk goes on (smaller ones later may still fit).
    """
    # in rounds over all rows and columns at once: the candidates that still could fit
    # (an item larger than the room left never will) are taken while their running sum
    # fits; the first that does not is skipped and the next round starts after it
    columns = torch.arange(sizes.shape[1])
    taken = torch.zeros(sizes.shape, dtype=torch.bool)
    left = room.clone()
    open_ = sizes > 0
    while bool(open_.any()):
        candidate = open_ & (sizes <= left[:, None])
        fits = candidate & (torch.cumsum(sizes * candidate, 1) <= left[:, None])
        taken |= fits
        left -= (sizes * fits).sum(1)
        skipped = torch.where(candidate & ~fits, columns, sizes.shape[1]).min(1).values
        open_ = candidate & (columns > skipped[:, None])
    return taken


def _compact(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Each row's kept ``values [rows, n]`` moved to its front in their order, -1 after
    them, trimmed to the longest row."""
    width = int(keep.sum(1).max()) if keep.numel() else 0
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]
    return values.gather(1, order).masked_fill(~keep.gather(1, order), -1)


def most_events(sizes: torch.Tensor, budget: int) -> int:
    """How deep a ranking of the events ``sizes (events,)`` must be read for ``budget``
    tokens: the most events that fit it together (the smallest ones), plus one."""
    ascending = torch.sort(sizes[sizes > 0]).values
    return int(torch.searchsorted(torch.cumsum(ascending, 0), torch.tensor(budget), right=True)) + 1


def _column(events: torch.Tensor, count: int) -> torch.Tensor:
    """Event ids ``[rows, n]`` as columns of a ``[rows, count + 1]`` table whose last
    column stands for -1 (nothing)."""
    return events.masked_fill(events < 0, count)


def _size_table(sizes: torch.Tensor) -> torch.Tensor:
    """``[rows, events + 1]`` the sizes with a last column of 0s, what :func:`_column`
    maps -1 to."""
    return torch.cat((sizes, sizes.new_zeros(sizes.shape[0], 1)), 1)


def _member(events: torch.Tensor, count: int) -> torch.Tensor:
    """``[rows, count + 1]`` bool: which events (ids in ``events [rows, n]``, -1 ignored)
    each row holds."""
    mask = torch.zeros((events.shape[0], count + 1), dtype=torch.bool)
    return mask.scatter_(1, _column(events, count), True)


def retrieve(scores: torch.Tensor, sizes: torch.Tensor, budget: torch.Tensor, queues: torch.Tensor,
             queue_tokens: int | torch.Tensor, most: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarity picks and contiguity neighbours of every row, best first.

    Args:
        scores: ``[rows, events]`` float32 (``-inf``: never chosen).
        sizes: ``[rows, events]`` attendable tokens of each event (0: never chosen; pads).
        budget: ``(rows,)`` tokens of events each row attends; similarity gets all of
            it but the queue's ``queue_tokens``.
        queues: ``[rows, width]`` each row's contiguity queue, newest first, -1 padded.
        queue_tokens: the queues' capacity in tokens, for every row or ``(rows,)`` each row's.
        most: at least :func:`most_events` of every row for its budget (a top-k instead
            of a full sort); None: every event.

    Returns:
        ``chosen [rows, n]`` event ids (similarity picks in rank order, then the queue's
        events that fit the budget), -1 padded, and the rows' new queues.
    """
    rows, count = scores.shape
    # a prefix of the ranking: the best events while they fit the similarity budget
    queue_tokens = torch.as_tensor(queue_tokens).expand(rows)
    order, taken = rank_within_budget(scores, sizes, (budget - queue_tokens).clamp(min=0)[:, None], most or count)
    top = _compact(order, taken)
    if not bool((queue_tokens > 0).any()):
        return top, queues
    size_of = _size_table(sizes)
    picked = _member(top, count)

    # neighbours e + 1 then e - 1 of each pick, in the picks' rank order; each event
    # once (its first mention), none already picked
    fresh = torch.stack((top + 1, top - 1), 2).flatten(1)
    fresh = fresh.masked_fill((top < 0).repeat_interleave(2, 1) | (fresh < 0) | (fresh >= count), -1)
    index = _column(fresh, count)
    mention = torch.arange(fresh.shape[1]).expand_as(fresh)
    first = torch.full((rows, count + 1), fresh.shape[1]).scatter_reduce_(1, index, mention, "amin")
    fresh_ok = (fresh >= 0) & ~picked.gather(1, index) & (first.gather(1, index) == mention)
    fresh = fresh.masked_fill(~fresh_ok, -1)

    # then the old queue's events that were neither picked nor mentioned again
    seen = picked | _member(fresh, count)
    old = queues.masked_fill(queues >= count, -1)
    old = old.masked_fill(seen.gather(1, _column(old, count)), -1)

    candidates = torch.cat((fresh, old), 1)
    candidates = _compact(candidates, candidates >= 0)
    candidate_sizes = size_of.gather(1, _column(candidates, count))
    new_queues = _compact(candidates, greedy_fit(candidate_sizes, queue_tokens))

    # the queue's events join the picks while they fit the budget
    used = size_of.gather(1, _column(top, count)).sum(1)
    queued_sizes = size_of.gather(1, _column(new_queues, count))
    joins = greedy_fit(queued_sizes, budget - used)
    chosen = _compact(torch.cat((top, new_queues), 1), torch.cat((top >= 0, joins), 1))
    return chosen, new_queues


def fill_budget(chosen: torch.Tensor, scores: torch.Tensor, sizes: torch.Tensor,
                budget: torch.Tensor, most: int | None = None) -> Selection:
    """Each row's selection filling its budget exactly: the chosen events whole, then the
    least relevant others, the last one cut (a cut never falls into an event that matters).

    Args:
        chosen: ``[rows, n]`` from :func:`retrieve`.
        scores, sizes: as for :func:`retrieve`.
        budget: ``(rows,)`` tokens each row attends.
        most: as for :func:`retrieve`.
    """
    rows, count = scores.shape
    size_of = _size_table(sizes)
    chosen_tokens = size_of.gather(1, _column(chosen, count))
    missing = budget - chosen_tokens.sum(1)
    events, tokens = chosen, chosen_tokens
    short = int(missing.max()) if rows else 0
    if short > 0:
        # only as many of the least relevant as can be needed (the chosen go last)
        k = min(count, most or count)
        excluded = _member(chosen, count)[:, :count] | (sizes == 0)
        least = torch.topk(ranking_key(scores.masked_fill(excluded, float("inf"))), k, dim=1, largest=False).indices
        usable = ~excluded.gather(1, least)
        least_sizes = sizes.gather(1, least) * usable
        before = torch.cumsum(least_sizes, 1) - least_sizes
        take = usable & (before < missing[:, None])
        cut = torch.minimum(least_sizes, missing[:, None] - before)
        events = torch.cat((chosen, least.masked_fill(~take, -1)), 1)
        tokens = torch.cat((chosen_tokens, cut * take), 1)
    return Selection.of(events, tokens)
