"""Token surprise: s_t = −log p(x_t | x_<t) under the model's own logits.

Computed over the full vocabulary, a slice of rows at a time, so that a long prefill
chunk never materialises a ``[tokens × vocab]`` matrix.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: rows of hidden states turned into logits at once (256 × 49152 floats = 48 MiB)
LOGIT_ROWS = 256


def surprise_from_logits(logits: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
    """−log softmax(logits)[next_id] per row.

    Args:
        logits: ``[rows, vocab]``.
        next_ids: ``(rows,)`` the token each row predicts.

    Returns:
        ``(rows,)`` float32.
    """
    # log_softmax is much faster than logsumexp on CPU and works in the logits' dtype
    # (float32 accumulation inside): one pass over the vocabulary, no float copy
    logprobs = torch.log_softmax(logits, dim=1)
    return -logprobs.gather(1, next_ids.long().unsqueeze(1)).squeeze(1).float()


def token_surprise(
    hidden: torch.Tensor,
    next_ids: torch.Tensor,
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    rows: int = LOGIT_ROWS,
) -> torch.Tensor:
    """Surprise of the tokens that the hidden states predict.

    Args:
        hidden: ``[n, hidden_size]`` final hidden states; row i predicts ``next_ids[i]``.
        next_ids: ``(n,)`` token ids.
        compute_logits: maps ``[r, hidden_size]`` to ``[r, vocab]`` (the model's head).
        rows: slice size, bounding peak memory to ``rows × vocab`` floats.

    Returns:
        ``(n,)`` float32 surprise in nats.
    """
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], rows):
        end = min(start + rows, hidden.shape[0])
        out[start:end] = surprise_from_logits(compute_logits(hidden[start:end]), next_ids[start:end])
    return out
