"""Resolved call parameters handed from the frontend to a backend.

The frontend validates user input and turns it into these frozen records, so a backend never has to
re-check shapes or re-derive defaults: ``softmax_scale`` is a number (``>= 0`` in ``forward``, ``backward``
and the piecewise methods: their custom ops fold a negative scale into the queries), ``causal`` is already folded into
``window_right == 0``, and the dropout seed has been drawn from the torch generator.

Layouts (flash-attn's):

* dense: q ``(B, Sq, Hq, D)``, k ``(B, Sk, Hk, D)``, v ``(B, Sk, Hk, Dv)``; out ``(B, Sq, Hq, Dv)`` in q's dtype,
  lse ``(B, Hq, Sq)`` float32 (float64 for float64 inputs; natural log).
* varlen (``VarlenInfo`` given): q ``(Tq, Hq, D)``, k ``(Tk, Hk, D)``, v ``(Tk, Hk, Dv)``; out ``(Tq, Hq, Dv)``,
  lse ``(Hq, Tq)``. Sequence ``b`` owns rows ``cu_seqlens[b]:cu_seqlens[b+1]``; rows past ``cu_seqlens_q[-1]``
  (padding) get out = 0, lse = -inf and zero gradients.
* strides: inputs may be strided (contiguous in the last dimension only); outputs, and the gradients ``backward``
  returns, are new contiguous tensors of these shapes. The custom ops' fake kernels promise exactly that (what
  ``torch.compile`` plans with), and the ops copy any other layout a backend returns.

Masking, for query row ``i`` and key column ``j`` of one sequence with lengths ``Sq`` and ``Sk`` (bottom-right
aligned, as in flash-attn 2.x): let ``d = i + Sk - Sq - j``. The key is visible iff
``(window_left < 0 or d <= window_left) and (window_right < 0 or d >= -window_right)``.
Scores: ``s = softmax_scale * q.k``; if ``softcap > 0``: ``s = softcap * tanh(s / softcap)``; then ALiBi adds
``-slope[h] * |d|``. Rows with no visible key give out = 0 and lse = -inf.

Dropout (``dropout_p > 0``): key ``j`` of row ``i`` for sequence ``b``, query head ``h`` is kept iff
``attnkit.dropout.uniform(seed, j, i, b * Hq + h) >= dropout_p``; kept probabilities are scaled by
``1 / (1 - dropout_p)``. Every backend draws the same mask (Philox4x32-10, see :mod:`attnkit.dropout`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The log-sum-exp is float32, except float64 for float64 inputs (so fp64 gradchecks stay exact)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class AttentionParams:
    softmax_scale: float
    causal: bool = False
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    dropout_p: float = 0.0
    dropout_seed: int = 0
    deterministic: bool = False

    @property
    def has_window(self) -> bool:
        """True when a sliding window (beyond plain causal) limits the keys."""
        return self.window_left >= 0 or (self.window_right >= 0 and not self.causal)

    @property
    def is_masked(self) -> bool:
        return self.window_left >= 0 or self.window_right >= 0


@dataclass(frozen=True)
class VarlenInfo:
    cu_seqlens_q: torch.Tensor  # int32 (B+1,)
    cu_seqlens_k: torch.Tensor  # int32 (B+1,)
    max_seqlen_q: int
    max_seqlen_k: int

    @property
    def batch(self) -> int:
        return self.cu_seqlens_q.shape[0] - 1


@dataclass(frozen=True)
class KVCacheInfo:
    """Where the keys of each batch row live, for ``attention_with_kvcache``.

    ``cache_seqlens`` (B,) int32 is the end of each row's keys after the append. Without ``block_table`` the
    cache is ``(B_cache, S_cache, Hk, D)`` and row ``b`` reads cache row ``cache_batch_idx[b]`` (or ``b``). With
    ``block_table`` (B, max_blocks) int32 the cache is paged: ``(num_blocks, page_size, Hk, D)`` and key ``j`` of
    row ``b`` sits in page ``block_table[b, j // page_size]`` at slot ``j % page_size``. ``cache_leftpad`` (B,)
    int32 (flash-attn's left-padded caches): row ``b``'s keys are positions ``cache_leftpad[b] ... cache_seqlens[b]
    - 1`` (default from 0); masks and ALiBi treat them as a sequence of that length, i.e. distances are
    ``i + cache_seqlens[b] - Sq - j`` in absolute positions. ``num_splits``: how many programs share a row's keys in
    a split-KV kernel (0: the backend's heuristic); a hint that leaves the result unchanged up to rounding.
    All tensors are contiguous.
    """

    cache_seqlens: torch.Tensor
    cache_batch_idx: torch.Tensor | None = None
    block_table: torch.Tensor | None = None
    cache_leftpad: torch.Tensor | None = None
    num_splits: int = 0
