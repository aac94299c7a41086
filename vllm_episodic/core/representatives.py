"""Representative keys of events, per layer and query head.

Two choices (``representatives_per_event``):

- ``0`` (default): the mean un-rotated key of *every* token of the event, per KV head
  (:func:`mean_keys`; ShadowKV's landmarks are such means), held once per KV head. Measured on natural
  prose (needles in essays): it ranked the needle's event near the top in the layers
  that read it, where the alternative below ranked it 50-200th of ~500 events.
- ``r > 0``: EM-LLM's mean key of the event's ``r`` most attended tokens, the
  attention coming from an *observation window*: the most recent queries of the
  request (SnapKV-style), each spreading one unit of attention over the tokens of
  every event by a softmax within the event (:func:`representatives`). Those queries
  read text written ~a window later, so the tokens they attend most are seldom the
  ones a later question asks about.
"""

from __future__ import annotations

import torch


def representatives(
    obs_queries: torch.Tensor,
    keys_rotated: torch.Tensor,
    keys: torch.Tensor,
    lengths: torch.Tensor,
    top: int,
) -> torch.Tensor:
    """Representatives of consecutive events, in several layers at once.

    Args:
        obs_queries: ``[layers, m, num_heads, head_size]`` recent queries, rotated at
            their positions (as vLLM hands them to attention); ``m`` may be 0.
        keys_rotated: ``[layers, n, num_kv_heads, head_size]`` the events' keys rotated
            at their positions (as in the paged KV cache): scores use true relative distances.
        keys: ``[layers, n, num_kv_heads, head_size]`` the same keys un-rotated.
        lengths: ``(k,)`` token count of each event; the events tile the n tokens.
        top: tokens averaged per event and head.

    Returns:
        ``[layers, k, num_heads, head_size]`` float32 (the store casts them to its dtype).
    """
    num_layers, num_events = keys.shape[0], int(lengths.numel())
    num_heads = obs_queries.shape[2]
    num_kv_heads, head_size = keys.shape[2], keys.shape[3]
    group = num_heads // num_kv_heads
    longest = int(lengths.max())
    # padded layout: event e, rank j -> token index first[e] + j
    first = torch.cumsum(lengths, 0) - lengths
    ranks = torch.arange(longest)
    valid = ranks[None, :] < lengths[:, None]  # [k, longest]
    index = (first[:, None] + ranks[None, :]).clamp(max=keys.shape[1] - 1)  # [k, longest]
    if obs_queries.shape[1] > 0:
        q = obs_queries.float().view(num_layers, -1, num_kv_heads, group, head_size)
        scores = torch.einsum("lmgxd,lngd->lgxmn", q, keys_rotated.float()) / head_size**0.5
        scores = scores.reshape(num_layers, num_heads, -1, keys.shape[1])[..., index]  # [L, H, m, k, longest]
        scores = scores.masked_fill(~valid, float("-inf"))
        mass = scores.softmax(-1).sum(2)  # [L, H, k, longest]
    else:
        mass = torch.zeros(num_layers, num_heads, num_events, longest)
    mass = mass.masked_fill(~valid, float("-inf"))
    take = min(top, longest)
    chosen = mass.topk(take, dim=-1).indices  # [L, H, k, take]
    # events shorter than `take` repeat -inf picks: only count valid ones
    event = torch.arange(num_events)[:, None]
    chosen_valid = valid[event, chosen]  # [L, H, k, take]
    token = index[event, chosen]  # [L, H, k, take]
    layer = torch.arange(num_layers)[:, None, None, None]
    kv_head = (torch.arange(num_heads) // group)[None, :, None, None]
    picked = keys.float()[layer, token, kv_head]  # [L, H, k, take, D]
    weight = chosen_valid.float().unsqueeze(-1)
    reps = (picked * weight).sum(3) / weight.sum(3).clamp(min=1)  # [L, H, k, D]
    return reps.transpose(1, 2).contiguous()


def mean_keys(keys: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each event's mean key per KV head (the query heads of a KV group share it).

    Args:
        keys: ``[layers, n, num_kv_heads, head_size]`` the events' un-rotated keys.
        lengths: ``(k,)`` token count of each event; the events tile the n tokens.

    Returns:
        ``[layers, k, num_kv_heads, head_size]`` float32.
    """
    owner = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    sums = keys.new_zeros((keys.shape[0], lengths.numel(), *keys.shape[2:]), dtype=torch.float32)
    sums.index_add_(1, owner, keys.float())
    return sums / lengths.float()[None, :, None, None]
