"""Chunked attention in plain PyTorch: the semantics every other backend is tested against.

Memory stays O(S): queries are processed ``QUERY_CHUNK`` rows at a time and, within that, keys ``KEY_CHUNK``
columns at a time with an online softmax, so the largest temporary is ``B x H x QUERY_CHUNK x KEY_CHUNK`` scores.
A 32k-token sequence never allocates a 32k x 32k matrix. Backward recomputes the scores chunk by chunk from
the saved log-sum-exp, exactly like a FlashAttention backward.

The same code serves plain attention and FlagAttention's piecewise attention: with ``dist_threshold`` set, a score
uses ``q1.k1`` where ``i + Sk - Sq - j < dist_threshold`` and ``q2.k2`` elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit import dropout as dropout_rng
from attnkit.params import AttentionParams, lse_dtype

QUERY_CHUNK = 1024
KEY_CHUNK = 1024


@dataclass(frozen=True)
class _Problem:
    """One dense problem: tensors already in (B, H, S, D) compute layout, grouped for GQA."""

    params: AttentionParams
    seqlen_q: int
    seqlen_k: int
    num_heads_q: int
    group: int  # query heads per kv head
    batch_offset: int  # index of this batch's first row in the dropout counter
    dist_threshold: int | None
    sink: torch.Tensor | None = None  # float32 (Hq,): a logit per head in the softmax denominator only


def _grouped(x: torch.Tensor, num_kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, S, Hq, D) -> (B, Hk, G, S, D) in the compute dtype."""
    b, s, h, d = x.shape
    return x.to(dtype).view(b, s, num_kv_heads, h // num_kv_heads, d).permute(0, 2, 3, 1, 4)


def _kv(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, S, Hk, D) -> (B, Hk, 1, S, D) in the compute dtype."""
    return x.to(dtype).permute(0, 2, 1, 3).unsqueeze(2)


def _distance(pb: _Problem, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return rows[:, None] + (pb.seqlen_k - pb.seqlen_q) - cols[None, :]


def _visible(pb: _Problem, dist: torch.Tensor) -> torch.Tensor | None:
    p = pb.params
    mask = None
    if p.window_left >= 0:
        mask = dist <= p.window_left
    if p.window_right >= 0:
        right = dist >= -p.window_right
        mask = right if mask is None else mask & right
    return mask


def _slopes(alibi: torch.Tensor | None, batch: int, num_kv: int, group: int, dtype: torch.dtype) -> torch.Tensor | None:
    if alibi is None:
        return None
    slopes = alibi.to(dtype)
    if slopes.dim() == 1:
        slopes = slopes.expand(batch, -1)
    return slopes.reshape(batch, num_kv, group, 1, 1)


def _raw_scores(pb, qs, ks, dist):
    """Scaled scores before softcap; piecewise picks q1.k1 or q2.k2 by distance. Returns (scores, near-mask)."""
    scale = pb.params.softmax_scale
    s = _scaled_products(qs[0], ks[0], scale)
    near = None
    if pb.dist_threshold is not None:
        s_far = _scaled_products(qs[1], ks[1], scale)
        near = dist < pb.dist_threshold
        s = torch.where(near, s, s_far)
    return s, near


def _scaled_products(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * q @ k^T``, saturated to the compute dtype's range.

    Products of finite inputs can pass the dtype's range inside the dot product itself: a partial sum of +inf and
    one of -inf give NaN, and whether both occur depends on the BLAS kernel's summation order (one CPU gives inf,
    another NaN). A block with non-finite scores is recomputed in float64, where such products fit, before it is
    clamped; NaN inputs still give NaN."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if s.dtype != torch.float64 and not bool(torch.isfinite(s).all()):
        s = _saturate(torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale, s.dtype)
    return _saturate(s, s.dtype)


def _saturate(s: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Finite inputs whose scores overflow the compute dtype (softmax_scale=1e38, bf16 values of 1e20, huge ALiBi
    slopes) would give inf - inf = NaN in the softmax: clamp them to the largest finite value of ``dtype`` (default:
    their own) and convert (NaN stays NaN)."""
    big = torch.finfo(dtype or s.dtype).max
    return s.clamp(-big, big).to(dtype or s.dtype)


def _final_scores(pb, raw, dist, slopes, visible):
    p = pb.params
    s = raw
    if p.softcap > 0:
        s = torch.tanh(s / p.softcap) * p.softcap
    if slopes is not None:
        s = _saturate(s - slopes * dist.abs().to(s.dtype))
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    return s


def _dropout_scale(pb, rows, cols, batch, num_kv, device, dtype):
    """Per-element multiplier keep / (1 - p), shaped (B, Hk, G, rows, cols)."""
    p = pb.params
    bh = (pb.batch_offset + torch.arange(batch, device=device))[:, None] * pb.num_heads_q + torch.arange(
        pb.num_heads_q, device=device
    )[None, :]
    keep = dropout_rng.keep_mask(p.dropout_seed, p.dropout_p, bh.reshape(-1), rows, cols)
    scale = keep.to(dtype) / (1.0 - p.dropout_p)
    return scale.view(batch, num_kv, pb.group, rows.numel(), cols.numel())


def forward(
    qs: list[torch.Tensor],
    ks: list[torch.Tensor],
    v: torch.Tensor,
    alibi: torch.Tensor | None,
    pb: _Problem,
    compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense forward. qs/ks: (B, S, H, D) tensors (two each for piecewise). Returns out (B,Sq,Hq,Dv), lse (B,Hq,Sq)."""
    batch, sq, hq, _ = qs[0].shape
    hk, sk, dv = ks[0].shape[2], ks[0].shape[1], v.shape[-1]
    device = qs[0].device
    out = torch.empty(batch, sq, hq, dv, dtype=qs[0].dtype, device=device)
    lse = torch.empty(batch, hq, sq, dtype=lse_dtype(qs[0].dtype), device=device)
    kg = [_kv(k, compute_dtype) for k in ks]
    vg = _kv(v, compute_dtype)
    slopes = _slopes(alibi, batch, hk, pb.group, compute_dtype)
    for r0 in range(0, sq, QUERY_CHUNK):
        r1 = min(sq, r0 + QUERY_CHUNK)
        rows = torch.arange(r0, r1, device=device)
        qc = [_grouped(q[:, r0:r1], hk, compute_dtype) for q in qs]
        shape = (batch, hk, pb.group, r1 - r0)
        m = torch.full(shape, float("-inf"), dtype=compute_dtype, device=device)
        l = torch.zeros(shape, dtype=compute_dtype, device=device)
        acc = torch.zeros((*shape, dv), dtype=compute_dtype, device=device)
        for c0 in range(0, sk, KEY_CHUNK):
            c1 = min(sk, c0 + KEY_CHUNK)
            cols = torch.arange(c0, c1, device=device)
            dist = _distance(pb, rows, cols)
            visible = _visible(pb, dist)
            if visible is not None and not bool(visible.any()):
                continue  # whole tile masked: skipping it changes nothing and saves the matmuls
            raw, _ = _raw_scores(pb, qc, [k[:, :, :, c0:c1] for k in kg], dist)
            s = _final_scores(pb, raw, dist, slopes, visible)
            m_new = torch.maximum(m, s.amax(dim=-1))
            # Rows still without any visible key keep m = -inf; use 0 there so exp() gives 0 instead of NaN.
            m_safe = torch.where(torch.isinf(m_new) & (m_new < 0), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_safe[..., None])
            alpha = torch.exp(m - m_safe)
            l = l * alpha + p.sum(dim=-1)
            if pb.params.dropout_p > 0:
                p = p * _dropout_scale(pb, rows, cols, batch, hk, device, compute_dtype)
            acc = acc * alpha[..., None] + torch.matmul(p, vg[:, :, :, c0:c1])
            m = m_new
        if pb.sink is not None:
            # The sink joins the denominator (not the values): rescale to the common max, then add exp(sink - max).
            sink = pb.sink.to(compute_dtype).view(1, hk, pb.group, 1)
            m_new = torch.maximum(m, sink)
            m_safe = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
            alpha = torch.exp(m - m_safe)
            l = l * alpha + torch.exp(sink - m_safe)
            acc = acc * alpha[..., None]
            m = m_new
        empty = l == 0
        o = acc / torch.where(empty, torch.ones_like(l), l)[..., None]
        o = o.masked_fill(empty[..., None], 0.0)
        row_lse = torch.where(empty, torch.full_like(m, float("-inf")), m + torch.log(l))
        out[:, r0:r1] = o.permute(0, 3, 1, 2, 4).reshape(batch, r1 - r0, hq, dv).to(out.dtype)
        lse[:, :, r0:r1] = row_lse.reshape(batch, hq, r1 - r0).to(lse.dtype)
    return out, lse


def backward(
    dout: torch.Tensor,
    qs: list[torch.Tensor],
    ks: list[torch.Tensor],
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    alibi: torch.Tensor | None,
    pb: _Problem,
    compute_dtype: torch.dtype,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Dense backward; returns ([dq per q], [dk per k], dv) in the inputs' dtypes."""
    batch, sq, hq, _ = qs[0].shape
    hk, sk, dvdim = ks[0].shape[2], ks[0].shape[1], v.shape[-1]
    device = qs[0].device
    p_ = pb.params
    kg = [_kv(k, compute_dtype) for k in ks]
    vg = _kv(v, compute_dtype)
    slopes = _slopes(alibi, batch, hk, pb.group, compute_dtype)
    dqs = [torch.zeros(q.shape, dtype=compute_dtype, device=device) for q in qs]
    dks = [torch.zeros(batch, hk, 1, sk, k.shape[-1], dtype=compute_dtype, device=device) for k in ks]
    dvg = torch.zeros(batch, hk, 1, sk, dvdim, dtype=compute_dtype, device=device)
    for r0 in range(0, sq, QUERY_CHUNK):
        r1 = min(sq, r0 + QUERY_CHUNK)
        rows = torch.arange(r0, r1, device=device)
        qc = [_grouped(q[:, r0:r1], hk, compute_dtype) for q in qs]
        doc = _grouped(dout[:, r0:r1], hk, compute_dtype)
        oc = _grouped(out[:, r0:r1], hk, compute_dtype)
        delta = (doc * oc).sum(dim=-1)
        lse_c = lse[:, :, r0:r1].to(compute_dtype).reshape(batch, hk, pb.group, r1 - r0)
        lse_c = torch.where(torch.isinf(lse_c) & (lse_c < 0), torch.full_like(lse_c, float("inf")), lse_c)
        dq_acc = [torch.zeros_like(x) for x in qc]
        for c0 in range(0, sk, KEY_CHUNK):
            c1 = min(sk, c0 + KEY_CHUNK)
            cols = torch.arange(c0, c1, device=device)
            dist = _distance(pb, rows, cols)
            visible = _visible(pb, dist)
            if visible is not None and not bool(visible.any()):
                continue
            kc = [k[:, :, :, c0:c1] for k in kg]
            raw, near = _raw_scores(pb, qc, kc, dist)
            s = _final_scores(pb, raw, dist, slopes, visible)
            p = torch.exp(s - lse_c[..., None])  # empty rows carry lse=+inf here, so p = 0
            dp = torch.matmul(doc, vg[:, :, :, c0:c1].transpose(-1, -2))
            if p_.dropout_p > 0:
                z = _dropout_scale(pb, rows, cols, batch, hk, device, compute_dtype)
                dvg[:, :, :, c0:c1] += torch.matmul((p * z).transpose(-1, -2), doc).sum(dim=2, keepdim=True)
                dp = dp * z
            else:
                dvg[:, :, :, c0:c1] += torch.matmul(p.transpose(-1, -2), doc).sum(dim=2, keepdim=True)
            ds = p * (dp - delta[..., None])
            if p_.softcap > 0:
                ds = ds * (1 - torch.tanh(raw / p_.softcap) ** 2)
            ds = ds * p_.softmax_scale
            parts = [ds] if near is None else [torch.where(near, ds, 0.0), torch.where(near, 0.0, ds)]
            for idx, part in enumerate(parts):
                dq_acc[idx] += torch.matmul(part, kc[idx])
                dks[idx][:, :, :, c0:c1] += torch.matmul(part.transpose(-1, -2), qc[idx]).sum(dim=2, keepdim=True)
        for idx, acc in enumerate(dq_acc):
            dqs[idx][:, r0:r1] = acc.permute(0, 3, 1, 2, 4).reshape(batch, r1 - r0, hq, -1)
    # Gradients are contiguous whatever the inputs' strides (the layout attnkit's ops document).
    contiguous = torch.contiguous_format
    dq_out = [d.to(q.dtype, memory_format=contiguous) for d, q in zip(dqs, qs)]
    dk_out = [d.squeeze(2).permute(0, 2, 1, 3).to(k.dtype, memory_format=contiguous) for d, k in zip(dks, ks)]
    dv_out = dvg.squeeze(2).permute(0, 2, 1, 3).to(v.dtype, memory_format=contiguous)
    return dq_out, dk_out, dv_out


def make_problem(
    params: AttentionParams,
    q: torch.Tensor,
    k: torch.Tensor,
    batch_offset: int = 0,
    dist_threshold: int | None = None,
    sink: torch.Tensor | None = None,
) -> _Problem:
    return _Problem(
        params=params,
        seqlen_q=q.shape[1],
        seqlen_k=k.shape[1],
        num_heads_q=q.shape[2],
        group=q.shape[2] // k.shape[2],
        batch_offset=batch_offset,
        dist_threshold=dist_threshold,
        sink=sink,
    )
