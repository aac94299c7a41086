"""Rotary position embedding (RoPE) arithmetic on keys and queries.

vLLM rotates queries and keys at their absolute positions before attention, so the
paged KV cache holds rotated keys. The episodic memory needs three more operations:

- *un-rotate* keys when they move to the host store (stored at position 0), with the
  exact inverse of the rotation vLLM applied (same cos/sin table rows);
- *rotate* stored keys to the position they take at attention time;
- *shift* rotated queries by a signed offset (into the frame where memory sits at a
  bounded distance).

Rotations use one cos/sin table, ``[max_position, rotary_dim]`` as vLLM lays it out
(cos in the first half of a row, sin in the second), so every angle is the very one
vLLM used. Both layouts are supported: NeoX (halves) and GPT-J (interleaved pairs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class Rope:
    """RoPE of one model.

    Args:
        cos_sin: ``[max_position, rotary_dim]`` table: row p holds cos(p·θ) then sin(p·θ).
        head_size: size of a head; the first ``rotary_dim`` features are rotated.
        is_neox_style: halves layout (True) or interleaved pairs (False).
    """

    def __init__(self, cos_sin: torch.Tensor, head_size: int, is_neox_style: bool):
        if cos_sin.dim() != 2 or cos_sin.shape[1] % 2:
            raise ValueError(f"cos_sin must be [positions, rotary_dim], got {tuple(cos_sin.shape)}")
        self.table = cos_sin.float()
        self.rotary_dim = cos_sin.shape[1]
        self.head_size = head_size
        self.is_neox_style = is_neox_style
        if self.rotary_dim > head_size:
            raise ValueError(f"rotary_dim {self.rotary_dim} exceeds head_size {head_size}")
        self.native: Callable[[torch.Tensor, torch.Tensor], None] | None = None
        """the engine's fused rotation, ``native(x, positions)``: rotates contiguous
        ``x [tokens, heads, head_size]`` in place by non-negative ``positions`` within the
        table, at the precision the engine rotates its own keys (see :meth:`rotate_keys`)"""

    def rotate_keys(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """Un-rotated ``keys [tokens, heads, head_size]`` rotated to ``positions`` by the
        engine's fused op, in place; None where it cannot (no op, or a position outside
        the table), and the caller rotates them itself."""
        if self.native is None or positions.numel() == 0 or not keys.is_contiguous():
            return None
        if int(positions.min()) < 0 or int(positions.max()) >= self.max_position:
            return None
        self.native(keys, positions)
        return keys

    @property
    def max_position(self) -> int:
        return self.table.shape[0]

    def _cos_sin(self, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of signed position offsets: ``[..., rotary_dim // 2]`` each."""
        offsets = offsets.to(torch.long)
        rows = self.table[offsets.abs()]
        half = self.rotary_dim // 2
        cos, sin = rows[..., :half], rows[..., half:]
        return cos, sin * offsets.sign().unsqueeze(-1).to(sin.dtype)

    def angles(self, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``[tokens, 1, rotary_dim // 2]`` of signed offsets, for :meth:`apply`."""
        cos, sin = self._cos_sin(offsets)
        return cos.unsqueeze(-2), sin.unsqueeze(-2)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` ``[tokens, heads, head_size]`` by precomputed :meth:`angles`;
        float32 result (the fast path for queries)."""
        x = x.float()
        half = self.rotary_dim // 2
        if self.is_neox_style:
            x1, x2 = x[..., :half], x[..., half : self.rotary_dim]
            rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = x[..., 0 : self.rotary_dim : 2], x[..., 1 : self.rotary_dim : 2]
            rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        if self.rotary_dim == x.shape[-1]:
            return rotated
        return torch.cat((rotated, x[..., self.rotary_dim :]), dim=-1)

    def rotate(self, x: torch.Tensor, offsets: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """Rotate ``x`` by ``offsets`` positions (or undo such a rotation).

        Args:
            x: ``[tokens, heads, head_size]``.
            offsets: ``(tokens,)`` signed integer offsets, or a 0-d tensor for all tokens.
            inverse: undo the rotation ``rotate(x, offsets)`` exactly, dividing by
                cos² + sin² so that rounding of the table does not accumulate.

        Returns:
            a new tensor like ``x`` (computed in float32, cast back to ``x.dtype``).
        """
        cos, sin = self._cos_sin(offsets)
        if cos.dim() == 1:
            cos, sin = cos.expand(x.shape[0], -1), sin.expand(x.shape[0], -1)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [tokens, 1, rot/2]
        if inverse:
            norm = cos * cos + sin * sin
            cos, sin = cos / norm, -sin / norm
        out = x.float().clone()
        rot = out[..., : self.rotary_dim]
        if self.is_neox_style:
            x1, x2 = rot[..., : self.rotary_dim // 2], rot[..., self.rotary_dim // 2 :]
            r1 = x1 * cos - x2 * sin
            r2 = x2 * cos + x1 * sin
            rot.copy_(torch.cat((r1, r2), dim=-1))
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            r1 = x1 * cos - x2 * sin
            r2 = x2 * cos + x1 * sin
            rot.copy_(torch.stack((r1, r2), dim=-1).flatten(-2))
        return out.to(x.dtype)

    def magnitude_error(self) -> float:
        """max |cos² + sin² − 1| over the table: 0 for pure rotations (no YaRN mscale)."""
        half = self.rotary_dim // 2
        cos, sin = self.table[:, :half], self.table[:, half:]
        return float((cos * cos + sin * sin - 1).abs().max())


def rope_table(max_position: int, rotary_dim: int, base: float) -> torch.Tensor:
    """A plain RoPE cos/sin table (vLLM's layout), for tests and engine-free tools."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    freqs = torch.arange(max_position, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).float()
