"""``attnkit.piecewise_attention``: FlagAttention's piecewise attention (two score functions by distance)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import validation
from ..errors import InvalidArgumentError
from . import _common, _library


def piecewise_attention(
    q1: torch.Tensor,
    k1: torch.Tensor,
    q2: torch.Tensor,
    k2: torch.Tensor,
    v: torch.Tensor,
    dist_threshold: int,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backend: str | Sequence[str] = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention whose score uses ``q1.k1`` for near pairs and ``q2.k2`` for far ones.

    For query ``i`` and key ``j`` the distance is ``d = i + seqlen_k - seqlen_q - j``; pairs with
    ``d < dist_threshold`` score ``softmax_scale * q1[i].k1[j]``, the others ``softmax_scale * q2[i].k2[j]``
    (useful for context extension: rotary-encoded q1/k1 nearby, position-free q2/k2 far away).

    Args:
        q1, q2: ``(batch, seqlen_q, nheads, headdim)``; k1, k2: ``(batch, seqlen_k, nheads_k, headdim)``;
        v: ``(batch, seqlen_k, nheads_k, headdim_v)``.
        dist_threshold: int distance threshold.
        causal: bottom-right aligned causal mask.

    Returns:
        ``out`` ``(batch, seqlen_q, nheads, headdim_v)`` or ``(out, lse)``; differentiable in all five inputs.
    """
    named = {"q1": q1, "k1": k1, "q2": q2, "k2": k2, "v": v}
    for name, x in named.items():
        validation.tensor(name, x, 4)
    validation.same_dtype_device(named)
    validation.heads_and_dims(q1.shape, k1.shape, v.shape, seq_axis=1)
    validation.last_dim_contiguous(named)
    if q2.shape != q1.shape:
        raise InvalidArgumentError(f"q2 has shape {tuple(q2.shape)}; it must match q1's {tuple(q1.shape)}")
    if k2.shape != k1.shape:
        raise InvalidArgumentError(f"k2 has shape {tuple(k2.shape)}; it must match k1's {tuple(k1.shape)}")
    if isinstance(dist_threshold, bool) or not isinstance(dist_threshold, int):
        raise validation.InvalidArgumentTypeError(f"dist_threshold must be an int, got {dist_threshold!r}")
    batch, seqlen_q, num_heads_q, head_dim = q1.shape
    seqlen_k = k1.shape[1]
    # Distances lie in [1 - Sq, Sk - 1]: thresholds past either end select one score everywhere, so clamp them
    # there (a threshold beyond int64 or int32 never reaches the custom op or a kernel).
    dist_threshold = max(min(dist_threshold, seqlen_k), 1 - seqlen_q)
    params = _common.resolve_params(
        head_dim=head_dim,
        causal=causal,
        softmax_scale=softmax_scale,
        window_size=(-1, -1),
        softcap=0.0,
        dropout_p=0.0,
        deterministic=False,
    )
    validation.flag("return_lse", return_lse)
    chosen = _common.choose(
        "piecewise",
        backend,
        q=q1,
        head_dim_v=v.shape[-1],
        num_heads_k=k1.shape[2],
        batch=batch,
        seqlen_q=seqlen_q,
        seqlen_k=seqlen_k,
        params=params,
        alibi=False,
        requires_grad=_common.needs_grad(*named.values()),
    )
    if q1.numel() == 0 or seqlen_k == 0:
        out, lse = _common.EmptyAttention.apply(
            (batch, seqlen_q, num_heads_q, v.shape[-1]), (batch, num_heads_q, seqlen_q), q1, k1, v
        )
    else:
        out, lse = _library.piecewise_forward(
            q1, k1, q2, k2, v, dist_threshold, params.softmax_scale, params.causal, chosen
        )
    return (out, lse) if return_lse else out
