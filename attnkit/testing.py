"""Reference implementations for everyone's tests, with the same signatures as the real operators.

* ``attention_ref(..., upcast=True)`` runs the reference backend in float64 (chunked, O(S) memory,
  differentiable) and returns float64 results: the "exact" answer to measure errors against.
* ``attention_ref(..., upcast=False)`` computes plainly in the inputs' own dtype (materialised scores,
  differentiable through autograd): the error of "plain PyTorch in the same precision" that flash-attn's
  tolerance rule compares a fast backend with.
* ``attention_naive`` is that plain computation for any dtype; in float64 it is an implementation independent of
  the reference backend (einsum over the whole score matrix), used to test the reference itself.

Tolerance rule (flash-attn): ``max|fast - exact| <= factor * max|plain_low_precision - exact| + atol`` with
``factor`` 2 for outputs and 3 for gradients; see :func:`within_tolerance`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import dropout as dropout_rng
from . import fp8
from .ops.attention import attention
from .ops.piecewise import piecewise_attention
from .ops.varlen import attention_varlen
from .params import lse_dtype
from .validation import reachable_window


def _mask(sq: int, sk: int, window_left: int, window_right: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(sq, device=device)[:, None]
    cols = torch.arange(sk, device=device)[None, :]
    dist = rows + sk - sq - cols
    visible = torch.ones(sq, sk, dtype=torch.bool, device=device)
    # Bounds past every distance mask nothing (and would not fit a tensor comparison).
    window_left, window_right = reachable_window(window_left, window_right, sq, sk)
    if window_left >= 0:
        visible &= dist <= window_left
    if window_right >= 0:
        visible &= dist >= -window_right
    return visible, dist


def attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    alibi_slopes: torch.Tensor | None = None,
    softcap: float = 0.0,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    return_lse: bool = False,
    dtype: torch.dtype | None = None,
    batch_offset: int = 0,
    learnable_sink: torch.Tensor | None = None,
):
    """Plain attention over the whole (B, H, Sq, Sk) score matrix, computed in ``dtype`` (default: q's).
    ``learnable_sink`` (Hq,) is one more score column per head that gets probability but no value."""
    dtype = dtype or q.dtype
    batch, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else d**-0.5
    left, right = window_size
    if causal:
        right = 0
    qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
    kf = kf.repeat_interleave(hq // hk, dim=2)
    vf = vf.repeat_interleave(hq // hk, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", qf, kf) * scale
    if softcap > 0:
        s = torch.tanh(s / softcap) * softcap
    visible, dist = _mask(sq, sk, left, right, q.device)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(dtype)
        slopes = slopes[None, :, None, None] if slopes.dim() == 1 else slopes[:, :, None, None]
        s = s - slopes * dist.abs().to(dtype)
    s = s.masked_fill(~visible, float("-inf"))
    if learnable_sink is not None:
        sink = learnable_sink.to(dtype)[None, :, None, None].expand(batch, hq, sq, 1)
        lse = torch.logsumexp(torch.cat((s, sink), dim=-1), dim=-1)
        p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    else:
        lse = torch.logsumexp(s, dim=-1)
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows with no visible key: all -inf -> NaN -> 0
    if dropout_p > 0:
        bh = (batch_offset + torch.arange(batch, device=q.device))[:, None] * hq + torch.arange(hq, device=q.device)
        keep = dropout_rng.keep_mask(
            dropout_seed,
            dropout_p,
            bh.reshape(-1),
            torch.arange(sq, device=q.device),
            torch.arange(sk, device=q.device),
        ).view(batch, hq, sq, sk)
        p = p * keep.to(dtype) / (1 - dropout_p)
    out = torch.einsum("bhij,bjhd->bihd", p, vf)
    return (out, lse.to(lse_dtype(q.dtype))) if return_lse else out


def _seed_for(dropout_p: float) -> int:
    return dropout_rng.draw_seed() if dropout_p > 0 else 0


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    alibi_slopes: torch.Tensor | None = None,
    softcap: float = 0.0,
    dropout_p: float = 0.0,
    deterministic: bool = False,
    return_lse: bool = False,
    backend: str | Sequence[str] = "reference",
    upcast: bool = True,
    learnable_sink: torch.Tensor | None = None,
):
    """:func:`attnkit.attention` computed by the reference (``upcast=True``: float64 in, float64 out) or plainly
    in the inputs' dtype (``upcast=False``). Dropout draws its seed from the torch generator exactly like the real
    op, so calling ``torch.manual_seed(s)`` before each gives the same mask. ``backend`` is accepted for signature
    compatibility; the reference always runs."""
    kw = dict(
        causal=causal, softmax_scale=softmax_scale, window_size=window_size, softcap=softcap,
        learnable_sink=learnable_sink,
    )  # fmt: skip
    if upcast:
        return attention(
            q.double(), k.double(), v.double(), alibi_slopes=alibi_slopes, dropout_p=dropout_p,
            deterministic=deterministic, return_lse=return_lse, backend="reference", **kw,
        )  # fmt: skip
    return attention_naive(
        q, k, v, alibi_slopes=alibi_slopes, dropout_p=dropout_p, dropout_seed=_seed_for(dropout_p),
        return_lse=return_lse, **kw,
    )  # fmt: skip


def attention_varlen_ref(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False, softmax_scale=None,
    window_size=(-1, -1), alibi_slopes=None, softcap=0.0, dropout_p=0.0, deterministic=False, return_lse=False,
    backend="reference", upcast=True, learnable_sink=None,
):  # fmt: skip
    """:func:`attnkit.attention_varlen` by the reference (see :func:`attention_ref`)."""
    kw = dict(
        causal=causal, softmax_scale=softmax_scale, window_size=window_size, softcap=softcap,
        learnable_sink=learnable_sink,
    )  # fmt: skip
    if upcast:
        return attention_varlen(
            q.double(), k.double(), v.double(), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            alibi_slopes=alibi_slopes, dropout_p=dropout_p, deterministic=deterministic, return_lse=return_lse,
            backend="reference", **kw,
        )  # fmt: skip
    seed = _seed_for(dropout_p)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b : b + 1]
        o, l = attention_naive(
            q[None, cq[b] : cq[b + 1]], k[None, ck[b] : ck[b + 1]], v[None, ck[b] : ck[b + 1]], alibi_slopes=slopes,
            dropout_p=dropout_p, dropout_seed=seed, return_lse=True, batch_offset=b, **kw,
        )  # fmt: skip
        outs.append(o[0])
        lses.append(l[0])
    # Rows past cu_seqlens_q[-1] (padding) belong to no sequence: out 0, lse -inf, as the operator gives them.
    pad = q.shape[0] - cq[-1]
    outs.append(q.new_zeros((pad, q.shape[1], v.shape[-1])))
    lses.append(torch.full((q.shape[1], pad), float("-inf"), dtype=lse_dtype(q.dtype), device=q.device))
    out, lse = torch.cat(outs), torch.cat(lses, dim=-1)
    return (out, lse) if return_lse else out


def piecewise_attention_ref(
    q1, k1, q2, k2, v, dist_threshold, *, causal=False, softmax_scale=None, return_lse=False, backend="reference",
    upcast=True,
):  # fmt: skip
    """:func:`attnkit.piecewise_attention` by the reference (``upcast``) or plainly in the input dtype."""
    if upcast:
        return piecewise_attention(
            q1.double(), k1.double(), q2.double(), k2.double(), v.double(), dist_threshold, causal=causal,
            softmax_scale=softmax_scale, return_lse=return_lse, backend="reference",
        )  # fmt: skip
    _batch, sq, hq, d = q1.shape
    sk, hk = k1.shape[1], k1.shape[2]
    scale = softmax_scale if softmax_scale is not None else d**-0.5
    rep = hq // hk
    s1 = torch.einsum("bihd,bjhd->bhij", q1, k1.repeat_interleave(rep, dim=2))
    s2 = torch.einsum("bihd,bjhd->bhij", q2, k2.repeat_interleave(rep, dim=2))
    visible, dist = _mask(sq, sk, -1, 0 if causal else -1, q1.device)
    threshold = max(min(dist_threshold, sk), 1 - sq)  # distances lie in [1 - Sq, Sk - 1]
    s = torch.where(dist < threshold, s1, s2) * scale
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1).to(lse_dtype(q1.dtype))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhij,bjhd->bihd", p, v.repeat_interleave(rep, dim=2))
    return (out, lse) if return_lse else out


def max_abs_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64, NaN-aware: any NaN mismatch gives inf."""
    a64, b64 = a.detach().double(), b.detach().double()
    if bool((a64.isnan() != b64.isnan()).any()):
        return float("inf")
    diff = (a64 - b64).abs().nan_to_num(0.0)
    return float(diff.max()) if diff.numel() else 0.0


def within_tolerance(
    fast: torch.Tensor, exact: torch.Tensor, plain: torch.Tensor, *, factor: float = 2.0, atol: float = 1e-5
) -> tuple[bool, float, float]:
    """flash-attn's rule: ``err(fast) <= factor * err(plain) + atol``. Returns (ok, err_fast, allowed)."""
    err_fast = max_abs_error(fast, exact)
    allowed = factor * max_abs_error(plain, exact) + atol
    return err_fast <= allowed, err_fast, allowed


def attention_fp8_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    alibi_slopes: torch.Tensor | None = None,
    softcap: float = 0.0,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    upcast: bool = True,
    p_fp8: bool = True,
):
    """References for float8_e4m3fn ``attention`` calls, on the dequantized inputs (FlashAttention-3's fp8 tests).

    ``upcast=True``: the exact answer, the dequantized inputs in float64 through the reference (float64 out).
    ``upcast=False``: plain PyTorch in bfloat16 (dequantized inputs rounded to bfloat16, materialised scores);
    with ``p_fp8`` the probabilities are rounded to float8_e4m3fn before the PV product the way the fp8 kernels
    round them (``exp(s - rowmax) * 2^8``, normalised by the unrounded row sum), else they stay bfloat16. The
    tolerance rule compares a kernel with the ``p_fp8`` one (docs/fp8.md). Dropout draws its seed from the torch
    generator like the real op (see :func:`attention_ref`).
    """
    hk = k.shape[2]
    ones = torch.ones(q.shape[0], hk, dtype=torch.float32, device=q.device)
    qd, kd, vd = (ones if d is None else d for d in (q_descale, k_descale, v_descale))
    kw = dict(causal=causal, softmax_scale=softmax_scale, window_size=window_size, softcap=softcap)
    if upcast:
        qf, kf, vf = (fp8.dequantize(x, d, torch.float64) for x, d in ((q, qd), (k, kd), (v, vd)))
        return attention(
            qf, kf, vf, alibi_slopes=alibi_slopes, dropout_p=dropout_p, return_lse=return_lse, backend="reference",
            **kw,
        )  # fmt: skip
    qf, kf, vf = (fp8.dequantize(x, d).to(torch.bfloat16) for x, d in ((q, qd), (k, kd), (v, vd)))
    seed = _seed_for(dropout_p)
    if not p_fp8:
        return attention_naive(
            qf, kf, vf, alibi_slopes=alibi_slopes, dropout_p=dropout_p, dropout_seed=seed, return_lse=return_lse,
            **kw,
        )  # fmt: skip
    batch, sq, hq, d = q.shape
    sk = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else d**-0.5
    left, right = window_size
    if causal:
        right = 0
    kf = kf.repeat_interleave(hq // hk, dim=2)
    vf = vf.repeat_interleave(hq // hk, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", qf, kf) * scale
    if softcap > 0:
        s = torch.tanh(s / softcap) * softcap
    visible, dist = _mask(sq, sk, left, right, q.device)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(s.dtype)
        slopes = slopes[None, :, None, None] if slopes.dim() == 1 else slopes[:, :, None, None]
        s = s - slopes * dist.abs().to(s.dtype)
    s = s.masked_fill(~visible, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    p = torch.exp(s - m)  # bfloat16, in [0, 1]
    row_sum = p.float().sum(dim=-1)
    p8 = (p.float() * 256.0).to(fp8.FP8_DTYPE).to(torch.bfloat16)
    if dropout_p > 0:
        bh = torch.arange(batch, device=q.device)[:, None] * hq + torch.arange(hq, device=q.device)
        keep = dropout_rng.keep_mask(
            seed, dropout_p, bh.reshape(-1), torch.arange(sq, device=q.device), torch.arange(sk, device=q.device)
        ).view(batch, hq, sq, sk)
        p8 = p8 * keep.to(p8.dtype)
    acc = torch.einsum("bhij,bjhd->bihd", p8, vf).float()
    denom = torch.where(row_sum == 0, torch.ones_like(row_sum), row_sum * 256.0)
    out = (acc / denom.permute(0, 2, 1)[..., None]).masked_fill((row_sum == 0).permute(0, 2, 1)[..., None], 0.0)
    out = out / (1.0 - dropout_p)
    out = out.to(torch.bfloat16)
    lse = torch.where(row_sum == 0, torch.full_like(row_sum, float("-inf")), m[..., 0].float() + row_sum.log())
    return (out, lse) if return_lse else out
