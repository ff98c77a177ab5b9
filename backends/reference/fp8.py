"""float8_e4m3fn calls on the reference backend: dequantize (``x.float() * descale``) and run the float32 code.

This is the definition of what an fp8 call computes: the exact attention of the dequantized inputs (float32
accumulation, no rounding of P), returned in ``scales.out_dtype``. It costs float32 copies of q, k and v.
"""

from __future__ import annotations

import torch

from attnkit.fp8 import Fp8Scales, dequantize
from attnkit.params import AttentionParams, KVCacheInfo, VarlenInfo

from . import core, ops


def forward_fp8(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alibi: torch.Tensor | None,
    params: AttentionParams,
    varlen: VarlenInfo | None,
    scales: Fp8Scales,
) -> tuple[torch.Tensor, torch.Tensor]:
    if varlen is None:
        qf = dequantize(q, scales.q_descale)
        kf = dequantize(k, scales.k_descale)
        vf = dequantize(v, scales.v_descale)
    else:
        # Sequence b owns rows cu[b]:cu[b+1] and descale row b; padding rows past cu[-1] stay as they are (never
        # read: their output is defined as 0 by ops.forward).
        qf, kf, vf = q.float(), k.float(), v.float()
        cq, ck = varlen.cu_seqlens_q.tolist(), varlen.cu_seqlens_k.tolist()
        for b in range(len(cq) - 1):
            qf[cq[b] : cq[b + 1]] = dequantize(q[cq[b] : cq[b + 1]], scales.q_descale[b])
            kf[ck[b] : ck[b + 1]] = dequantize(k[ck[b] : ck[b + 1]], scales.k_descale[b])
            vf[ck[b] : ck[b + 1]] = dequantize(v[ck[b] : ck[b + 1]], scales.v_descale[b])
    out, lse = ops.forward(qf, kf, vf, alibi, params, varlen, torch.float32)
    return out.to(scales.out_dtype), lse


def forward_kvcache_fp8(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache: KVCacheInfo,
    alibi: torch.Tensor | None,
    params: AttentionParams,
    scales: Fp8Scales,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantizes only the keys each batch row attends to (``cache_leftpad[b] ... cache_seqlens[b] - 1``, as in
    ops.forward_kvcache), with that row's descales."""
    batch, sq, hq, _ = q.shape
    out = torch.empty(batch, sq, hq, v_cache.shape[-1], dtype=scales.out_dtype, device=q.device)
    lse = torch.empty(batch, hq, sq, dtype=torch.float32, device=q.device)
    qf = dequantize(q, scales.q_descale)
    ends = cache.cache_seqlens.tolist()
    starts = cache.cache_leftpad.tolist() if cache.cache_leftpad is not None else [0] * batch
    for b, (start, end) in enumerate(zip(starts, ends)):
        kb = dequantize(ops.gather_cache_rows(k_cache, cache, b, end, start), scales.k_descale[b])[None]
        vb = dequantize(ops.gather_cache_rows(v_cache, cache, b, end, start), scales.v_descale[b])[None]
        pb = core.make_problem(params, qf[b : b + 1], kb, batch_offset=b)
        ob, lb = core.forward([qf[b : b + 1]], [kb], vb, ops._slopes_row(alibi, b), pb, torch.float32)
        out[b], lse[b] = ob[0], lb[0]
    return out, lse
