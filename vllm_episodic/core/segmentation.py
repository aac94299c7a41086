"""Cutting the tokens that leave the local window into events.

EM-LLM: token t opens a new event when its surprise exceeds mean + γ·std of the
surprise of the ``window`` tokens before it. Events are then held within
[min_size, max_size]: a boundary that would leave the current event shorter than
``min_size`` is dropped (the piece joins the next event) and a run longer than
``max_size`` is cut every ``max_size`` tokens. ``fixed`` mode (InfLLM) cuts every
``max_size`` tokens and ignores surprise.

Segmentation is incremental: the open (last, unfinished) event carries over between
steps, and the result does not depend on how the tokens were chunked into steps.
"""

from __future__ import annotations

import torch


def surprise_boundaries(
    surprise: torch.Tensor, start: int, end: int, window: int, gamma: float
) -> torch.Tensor:
    """Tokens t in ``[start, end)`` whose surprise exceeds mean + γ·std of the previous
    ``window`` tokens' surprise (tokens 1.. only: token 0 has no surprise).

    Args:
        surprise: ``(n,)`` with ``n >= end``; ``surprise[t] = −log p(x_t | x_<t)``.

    Returns:
        ``(k,)`` int64 token positions, ascending.
    """
    lo = max(1, start - window)
    if end <= max(start, lo):
        return torch.empty(0, dtype=torch.long)
    s = surprise[lo:end].double()
    zero = torch.zeros(1, dtype=torch.float64)
    c1 = torch.cat((zero, s.cumsum(0)))
    c2 = torch.cat((zero, (s * s).cumsum(0)))
    t = torch.arange(max(start, lo), end)
    first = torch.clamp(t - window, min=lo) - lo  # index into c of the window start
    last = t - lo  # window is [first, last) in s-coordinates
    count = (last - first).double()
    mean = (c1[last] - c1[first]) / count.clamp(min=1)
    var = (c2[last] - c2[first]) / count.clamp(min=1) - mean * mean
    # unbiased, as torch.std
    std = (var.clamp(min=0) * count / (count - 1).clamp(min=1)).sqrt()
    valid = count >= 2
    above = s[t - lo] > mean + gamma * std
    return t[valid & above]


class Segmenter:
    """Incremental event segmentation of one request.

    Args:
        first_token: where memory starts (the first token after the attention sinks).
        min_size, max_size: event size bounds in tokens.
        mode: ``"surprise"`` or ``"fixed"``.
    """

    def __init__(self, first_token: int, min_size: int, max_size: int, mode: str,
                 window: int = 128, gamma: float = 1.0):
        if not 1 <= min_size <= max_size:
            raise ValueError(f"need 1 <= min_size <= max_size, got {min_size}, {max_size}")
        if mode not in ("surprise", "fixed"):
            raise ValueError(f"mode must be 'surprise' or 'fixed', got {mode!r}")
        self.open_start = first_token
        self.min_size, self.max_size = min_size, max_size
        self.mode, self.window, self.gamma = mode, window, gamma

    def advance(self, limit: int, surprise: torch.Tensor | None = None) -> list[tuple[int, int]]:
        """Close the events that end at or before token ``limit``.

        Args:
            limit: tokens ``< limit`` have left the window and may join closed events.
            surprise: per-token surprise, known at least up to ``limit`` (surprise mode).

        Returns:
            the new events as ``(start, end)`` half-open token ranges, in order; the
            tokens from the last end on form the open event.
        """
        if limit <= self.open_start:
            return []
        if self.mode == "surprise":
            if surprise is None:
                raise ValueError("surprise segmentation needs the surprise values")
            candidates = surprise_boundaries(
                surprise, self.open_start + 1, limit + 1, self.window, self.gamma
            ).tolist()
        else:
            candidates = []
        events = []
        start = self.open_start
        for boundary in candidates:
            while boundary - start > self.max_size:
                events.append((start, start + self.max_size))
                start += self.max_size
            if boundary - start >= self.min_size:
                events.append((start, boundary))
                start = boundary
        while limit - start >= self.max_size:
            events.append((start, start + self.max_size))
            start += self.max_size
        self.open_start = start
        return events
