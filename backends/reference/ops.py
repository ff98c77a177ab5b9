"""Reference implementations of each operator on top of :mod:`.core` (dense, varlen, kvcache, piecewise)."""

from __future__ import annotations

import torch

from attnkit.params import AttentionParams, KVCacheInfo, VarlenInfo, lse_dtype

from . import core


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for every input dtype except fp64, which stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _slopes_row(alibi: torch.Tensor | None, b: int) -> torch.Tensor | None:
    if alibi is None or alibi.dim() == 1:
        return alibi
    return alibi[b : b + 1]


def _bounds(varlen: VarlenInfo) -> list[tuple[int, int, int, int]]:
    cq = varlen.cu_seqlens_q.tolist()
    ck = varlen.cu_seqlens_k.tolist()
    return [(cq[b], cq[b + 1], ck[b], ck[b + 1]) for b in range(len(cq) - 1)]


def forward(q, k, v, alibi, params: AttentionParams, varlen: VarlenInfo | None, compute_dtype: torch.dtype, sink=None):
    if varlen is None:
        pb = core.make_problem(params, q, k, sink=sink)
        return core.forward([q], [k], v, alibi, pb, compute_dtype)
    hq = q.shape[1]
    out = torch.zeros(q.shape[0], hq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full((hq, q.shape[0]), float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
    for b, (q0, q1, k0, k1) in enumerate(_bounds(varlen)):
        if q1 == q0:
            continue
        qb, kb, vb = q[None, q0:q1], k[None, k0:k1], v[None, k0:k1]
        pb = core.make_problem(params, qb, kb, batch_offset=b, sink=sink)
        ob, lb = core.forward([qb], [kb], vb, _slopes_row(alibi, b), pb, compute_dtype)
        out[q0:q1] = ob[0]
        lse[:, q0:q1] = lb[0]
    return out, lse


def backward(dout, q, k, v, out, lse, alibi, params, varlen, compute_dtype):
    if varlen is None:
        pb = core.make_problem(params, q, k)
        dqs, dks, dv = core.backward(dout, [q], [k], v, out, lse, alibi, pb, compute_dtype)
        return dqs[0], dks[0], dv
    dq, dk, dv = (torch.zeros(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
    for b, (q0, q1, k0, k1) in enumerate(_bounds(varlen)):
        if q1 == q0 or k1 == k0:
            continue
        qb, kb, vb = q[None, q0:q1], k[None, k0:k1], v[None, k0:k1]
        pb = core.make_problem(params, qb, kb, batch_offset=b)
        dqs, dks, dvb = core.backward(
            dout[None, q0:q1],
            [qb],
            [kb],
            vb,
            out[None, q0:q1],
            lse[None, :, q0:q1],
            _slopes_row(alibi, b),
            pb,
            compute_dtype,
        )
        dq[q0:q1] = dqs[0][0]
        dk[k0:k1] = dks[0][0]
        dv[k0:k1] = dvb[0]
    return dq, dk, dv


def gather_cache_rows(cache: torch.Tensor, info: KVCacheInfo, b: int, end: int, start: int = 0) -> torch.Tensor:
    """Keys (or values) ``start ... end - 1`` of batch row ``b`` as an (end - start, Hk, D) tensor; nothing outside
    that range is read (pages wholly before ``start`` or after ``end`` are not looked up)."""
    if info.block_table is not None:
        page = cache.shape[1]
        first = start // page
        pages = info.block_table[b, first : (end + page - 1) // page].long()
        return cache[pages].reshape(-1, *cache.shape[2:])[start - first * page : end - first * page]
    row = int(info.cache_batch_idx[b]) if info.cache_batch_idx is not None else b
    return cache[row, start:end]


def forward_kvcache(q, k_cache, v_cache, info: KVCacheInfo, alibi, params, compute_dtype):
    batch, sq, hq, _ = q.shape
    out = torch.empty(batch, sq, hq, v_cache.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, hq, sq, dtype=lse_dtype(q.dtype), device=q.device)
    ends = info.cache_seqlens.tolist()
    starts = info.cache_leftpad.tolist() if info.cache_leftpad is not None else [0] * batch
    for b, (start, end) in enumerate(zip(starts, ends)):
        # Left padding: the row's keys are start..end-1, a sequence of its own (bottom-right alignment and ALiBi
        # distances are those of absolute positions, since both count back from the row's end).
        kb = gather_cache_rows(k_cache, info, b, end, start)[None]
        vb = gather_cache_rows(v_cache, info, b, end, start)[None]
        pb = core.make_problem(params, q[b : b + 1], kb, batch_offset=b)
        ob, lb = core.forward([q[b : b + 1]], [kb], vb, _slopes_row(alibi, b), pb, compute_dtype)
        out[b], lse[b] = ob[0], lb[0]
    return out, lse


def piecewise_forward(q1, k1, q2, k2, v, dist_threshold, params, compute_dtype):
    pb = core.make_problem(params, q1, k1, dist_threshold=dist_threshold)
    return core.forward([q1, q2], [k1, k2], v, None, pb, compute_dtype)


def piecewise_backward(dout, q1, k1, q2, k2, v, out, lse, dist_threshold, params, compute_dtype):
    pb = core.make_problem(params, q1, k1, dist_threshold=dist_threshold)
    dqs, dks, dv = core.backward(dout, [q1, q2], [k1, k2], v, out, lse, None, pb, compute_dtype)
    return dqs[0], dks[0], dqs[1], dks[1], dv
