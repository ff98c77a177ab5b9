"""flash-attn's ``layers.rotary``: ``apply_rotary_emb`` and ``RotaryEmbedding``, in plain PyTorch.

Same arguments and semantics: cos/sin tables ``(seqlen_rotary, rotary_dim / 2)``, the first ``rotary_dim``
channels rotated, pairs ``(0, 1), (2, 3), ...`` with ``interleaved=True`` or the two halves otherwise (GPT-NeoX),
positions shifted by ``seqlen_offsets`` (an int or one per sequence), packed sequences through ``cu_seqlens``.
Computed in float32 (``attnkit.ops.rotary``), differentiable.
"""

from __future__ import annotations

import torch

from ....errors import InvalidArgumentError
from ....ops.rotary import apply_rotary


def _positions(x: torch.Tensor, seqlen_offsets, cu_seqlens, max_seqlen) -> torch.Tensor:
    """Rotary position of every token: (seqlen,) or (batch, seqlen) for padded x, (total,) for packed x."""
    if cu_seqlens is None:
        seqlen = x.shape[1]
        pos = torch.arange(seqlen, device=x.device)
        if isinstance(seqlen_offsets, torch.Tensor):
            return seqlen_offsets.to(x.device).long()[:, None] + pos[None, :]
        return pos + int(seqlen_offsets)
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    seq_of_token = torch.repeat_interleave(torch.arange(len(lengths), device=x.device), lengths)
    pos = torch.arange(x.shape[0], device=x.device) - cu[:-1][seq_of_token]
    if isinstance(seqlen_offsets, torch.Tensor):
        return pos + seqlen_offsets.to(x.device).long()[seq_of_token]
    return pos + int(seqlen_offsets)


def apply_rotary_emb(
    x,
    cos,
    sin,
    interleaved=False,
    inplace=False,
    seqlen_offsets: int | torch.Tensor = 0,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
):
    """x ``(batch, seqlen, nheads, headdim)`` (or ``(total, nheads, headdim)`` with ``cu_seqlens``); cos/sin
    ``(seqlen_rotary, rotary_dim / 2)`` with ``rotary_dim <= headdim``. Returns the rotated tensor (x itself,
    written in place, with ``inplace=True``)."""
    if 2 * cos.shape[-1] > x.shape[-1] or cos.shape != sin.shape:
        raise InvalidArgumentError(
            f"cos/sin must be equal (seqlen_rotary, rotary_dim / 2) tables with rotary_dim <= headdim {x.shape[-1]}, "
            f"got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    pos = _positions(x, seqlen_offsets, cu_seqlens, max_seqlen)
    if pos.numel() and int(pos.max()) >= cos.shape[0]:
        raise InvalidArgumentError(f"position {int(pos.max())} is past the {cos.shape[0]} rows of the cos/sin tables")
    out = apply_rotary(x, cos[pos], sin[pos], interleaved)
    if inplace:
        return x.copy_(out)
    return out


class RotaryEmbedding(torch.nn.Module):
    """Rotary position embedding (RoFormer), with XPos scaling when ``scale_base`` is set; cos/sin tables are
    cached up to the longest sequence seen. ``forward`` rotates q and k of a packed qkv in place, as flash-attn's."""

    def __init__(self, dim: int, base=10000.0, interleaved=False, scale_base=None, device=None):
        super().__init__()
        self.dim = dim
        self.base = float(base)
        self.interleaved = interleaved
        self.scale_base = scale_base
        self.register_buffer("inv_freq", self._inv_freq(device), persistent=False)
        scale = self._scale(device) if scale_base is not None else None
        self.register_buffer("scale", scale, persistent=False)
        self._seq_len_cached = 0
        self._cos_cached = self._sin_cached = self._cos_k_cached = self._sin_k_cached = None

    def _inv_freq(self, device=None) -> torch.Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim))

    def _scale(self, device=None) -> torch.Tensor:
        return (torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) + 0.4 * self.dim) / (1.4 * self.dim)

    def _update_cos_sin_cache(self, seqlen: int, device=None, dtype=None) -> None:
        stale = (
            seqlen > self._seq_len_cached
            or self._cos_cached is None
            or self._cos_cached.device != device
            or self._cos_cached.dtype != dtype
            or (self.training and self._cos_cached.is_inference())
        )
        if not stale:
            return
        self._seq_len_cached = seqlen
        t = torch.arange(seqlen, device=device, dtype=torch.float32)
        # float32 tables whatever the module's dtype: positions times frequencies lose too much in 16 bits
        inv_freq = self.inv_freq if self.inv_freq.dtype == torch.float32 else self._inv_freq(device)
        freqs = torch.outer(t, inv_freq.to(device))
        if self.scale is None:
            self._cos_cached, self._sin_cached = torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)
            return
        scale = self.scale if self.scale.dtype == torch.float32 else self._scale(self.scale.device)
        power = (torch.arange(seqlen, dtype=torch.float32, device=device) - seqlen // 2) / self.scale_base
        scale = scale.to(device) ** power[:, None]
        self._cos_cached, self._sin_cached = (torch.cos(freqs) * scale).to(dtype), (torch.sin(freqs) * scale).to(dtype)
        self._cos_k_cached = (torch.cos(freqs) / scale).to(dtype)
        self._sin_k_cached = (torch.sin(freqs) / scale).to(dtype)

    def forward(
        self,
        qkv: torch.Tensor,
        kv: torch.Tensor | None = None,
        seqlen_offset: int | torch.Tensor = 0,
        max_seqlen: int | None = None,
        num_heads_q: int | None = None,
    ):
        """qkv ``(batch, seqlen, 3, nheads, headdim)`` or ``(batch, seqlen, nheads_q + 2 * nheads_k, headdim)``
        (with ``num_heads_q``), or just q when ``kv`` ``(batch, seqlen, 2, nheads_k, headdim)`` is given. Rotates
        q and k in place and returns qkv (or ``(q, kv)``)."""
        seqlen = qkv.shape[1]
        if max_seqlen is not None:
            self._update_cos_sin_cache(max_seqlen, device=qkv.device, dtype=qkv.dtype)
        elif isinstance(seqlen_offset, int):
            self._update_cos_sin_cache(seqlen + seqlen_offset, device=qkv.device, dtype=qkv.dtype)
        else:
            raise InvalidArgumentError("a tensor seqlen_offset needs max_seqlen (the cos/sin tables' length)")
        cos, sin = self._cos_cached, self._sin_cached
        cos_k = cos if self.scale is None else self._cos_k_cached
        sin_k = sin if self.scale is None else self._sin_k_cached
        rotate = dict(interleaved=self.interleaved, inplace=True, seqlen_offsets=seqlen_offset)
        if kv is not None:
            apply_rotary_emb(qkv, cos, sin, **rotate)
            apply_rotary_emb(kv[:, :, 0], cos_k, sin_k, **rotate)
            return qkv, kv
        if qkv.dim() == 5:
            q, k = qkv[:, :, 0], qkv[:, :, 1]
        else:
            if num_heads_q is None:
                raise InvalidArgumentError("a (batch, seqlen, nheads_q + 2 * nheads_k, headdim) qkv needs num_heads_q")
            num_heads_k = (qkv.shape[2] - num_heads_q) // 2
            q, k = qkv[:, :, :num_heads_q], qkv[:, :, num_heads_q : num_heads_q + num_heads_k]
        apply_rotary_emb(q, cos, sin, **rotate)
        apply_rotary_emb(k, cos_k, sin_k, **rotate)
        return qkv
