"""Event scoring for retrieval: one launch for every event of every request in the batch.

Events of all requests are concatenated (ragged); ``owner[e]`` is the batch row of
event ``e``. The score of an event is the sum over query heads of
``query[owner[e], h] · reps[e, h]``; events with ``available[e] == 0`` (evicted, or
still being formed) score ``-inf``. Selection then runs as one batched op over the
padded ``[rows, max_events]`` view (:func:`select_within_budget`), never a Python loop
over requests or events.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference needs no Triton
    triton = None


def score_events_reference(query: torch.Tensor, reps: torch.Tensor, owner: torch.Tensor,
                           available: torch.Tensor) -> torch.Tensor:
    """Args:
        query: ``[rows, num_heads, head_size]`` one scoring query per batch row.
        reps: ``[events, num_heads, head_size]`` representative keys, all rows' events.
        owner: ``(events,)`` int row of each event.
        available: ``(events,)`` attendable tokens of each event (0 → ``-inf``).

    Returns:
        ``(events,)`` float32 scores.
    """
    rows = query.shape[0]
    # in the representatives' dtype: converting them would copy all of them
    flat = reps.reshape(reps.shape[0], -1)
    q, scale = _query_for(query.reshape(rows, -1), reps.dtype)
    # [events, rows]: one GEMM instead of gathering every event's query row
    per_row = (flat @ q.t()).float() * scale
    scores = per_row[:, 0] if rows == 1 else per_row.gather(1, owner.long()[:, None]).squeeze(1)
    return scores.masked_fill(available == 0, float("-inf"))


def _query_for(query: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Scoring queries ``[rows, features]`` in the representatives' dtype, and the float32
    factor ``(rows,)`` that turns their scores back into the queries' own.

    A float16 GEMM rounds its result to float16, whose largest value is 65,504: a
    query · key over a few hundred features exceeds it for keys and queries in the
    tens. Each query is scaled to unit length, so that a score is at most the length of
    a representative (the scale does not change a row's ranking; it is undone anyway).
    """
    if dtype != torch.float16:
        return query.to(dtype), torch.ones(query.shape[0], device=query.device)
    norm = torch.linalg.vector_norm(query.float(), dim=-1).clamp(min=1e-30)
    return (query.float() / norm[:, None]).to(dtype), norm


def score_layer_events_reference(query: torch.Tensor, reps: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """One request's events scored for several layers at once (one batched GEMM).

    Args:
        query: ``[layers, num_heads, head_size]`` one scoring query per layer.
        reps: ``[layers, events, num_heads, head_size]`` each layer's representatives.
        available: ``(events,)`` attendable tokens of each event (0 → ``-inf``).

    Returns:
        ``[layers, events]`` float32 scores, as :func:`score_events_reference` would give
        with one batch row per layer.
    """
    layers, events = reps.shape[:2]
    # in the representatives' dtype: 16-bit ones read half the bytes (oneDNN accumulates
    # in float32 and rounds each score to the dtype)
    flat = reps.reshape(layers, events, -1)
    q, scale = _query_for(query.reshape(layers, -1), reps.dtype)
    q = q[:, None, :]
    if reps.dtype != torch.bfloat16:
        # [layers, events, F] @ [layers, F, 1] with the query as a transposed view: for
        # 30 x 2,300 x 576 on this CPU 5.9 ms in float32 and 4.0 in float16, against 14.9
        # with a contiguous [layers, F, 1] query
        scores = torch.bmm(flat, q.transpose(1, 2)).squeeze(2)
    else:
        # reps are a slice of the store's growing buffer, and a bfloat16 bmm over
        # matrices at a stride other than their size takes a slow path (43 ms for the
        # shape above): one GEMM per layer takes 9.1 ms
        scores = torch.cat([q[i] @ flat[i].t() for i in range(layers)])
    return (scores.float() * scale[:, None]).masked_fill(available == 0, float("-inf"))



def event_mass_reference(queries: torch.Tensor, reps: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """Each event's estimated share of attention: per head its largest over the queries,
    summed over heads.

    Per layer, query head and query, the event's logit is its representative's
    (``q · rep / sqrt(head_size)``) plus ``log(available tokens)`` — as if every token
    of the event scored like its representative — and a softmax over the layer's events
    turns logits into shares. Unlike the plain sum of dot products over heads
    (:func:`score_layer_events_reference`), a head that singles out one event gives it
    a share near 1 whatever the size of other heads' logits: the heads that retrieve
    (a few per layer) are not drowned by the many that attend broadly.

    Args:
        queries: ``[layers, m, num_heads, head_size]`` scoring queries (rotated as the
            representatives are scored: ``window`` tokens after memory).
        reps: ``[layers, events, rep_heads, head_size]`` each layer's representatives, one
            per query head, or one per KV head (``rep_heads`` divides ``num_heads``; query
            head h scores representative ``h // (num_heads // rep_heads)``).
        available: ``(events,)`` attendable tokens of each event (0 → ``-inf``).

    Returns:
        ``[layers, events]`` float32 scores in [0, num_heads].
    """
    layers, m, heads, size = queries.shape
    events, rep_heads = reps.shape[1], reps.shape[2]
    group = heads // rep_heads
    q = queries.float()
    # unit queries in the representatives' dtype (float16 cannot hold large products;
    # see _query_for), their lengths put back in float32
    norm = torch.linalg.vector_norm(q, dim=-1).clamp(min=1e-30)  # [L, m, H]
    unit = (q / norm[..., None]).to(reps.dtype)
    # one GEMM per layer reads every representative once for all heads and queries:
    # [events, R*D] @ block-diagonal [R*D, R*group*m]: block r holds the queries of the
    # heads that score representative r (column (g, j): query j of head r*group + g)
    blocks = unit.view(layers, m, rep_heads, group, size).permute(2, 0, 4, 3, 1)  # [R, L, D, group, m]
    diagonal = unit.new_zeros(layers, rep_heads, size, rep_heads, group * m)
    head = torch.arange(rep_heads, device=q.device)
    diagonal[:, head, :, head, :] = blocks.reshape(rep_heads, layers, size, group * m)
    flat = reps.reshape(layers, events, rep_heads * size)
    diagonal = diagonal.view(layers, rep_heads * size, heads * m)
    if reps.dtype == torch.bfloat16:
        # see score_layer_events_reference: a strided bfloat16 bmm takes a slow path
        logits = torch.stack([flat[i] @ diagonal[i] for i in range(layers)])
    else:
        logits = torch.bmm(flat, diagonal)
    scale = norm.permute(0, 2, 1)[:, None] / size**0.5  # [L, 1, H, m]
    logits = logits.float().view(layers, events, heads, m) * scale
    logits = logits + available.float().clamp(min=1).log()[None, :, None, None]
    logits = logits.masked_fill((available == 0)[None, :, None, None], float("-inf"))
    share = torch.nan_to_num(logits.softmax(1), nan=0.0)  # over events; nan: nothing available
    # each head's largest share from any of the queries: an event one query needs is
    # not averaged away by the others (a decode step's queries since the last retrieval
    # read different things; the mean lost needles that the max keeps)
    return share.amax(3).sum(2).masked_fill(available == 0, float("-inf"))


class _Workspace:
    """Scratch tensors kept between calls, grown to the largest asked for: a fresh
    tensor of tens of MiB comes from the allocator's mmap and page-faults on first
    touch, which cost :func:`token_mass_reference` half its time alone (16 ms against
    8.8 ms at 16K tokens, 32 queries of Qwen2.5-0.5B's shape, 2 cores; in the engine,
    whose allocator reuses more, a follow-up turn's 24 layers took 0.23 s against
    0.27 s). Each call hands out views that are only valid until the next call (one
    engine step uses them at once)."""

    def __init__(self) -> None:
        self._tensors: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A ``shape`` view on ``like``'s device. A tensor made under ``torch.inference_mode``
        (the engine's steps) cannot be written in place outside it (a test, a benchmark
        calling the kernel), nor is one made outside it what inference mode wants: each
        mode gets its own."""
        numel = math.prod(shape)
        held = self._tensors.get(name)
        if (held is None or held.dtype != dtype or held.device != like.device or held.numel() < numel
                or held.is_inference() != torch.is_inference_mode_enabled()):
            held = self._tensors[name] = torch.empty(numel, dtype=dtype, device=like.device)
        return held[:numel].view(shape)


_WORKSPACE = _Workspace()

# bound on one pass's float32 scratch ``[kv_heads, tokens, columns]`` (and as many
# elements again in the keys' dtype): 32 queries of Qwen2.5-0.5B's shape over 16K
# tokens take one pass (29 MiB), over 128K four
_SCRATCH_BYTES = 64 << 20


def token_mass_reference(queries: torch.Tensor, keys: torch.Tensor, owner: torch.Tensor, events: int,
                         scratch_bytes: int = _SCRATCH_BYTES) -> torch.Tensor:
    """Each event's share of attention computed from every one of its tokens' keys.

    Per query head and query, a softmax over all memory tokens (``q · k /
    sqrt(head_size)``); an event's share is the sum over its tokens; per head the largest
    share over the queries, summed over heads. What :func:`event_mass_reference`
    estimates from one representative per event, exactly — at the cost of reading every
    memory key (used once per request, for the queries that end the prompt).

    The products are taken in the keys' dtype (bfloat16 keys: one fast GEMM), the
    softmax in float32, both in a reused workspace (:class:`_Workspace`). Tokens run
    along dim 1 of the ``[kv_heads, tokens, columns]`` scratch so that the per-event
    sums add whole rows (an ``index_add`` over the last dim scatters single floats:
    ~2x slower at 16K tokens, 2 cores).

    Args:
        queries: ``[m, num_heads, head_size]`` scoring queries (rotated as keys are read:
            here un-rotated keys and queries ``window`` tokens after them).
        keys: ``[tokens, num_kv_heads, head_size]`` the memory tokens' keys.
        owner: ``(tokens,)`` int64 event of each token.
        events: how many events (the length of the result).
        scratch_bytes: bound on one pass's float32 scratch; queries beyond it take
            further passes.

    Returns:
        ``(events,)`` float32.
    """
    m, heads, size = queries.shape
    tokens, kv_heads = keys.shape[:2]
    per_kv = heads // kv_heads
    k = keys.transpose(0, 1).contiguous()  # [kv, tokens, D]
    q = (queries.float() / size**0.5).to(keys.dtype)
    group = max(1, min(m, scratch_bytes // max(1, 4 * kv_heads * tokens * per_kv)))
    best = torch.zeros(events, kv_heads, per_kv, device=keys.device)
    for first in range(0, m, group):
        part = q[first : first + group]  # [g, H, D]
        g = part.shape[0]
        # columns (head within the KV group, query): [kv, D, per_kv * g]
        columns = part.view(g, kv_heads, per_kv, size).permute(1, 3, 2, 0).reshape(kv_heads, size, per_kv * g)
        shape = (kv_heads, tokens, per_kv * g)
        products = torch.bmm(k, columns, out=_WORKSPACE.take("products", shape, k, k.dtype))
        shares = _WORKSPACE.take("shares", shape, k, torch.float32).copy_(products)  # logits
        shares.sub_(shares.amax(1, keepdim=True)).exp_()
        total = shares.sum(1, keepdim=True)
        per_event = shares.new_zeros(kv_heads, events, per_kv * g).index_add_(1, owner, shares).div_(total)
        per_event = per_event.view(kv_heads, events, per_kv, g).amax(3).permute(1, 0, 2)  # [events, kv, per_kv]
        best = torch.maximum(best, per_event)
    return best.flatten(1).sum(1)


if triton is not None:

    @triton.jit
    def _score_kernel(q_ptr, reps_ptr, owner_ptr, avail_ptr, out_ptr, num_events,
                      q_stride_row, q_stride_head, reps_stride_event, reps_stride_head,
                      NUM_HEADS: tl.constexpr, HEAD_SIZE: tl.constexpr,
                      BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
        # one program scores BLOCK_E consecutive events over all heads
        events = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
        live = events < num_events
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HEAD_SIZE
        rows = tl.load(owner_ptr + events, mask=live, other=0).to(tl.int64)
        mask = live[:, None] & dim_ok[None, :]
        acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
        for h in range(NUM_HEADS):
            q = tl.load(q_ptr + rows[:, None] * q_stride_row + h * q_stride_head + dims[None, :],
                        mask=mask, other=0.0).to(tl.float32)
            r = tl.load(reps_ptr + events[:, None].to(tl.int64) * reps_stride_event + h * reps_stride_head
                        + dims[None, :], mask=mask, other=0.0).to(tl.float32)
            acc += tl.sum(q * r, axis=1)
        avail = tl.load(avail_ptr + events, mask=live, other=0)
        acc = tl.where(avail == 0, float("-inf"), acc)
        tl.store(out_ptr + events, acc, mask=live)


def score_events_triton(query: torch.Tensor, reps: torch.Tensor, owner: torch.Tensor,
                        available: torch.Tensor) -> torch.Tensor:
    """:func:`score_events_reference` in one Triton launch."""
    num_events, num_heads, head_size = reps.shape
    out = torch.empty(num_events, dtype=torch.float32, device=reps.device)
    if num_events == 0:
        return out
    query, reps = query.contiguous(), reps.contiguous()
    # 16 events per program: a layer of 2K events still spreads over 128 programs (64 per
    # program left most of an H200 idle: 48% of a graphed decode step was this kernel)
    block_e = 16
    _score_kernel[(triton.cdiv(num_events, block_e),)](
        query, reps, owner.to(torch.int32).contiguous(), available.to(torch.int32).contiguous(), out, num_events,
        query.stride(0), query.stride(1), reps.stride(0), reps.stride(1),
        NUM_HEADS=num_heads, HEAD_SIZE=head_size, BLOCK_E=block_e, BLOCK_D=triton.next_power_of_2(head_size),
    )
    return out


def padded(offsets: torch.Tensor, longest: int | None,
           *columns: tuple[torch.Tensor, float]) -> tuple[torch.Tensor, ...]:
    """Ragged ``columns`` of ``(values, fill)`` (row r owns ``values[offsets[r]:offsets[r + 1]]``)
    as ``[rows, longest]`` tensors padded with their fill, then the valid mask; the index is
    built once for all columns. ``longest`` (at least the largest row) spares a device→host
    read when the caller knows it."""
    counts = offsets[1:] - offsets[:-1]
    rows = counts.numel()
    if longest is None:
        longest = int(counts.max()) if rows else 0
    ranks = torch.arange(longest, device=offsets.device)
    valid = ranks[None, :] < counts[:, None]
    events = columns[0][0].numel()
    index = (offsets[:-1, None] + ranks[None, :]).clamp(max=max(events - 1, 0))
    out = [(values[index] if events else values.new_empty((rows, longest))).masked_fill(~valid, fill)
           for values, fill in columns]
    return (*out, valid)


def select_within_budget(scores: torch.Tensor, sizes: torch.Tensor, offsets: torch.Tensor,
                         budget: torch.Tensor | int, longest: int | None = None,
                         smallest: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the best events (descending score) while their sizes fit the budget.

    Args:
        scores: ``(events,)`` from :func:`score_events_reference` (``-inf`` = never).
        sizes: ``(events,)`` tokens of each event.
        offsets: ``(rows + 1,)`` event offsets of the rows.
        budget: tokens per row (int, or ``(rows,)``).
        longest, smallest: the most events of a row and the smallest event size, when the
            caller knows them (on a GPU, reading them back would stall the stream).

    Returns:
        ``order [rows, k]`` local event ids in descending score and ``taken`` (same
        shape, bool): the longest prefix of ``order`` that fits the budget. ``k`` is
        just large enough to hold any such prefix (a top-k, not a full sort).
    """
    s, z, _ = padded(offsets, longest, (scores, float("-inf")), (sizes, 0))
    if isinstance(budget, int):
        # filled on the device (a host→device copy could not be captured in a CUDA graph)
        most, budget = budget, torch.full((1, 1), budget, device=scores.device)
    else:
        most, budget = int(budget.max()), budget.reshape(-1, 1)
    if smallest is None:
        positive = sizes[sizes > 0]
        smallest = int(positive.min()) if positive.numel() else 1
    return rank_within_budget(s, z, budget, most // max(smallest, 1) + 1)


def ranking_key(scores: torch.Tensor) -> torch.Tensor:
    """``[rows, n]`` int64 keys that order like the float32 ``scores`` and never tie:
    among equal scores the higher column has the larger key.

    Scores scored from 16-bit representatives are rounded to their dtype (with bfloat16
    half of 2,000 random ones collide), and ``torch.topk`` orders ties differently for different ``k``:
    without a strict order, which of the tied events is retrieved would depend on how
    deep the ranking is read.
    """
    # + 0.0 turns -0.0 into 0.0 (equal scores, different bits)
    bits = (scores.float() + 0.0).view(torch.int32).long()
    # IEEE-754 as a signed integer: monotone for positive floats, reversed for negative ones
    monotone = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return monotone * (1 << 32) + torch.arange(scores.shape[1], device=scores.device)


def rank_within_budget(scores: torch.Tensor, sizes: torch.Tensor, budget: torch.Tensor,
                       depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`select_within_budget` on dense rows.

    Args:
        scores: ``[rows, n]`` (``-inf`` = never; pads).
        sizes: ``[rows, n]`` tokens of each event.
        budget: ``[rows, 1]`` (or ``[1, 1]``) tokens per row.
        depth: how much of the ranking to read: more than the most events any row's
            budget can hold (a top-k, not a full sort).

    Returns:
        ``order [rows, min(n, depth)]`` event columns in descending score and ``taken``
        (same shape, bool): the longest prefix of ``order`` that fits the budget.
    """
    _, order = torch.topk(ranking_key(scores), min(scores.shape[1], depth), dim=1, sorted=True)
    fits = (torch.cumsum(sizes.gather(1, order), 1) <= budget) & torch.isfinite(scores.gather(1, order))
    # a prefix: stop at the first event that does not fit
    taken = torch.cumsum(~fits, 1) == 0
    return order, taken
