"""FlashAttention-2 backward: delta = rowsum(dO * O), then dK/dV and dQ in two kernels.

dK/dV programs own one key block of one KV head and loop over the query blocks of every query head of its GQA
group; dQ programs own one query block and loop over key blocks. Nothing is accumulated across programs, so
there are no atomics and the result is bitwise reproducible (``deterministic`` costs nothing). Probabilities
are recomputed from the saved log-sum-exp; the dropout mask is regenerated from its Philox counter.

With dropout, O = (P * Z / (1 - p)) V for keep mask Z, and rowsum(P * dP) is still rowsum(dO * O), so delta
needs no change; dP is masked and rescaled like P. With softcap, s = c * tanh(x / c) and ds/dx = 1 - tanh^2.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernel_utils import (
    LOG2E,
    dot_operand,
    dropout_keep,
    kv_block_q_range,
    load_tile,
    q_block_kv_range,
    sequence_bounds,
    store_tile,
    tanh,
)


# fmt: off
# Kernel signatures and calls carry dozens of arguments; one per line would triple these files.
@triton.jit
def attn_bwd_preprocess(
    Out, DO, Delta, CuQ,
    sob, som, soh, sod,
    sdb, sdm, sdh, sdd,
    slb, slh, slm,
    num_heads_q, seqlen_q,
    BLOCK_M: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, VARLEN: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(seqlen_q, BLOCK_M)
    pid_m = pid % num_m
    bh = pid // num_m
    b = bh // num_heads_q
    h = bh % num_heads_q
    if VARLEN:
        q_start = tl.load(CuQ + b)
        sq = tl.load(CuQ + b + 1) - q_start
        q_start = q_start.to(tl.int64)
    else:
        q_start = 0
        sq = seqlen_q
    m0 = pid_m * BLOCK_M
    if m0 >= sq:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)
    rows_i = rows.to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV)
    o = load_tile(Out + b64 * sob + h64 * soh + q_start * som + rows_i[:, None] * som + offs_dv[None, :] * sod,
                  rows, sq, offs_dv, HEAD_DIM_V, BLOCK_DV, True)
    do = load_tile(DO + b64 * sdb + h64 * sdh + q_start * sdm + rows_i[:, None] * sdm + offs_dv[None, :] * sdd,
                   rows, sq, offs_dv, HEAD_DIM_V, BLOCK_DV, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + b64 * slb + h64 * slh + q_start * slm + rows_i * slm, delta, mask=rows < sq)


@triton.jit
def _scores(qk, cap_in, cap_out, qk_scale, SOFTCAP: tl.constexpr):
    """Log2-unit scores and, with softcap, the tanh value the gradient needs."""
    if SOFTCAP:
        t = tanh(qk * cap_in)
        s = t * cap_out
    else:
        t = qk
        s = qk * qk_scale
    return s, t


@triton.jit
def _dkdv_query_blocks(
    dk, dv, dk2, k, v, k2,
    Q_src, Q2_base, DO_src, Lse_base, Delta_base,
    sqm, sqd, sq2m, sq2d, sdom, sdod, slm,
    lo, hi, cols, offs_m, offs_d, offs_dv, sq, sk,
    qk_scale, cap_in, cap_out, window_left, window_right, slope, dropout_p, seed, bh, dist_threshold,
    MASKED: tl.constexpr, BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    DROPOUT: tl.constexpr, PIECEWISE: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    IDX64: tl.constexpr, USE_TMA: tl.constexpr,
):
    # Works on transposed tiles (keys x queries) so dK and dV accumulate without transposing the big operands.
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        rows_i = rows
        if IDX64:
            rows_i = rows.to(tl.int64)
        if USE_TMA:
            q = Q_src.load([start_m, 0])
        else:
            q = load_tile(Q_src + rows_i[:, None] * sqm + offs_d[None, :] * sqd, rows, sq, offs_d, HEAD_DIM, BLOCK_D,
                          MASKED)
        q = dot_operand(q, UPCAST)
        if MASKED:
            lse = tl.load(Lse_base + rows_i * slm, mask=rows < sq, other=float("inf"))
        else:
            lse = tl.load(Lse_base + rows_i * slm)
        # Rows with no visible key have lse = -inf; +inf makes every probability of the row exactly 0.
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)
        sT, tT = _scores(qkT, cap_in, cap_out, qk_scale, SOFTCAP)
        if PIECEWISE or ALIBI or MASKED:
            dist = rows[None, :] + (sk - sq) - cols[:, None]
        if PIECEWISE:
            q2 = load_tile(Q2_base + rows_i[:, None] * sq2m + offs_d[None, :] * sq2d, rows, sq, offs_d,
                           HEAD_DIM, BLOCK_D, MASKED)
            q2 = dot_operand(q2, UPCAST)
            sT2, tT2 = _scores(tl.dot(k2, tl.trans(q2), input_precision=DOT_PREC), cap_in, cap_out, qk_scale,
                               SOFTCAP)
            near = dist < dist_threshold
            sT = tl.where(near, sT, sT2)
            tT = tl.where(near, tT, tT2)
        if ALIBI:
            sT = sT - slope * tl.abs(dist).to(tl.float32)
        pT = tl.exp2(sT - lse[None, :])
        if MASKED:
            visible = cols[:, None] < sk
            if HAS_WL:
                visible = visible & (dist <= window_left)
            if HAS_WR:
                visible = visible & (dist >= -window_right)
            pT = tl.where(visible, pT, 0.0)
        if USE_TMA:
            do = DO_src.load([start_m, 0])
        else:
            do = load_tile(DO_src + rows_i[:, None] * sdom + offs_dv[None, :] * sdod, rows, sq, offs_dv,
                           HEAD_DIM_V, BLOCK_DV, MASKED)
        do = dot_operand(do, UPCAST)
        if DROPOUT:
            keepT = dropout_keep(seed, rows[None, :] + tl.zeros_like(cols)[:, None],
                                 cols[:, None] + tl.zeros_like(rows)[None, :], bh, dropout_p)
            inv_keep = 1.0 / (1.0 - dropout_p)
            pdT = tl.where(keepT, pT * inv_keep, 0.0)
        else:
            pdT = pT
        dv = tl.dot(pdT.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        if DROPOUT:
            dpT = tl.where(keepT, dpT * inv_keep, 0.0)
        if MASKED:
            delta = tl.load(Delta_base + rows_i * slm, mask=rows < sq, other=0.0)
        else:
            delta = tl.load(Delta_base + rows_i * slm)
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)
        if PIECEWISE:
            dk = tl.dot(tl.where(near, dsT, 0.0).to(q.dtype), q, dk, input_precision=DOT_PREC)
            dk2 = tl.dot(tl.where(near, 0.0, dsT).to(q2.dtype), q2, dk2, input_precision=DOT_PREC)
        else:
            dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv, dk2


@triton.jit
def attn_bwd_dkdv(
    Q, K, V, Q2, K2, DO, Lse, Delta, DK, DV, DK2, Slopes, CuQ, CuK,
    sqb, sqm, sqh, sqd,
    skb, skn, skh, skd,
    svb, svn, svh, svd,
    sq2b, sq2m, sq2h, sq2d,
    sk2b, sk2n, sk2h, sk2d,
    sdob, sdom, sdoh, sdod,
    sdkb, sdkn, sdkh, sdkd,
    sdvb, sdvn, sdvh, sdvd,
    sdk2b, sdk2n, sdk2h, sdk2d,
    slb, slh, slm,
    ssb,
    num_heads_q, group, seqlen_q, seqlen_k,
    sm_scale, softcap, window_left, window_right, dropout_p, seed, dist_threshold,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    VARLEN: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, DROPOUT: tl.constexpr, PIECEWISE: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, IDX64: tl.constexpr, USE_TMA: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(seqlen_k, BLOCK_N)
    pid_n = pid % num_n
    bhk = pid // num_n
    num_heads_k = num_heads_q // group
    b = bhk // num_heads_k
    hk = bhk % num_heads_k
    q_start, sq, k_start, sk = sequence_bounds(CuQ, CuK, b, seqlen_q, seqlen_k, VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= sk:
        return

    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    cols = n0 + tl.arange(0, BLOCK_N)
    cols_i = cols
    if IDX64:
        cols_i = cols.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    k = load_tile(K + b64 * skb + hk64 * skh + k_start * skn + cols_i[:, None] * skn + offs_d[None, :] * skd,
                  cols, sk, offs_d, HEAD_DIM, BLOCK_D, True)
    k = dot_operand(k, UPCAST)
    v = load_tile(V + b64 * svb + hk64 * svh + k_start * svn + cols_i[:, None] * svn + offs_dv[None, :] * svd,
                  cols, sk, offs_dv, HEAD_DIM_V, BLOCK_DV, True)
    v = dot_operand(v, UPCAST)
    k2 = k
    if PIECEWISE:
        k2 = load_tile(K2 + b64 * sk2b + hk64 * sk2h + k_start * sk2n + cols_i[:, None] * sk2n
                       + offs_d[None, :] * sk2d, cols, sk, offs_d, HEAD_DIM, BLOCK_D, True)
        k2 = dot_operand(k2, UPCAST)

    qk_scale = sm_scale * LOG2E
    cap_in = 0.0
    cap_out = 0.0
    if SOFTCAP:
        cap_in = sm_scale / softcap
        cap_out = softcap * LOG2E

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = kv_block_q_range(n0, sq, sk, window_left, window_right,
                                                BLOCK_M, BLOCK_N, HAS_WL, HAS_WR)
    # One stage: this loop is never pipelined on purpose. When the query-block loops inside fold away (seqlen_q
    # == 1 is a compile-time constant), it becomes the innermost loop, and triton 3.6's pipeliner aborts on the
    # descriptor creation in its body ("doesn't know how to predicate this op").
    for g in tl.range(0, group, num_stages=1):
        h = hk * group + g
        h64 = h.to(tl.int64)
        bh = b * num_heads_q + h
        slope = 0.0
        if ALIBI:
            slope = tl.load(Slopes + b * ssb + h) * LOG2E
        Q_src = Q + b64 * sqb + h64 * sqh + q_start * sqm
        Q2_base = Q2 + b64 * sq2b + h64 * sq2h + q_start * sq2m
        DO_src = DO + b64 * sdob + h64 * sdoh + q_start * sdom
        if USE_TMA:
            # Bounded by this sequence, so rows past its end load as zeros (see the forward kernel).
            Q_src = tl.make_tensor_descriptor(Q_src, shape=[sq, HEAD_DIM], strides=[sqm, 1],
                                              block_shape=[BLOCK_M, BLOCK_D])
            DO_src = tl.make_tensor_descriptor(DO_src, shape=[sq, HEAD_DIM_V], strides=[sdom, 1],
                                               block_shape=[BLOCK_M, BLOCK_DV])
        l_off = b64 * slb + h64 * slh + q_start * slm
        dk, dv, dk2 = _dkdv_query_blocks(
            dk, dv, dk2, k, v, k2, Q_src, Q2_base, DO_src, Lse + l_off, Delta + l_off,
            sqm, sqd, sq2m, sq2d, sdom, sdod, slm,
            full_lo, full_hi, cols, offs_m, offs_d, offs_dv, sq, sk,
            qk_scale, cap_in, cap_out, window_left, window_right, slope, dropout_p, seed, bh, dist_threshold,
            False, BLOCK_M, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV,
            HAS_WL, HAS_WR, SOFTCAP, ALIBI, DROPOUT, PIECEWISE, UPCAST, DOT_PREC, IDX64, USE_TMA,
        )
        # [lo, full_lo) holds the query blocks that a right window (causal included) cuts; without one it is
        # empty. Skipping it at compile time also keeps triton 3.6's ptxas (CUDA 12.8) from
        # crashing (SIGSEGV) on the TMA tiles of a left-only window (fuzz seed 1494357207, NOTES-triton.md).
        if HAS_WR:
            dk, dv, dk2 = _dkdv_query_blocks(
                dk, dv, dk2, k, v, k2, Q_src, Q2_base, DO_src, Lse + l_off, Delta + l_off,
                sqm, sqd, sq2m, sq2d, sdom, sdod, slm,
                lo, full_lo, cols, offs_m, offs_d, offs_dv, sq, sk,
                qk_scale, cap_in, cap_out, window_left, window_right, slope, dropout_p, seed, bh, dist_threshold,
                True, BLOCK_M, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV,
                HAS_WL, HAS_WR, SOFTCAP, ALIBI, DROPOUT, PIECEWISE, UPCAST, DOT_PREC, IDX64, USE_TMA,
            )
        dk, dv, dk2 = _dkdv_query_blocks(
            dk, dv, dk2, k, v, k2, Q_src, Q2_base, DO_src, Lse + l_off, Delta + l_off,
            sqm, sqd, sq2m, sq2d, sdom, sdod, slm,
            full_hi, hi, cols, offs_m, offs_d, offs_dv, sq, sk,
            qk_scale, cap_in, cap_out, window_left, window_right, slope, dropout_p, seed, bh, dist_threshold,
            True, BLOCK_M, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV,
            HAS_WL, HAS_WR, SOFTCAP, ALIBI, DROPOUT, PIECEWISE, UPCAST, DOT_PREC, IDX64, USE_TMA,
        )

    store_tile(DK + b64 * sdkb + hk64 * sdkh + k_start * sdkn + cols_i[:, None] * sdkn + offs_d[None, :] * sdkd,
               (dk * sm_scale).to(DK.dtype.element_ty), cols, sk, offs_d, HEAD_DIM, BLOCK_D)
    store_tile(DV + b64 * sdvb + hk64 * sdvh + k_start * sdvn + cols_i[:, None] * sdvn + offs_dv[None, :] * sdvd,
               dv.to(DV.dtype.element_ty), cols, sk, offs_dv, HEAD_DIM_V, BLOCK_DV)
    if PIECEWISE:
        store_tile(DK2 + b64 * sdk2b + hk64 * sdk2h + k_start * sdk2n + cols_i[:, None] * sdk2n
                   + offs_d[None, :] * sdk2d, (dk2 * sm_scale).to(DK2.dtype.element_ty), cols, sk, offs_d,
                   HEAD_DIM, BLOCK_D)


@triton.jit
def _dq_key_blocks(
    dq, dq2, q, q2, do, lse, delta,
    K_src, V_src, K2_base, skn, skd, svn, svd, sk2n, sk2d,
    lo, hi, rows, offs_n, offs_d, offs_dv, sq, sk,
    qk_scale, cap_in, cap_out, window_left, window_right, slope, dropout_p, seed, bh, dist_threshold,
    MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    DROPOUT: tl.constexpr, PIECEWISE: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    IDX64: tl.constexpr, USE_TMA: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        cols_i = cols
        if IDX64:
            cols_i = cols.to(tl.int64)
        if USE_TMA:
            k = K_src.load([start_n, 0])
        else:
            k = load_tile(K_src + cols_i[:, None] * skn + offs_d[None, :] * skd, cols, sk, offs_d, HEAD_DIM, BLOCK_D,
                          MASKED)
        k = dot_operand(k, UPCAST)
        s, t = _scores(tl.dot(q, tl.trans(k), input_precision=DOT_PREC), cap_in, cap_out, qk_scale, SOFTCAP)
        if PIECEWISE or ALIBI or MASKED:
            dist = rows[:, None] + (sk - sq) - cols[None, :]
        if PIECEWISE:
            k2 = load_tile(K2_base + cols_i[:, None] * sk2n + offs_d[None, :] * sk2d, cols, sk, offs_d, HEAD_DIM,
                           BLOCK_D, MASKED)
            k2 = dot_operand(k2, UPCAST)
            s2, t2 = _scores(tl.dot(q2, tl.trans(k2), input_precision=DOT_PREC), cap_in, cap_out, qk_scale,
                             SOFTCAP)
            near = dist < dist_threshold
            s = tl.where(near, s, s2)
            t = tl.where(near, t, t2)
        if ALIBI:
            s = s - slope * tl.abs(dist).to(tl.float32)
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            visible = cols[None, :] < sk
            if HAS_WL:
                visible = visible & (dist <= window_left)
            if HAS_WR:
                visible = visible & (dist >= -window_right)
            p = tl.where(visible, p, 0.0)
        if USE_TMA:
            v = V_src.load([start_n, 0])
        else:
            v = load_tile(V_src + cols_i[:, None] * svn + offs_dv[None, :] * svd, cols, sk, offs_dv, HEAD_DIM_V,
                          BLOCK_DV, MASKED)
        v = dot_operand(v, UPCAST)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        if DROPOUT:
            keep = dropout_keep(seed, rows[:, None] + tl.zeros_like(cols)[None, :],
                                cols[None, :] + tl.zeros_like(rows)[:, None], bh, dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        if PIECEWISE:
            dq = tl.dot(tl.where(near, ds, 0.0).to(k.dtype), k, dq, input_precision=DOT_PREC)
            dq2 = tl.dot(tl.where(near, 0.0, ds).to(k2.dtype), k2, dq2, input_precision=DOT_PREC)
        else:
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq, dq2


@triton.jit
def attn_bwd_dq(
    Q, K, V, Q2, K2, DO, Lse, Delta, DQ, DQ2, Slopes, CuQ, CuK,
    sqb, sqm, sqh, sqd,
    skb, skn, skh, skd,
    svb, svn, svh, svd,
    sq2b, sq2m, sq2h, sq2d,
    sk2b, sk2n, sk2h, sk2d,
    sdob, sdom, sdoh, sdod,
    sdqb, sdqm, sdqh, sdqd,
    sdq2b, sdq2m, sdq2h, sdq2d,
    slb, slh, slm,
    ssb,
    num_heads_q, group, seqlen_q, seqlen_k,
    sm_scale, softcap, window_left, window_right, dropout_p, seed, dist_threshold,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    VARLEN: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, DROPOUT: tl.constexpr, PIECEWISE: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, IDX64: tl.constexpr, USE_TMA: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(seqlen_q, BLOCK_M)
    pid_m = num_m - 1 - pid % num_m
    bh = pid // num_m
    b = bh // num_heads_q
    h = bh % num_heads_q
    hk = h // group
    q_start, sq, k_start, sk = sequence_bounds(CuQ, CuK, b, seqlen_q, seqlen_k, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= sq:
        return

    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)
    rows_i = rows
    if IDX64:
        rows_i = rows.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q = load_tile(Q + b64 * sqb + h64 * sqh + q_start * sqm + rows_i[:, None] * sqm + offs_d[None, :] * sqd,
                  rows, sq, offs_d, HEAD_DIM, BLOCK_D, True)
    q = dot_operand(q, UPCAST)
    do = load_tile(DO + b64 * sdob + h64 * sdoh + q_start * sdom + rows_i[:, None] * sdom + offs_dv[None, :] * sdod,
                   rows, sq, offs_dv, HEAD_DIM_V, BLOCK_DV, True)
    do = dot_operand(do, UPCAST)
    l_off = b64 * slb + h64 * slh + q_start * slm
    lse = tl.load(Lse + l_off + rows_i * slm, mask=rows < sq, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
    delta = tl.load(Delta + l_off + rows_i * slm, mask=rows < sq, other=0.0)
    q2 = q
    K2_base = K
    if PIECEWISE:
        q2 = load_tile(Q2 + b64 * sq2b + h64 * sq2h + q_start * sq2m + rows_i[:, None] * sq2m
                       + offs_d[None, :] * sq2d, rows, sq, offs_d, HEAD_DIM, BLOCK_D, True)
        q2 = dot_operand(q2, UPCAST)
        K2_base = K2 + b64 * sk2b + hk64 * sk2h + k_start * sk2n

    slope = 0.0
    if ALIBI:
        slope = tl.load(Slopes + b * ssb + h) * LOG2E
    qk_scale = sm_scale * LOG2E
    cap_in = 0.0
    cap_out = 0.0
    if SOFTCAP:
        cap_in = sm_scale / softcap
        cap_out = softcap * LOG2E

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq2 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    K_src = K + b64 * skb + hk64 * skh + k_start * skn
    V_src = V + b64 * svb + hk64 * svh + k_start * svn
    if USE_TMA:
        K_src = tl.make_tensor_descriptor(K_src, shape=[sk, HEAD_DIM], strides=[skn, 1],
                                          block_shape=[BLOCK_N, BLOCK_D])
        V_src = tl.make_tensor_descriptor(V_src, shape=[sk, HEAD_DIM_V], strides=[svn, 1],
                                          block_shape=[BLOCK_N, BLOCK_DV])
    lo, full_lo, full_hi, hi = q_block_kv_range(m0, sq, sk, window_left, window_right,
                                                BLOCK_M, BLOCK_N, HAS_WL, HAS_WR)
    dq, dq2 = _dq_key_blocks(
        dq, dq2, q, q2, do, lse, delta, K_src, V_src, K2_base, skn, skd, svn, svd, sk2n, sk2d,
        full_lo, full_hi, rows, offs_n, offs_d, offs_dv, sq, sk,
        qk_scale, cap_in, cap_out, window_left, window_right, slope, dropout_p, seed, bh, dist_threshold,
        False, BLOCK_N, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV,
        HAS_WL, HAS_WR, SOFTCAP, ALIBI, DROPOUT, PIECEWISE, UPCAST, DOT_PREC, IDX64, USE_TMA,
    )
    dq, dq2 = _dq_key_blocks(
        dq, dq2, q, q2, do, lse, delta, K_src, V_src, K2_base, skn, skd, svn, svd, sk2n, sk2d,
        lo, full_lo, rows, offs_n, offs_d, offs_dv, sq, sk,
        qk_scale, cap_in, cap_out, window_left, window_right, slope, dropout_p, seed, bh, dist_threshold,
        True, BLOCK_N, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV,
        HAS_WL, HAS_WR, SOFTCAP, ALIBI, DROPOUT, PIECEWISE, UPCAST, DOT_PREC, IDX64, USE_TMA,
    )
    dq, dq2 = _dq_key_blocks(
        dq, dq2, q, q2, do, lse, delta, K_src, V_src, K2_base, skn, skd, svn, svd, sk2n, sk2d,
        full_hi, hi, rows, offs_n, offs_d, offs_dv, sq, sk,
        qk_scale, cap_in, cap_out, window_left, window_right, slope, dropout_p, seed, bh, dist_threshold,
        True, BLOCK_N, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV,
        HAS_WL, HAS_WR, SOFTCAP, ALIBI, DROPOUT, PIECEWISE, UPCAST, DOT_PREC, IDX64, USE_TMA,
    )
    store_tile(DQ + b64 * sdqb + h64 * sdqh + q_start * sdqm + rows_i[:, None] * sdqm + offs_d[None, :] * sdqd,
               (dq * sm_scale).to(DQ.dtype.element_ty), rows, sq, offs_d, HEAD_DIM, BLOCK_D)
    if PIECEWISE:
        store_tile(DQ2 + b64 * sdq2b + h64 * sdq2h + q_start * sdq2m + rows_i[:, None] * sdq2m
                   + offs_d[None, :] * sdq2d, (dq2 * sm_scale).to(DQ2.dtype.element_ty), rows, sq, offs_d,
                   HEAD_DIM, BLOCK_D)


# Length-1 calls take copies whose lengths stay runtime values, as the forward's do (fwd_kernel.attn_fwd_length_one):
# triton 3.6 specialises an integer equal to 1 into a constant, and that specialisation is where its pipeliner
# aborted (the seventh session) and where it miscompiled a forward tile (the eighth). The copies compile what every
# odd length compiles.
attn_bwd_dkdv_length_one = triton.jit(do_not_specialize=["seqlen_q", "seqlen_k"])(attn_bwd_dkdv.fn)
attn_bwd_dq_length_one = triton.jit(do_not_specialize=["seqlen_q", "seqlen_k"])(attn_bwd_dq.fn)
