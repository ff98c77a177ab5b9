"""FlashAttention-2 forward kernel: one program per (query block, batch, head), online softmax over key blocks.

Scores live in log2 units (log2(e) folded into the scale) so the softmax uses exp2. The key loop is split in
three (masked head, unmasked body, masked tail) so only blocks cut by the causal/window diagonal or by the end of
the sequence pay for masking; fully masked blocks are never visited.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernel_utils import (
    LN2,
    LOG2E,
    dot_operand,
    dropout_keep,
    load_tile,
    q_block_kv_range,
    sequence_bounds,
    store_tile,
    tanh,
)


# fmt: off
# Kernel signatures and calls carry dozens of arguments; one per line would triple these files.
@triton.jit
def _fwd_step(
    acc, l_i, m_i, q, q2, start_n,
    K_src, V_src, K2_base, skn, skd, svn, svd, sk2n, sk2d,
    rows, offs_n, offs_d, offs_dv, sq, sk,
    qk_scale, cap_in, cap_out, window_left, window_right, slope, dropout_p, seed, bh, dist_threshold,
    MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    DROPOUT: tl.constexpr, PIECEWISE: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    IDX64: tl.constexpr, USE_TMA: tl.constexpr,
):
    """One key block of the online softmax. K_src/V_src are TMA descriptors (USE_TMA) or base pointers."""
    cols = start_n + offs_n
    cols_i = cols
    if IDX64:
        cols_i = cols.to(tl.int64)
    if USE_TMA:
        k = K_src.load([start_n, 0])  # rows past the sequence and columns past HEAD_DIM come back as 0
    else:
        k = load_tile(K_src + cols_i[:, None] * skn + offs_d[None, :] * skd, cols, sk, offs_d, HEAD_DIM, BLOCK_D,
                      MASKED)
    qk = tl.dot(q, tl.trans(dot_operand(k, UPCAST)), input_precision=DOT_PREC)
    PLAIN: tl.constexpr = not (SOFTCAP or ALIBI or PIECEWISE or MASKED)
    if PLAIN:
        # Fast path: the row max of the raw dot, scaled once per row; scale and shift fuse into one FMA.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
    else:
        if SOFTCAP:
            s = tanh(qk * cap_in) * cap_out
        else:
            s = qk * qk_scale
        dist = rows[:, None] + (sk - sq) - cols[None, :]
        if PIECEWISE:
            k2 = load_tile(K2_base + cols_i[:, None] * sk2n + offs_d[None, :] * sk2d,
                           cols, sk, offs_d, HEAD_DIM, BLOCK_D, MASKED)
            qk2 = tl.dot(q2, tl.trans(dot_operand(k2, UPCAST)), input_precision=DOT_PREC)
            if SOFTCAP:
                s2 = tanh(qk2 * cap_in) * cap_out
            else:
                s2 = qk2 * qk_scale
            s = tl.where(dist < dist_threshold, s, s2)
        if ALIBI:
            s = s - slope * tl.abs(dist).to(tl.float32)
        if MASKED:
            visible = cols[None, :] < sk
            if HAS_WL:
                visible = visible & (dist <= window_left)
            if HAS_WR:
                visible = visible & (dist >= -window_right)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
        if MASKED:
            # A row that has seen only masked keys keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        keep = dropout_keep(seed, rows[:, None] + tl.zeros_like(cols)[None, :],
                            cols[None, :] + tl.zeros_like(rows)[:, None], bh, dropout_p)
        p = tl.where(keep, p, 0.0)
    if USE_TMA:
        v = V_src.load([start_n, 0])
    else:
        v = load_tile(V_src + cols_i[:, None] * svn + offs_dv[None, :] * svd, cols, sk, offs_dv, HEAD_DIM_V,
                      BLOCK_DV, MASKED)
    acc = acc * alpha[:, None]
    if UPCAST:
        acc = tl.dot(p, v.to(tl.float32), acc, input_precision=DOT_PREC)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _fwd_key_blocks(
    acc, l_i, m_i, q, q2,
    K_src, V_src, K2_base, skn, skd, svn, svd, sk2n, sk2d,
    lo, hi, rows, offs_n, offs_d, offs_dv, sq, sk,
    qk_scale, cap_in, cap_out, window_left, window_right, slope, dropout_p, seed, bh, dist_threshold,
    MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    DROPOUT: tl.constexpr, PIECEWISE: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    IDX64: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr,
):
    if WARP_SPEC:
        # triton partitions the loop into load and compute warps (Hopper/Blackwell); only compiled when a tile
        # asks for it, so tritons without the keyword never see it (probes.has_warp_specialize gates the tiles).
        for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=True):
            acc, l_i, m_i = _fwd_step(
                acc, l_i, m_i, q, q2, start_n, K_src, V_src, K2_base, skn, skd, svn, svd, sk2n, sk2d,
                rows, offs_n, offs_d, offs_dv, sq, sk,
                qk_scale, cap_in, cap_out, window_left, window_right, slope, dropout_p, seed, bh, dist_threshold,
                MASKED, BLOCK_N, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV,
                HAS_WL, HAS_WR, SOFTCAP, ALIBI, DROPOUT, PIECEWISE, UPCAST, DOT_PREC, IDX64, USE_TMA,
            )
    else:
        for start_n in range(lo, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_step(
                acc, l_i, m_i, q, q2, start_n, K_src, V_src, K2_base, skn, skd, svn, svd, sk2n, sk2d,
                rows, offs_n, offs_d, offs_dv, sq, sk,
                qk_scale, cap_in, cap_out, window_left, window_right, slope, dropout_p, seed, bh, dist_threshold,
                MASKED, BLOCK_N, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV,
                HAS_WL, HAS_WR, SOFTCAP, ALIBI, DROPOUT, PIECEWISE, UPCAST, DOT_PREC, IDX64, USE_TMA,
            )
    return acc, l_i, m_i


@triton.jit
def _fwd_tile(
    pid_m, bh,
    Q, K, V, Q2, K2, Out, Lse, Slopes, CuQ, CuK, Sink,
    sqb, sqm, sqh, sqd,
    skb, skn, skh, skd,
    svb, svn, svh, svd,
    sq2b, sq2m, sq2h, sq2d,
    sk2b, sk2n, sk2h, sk2d,
    sob, som, soh, sod,
    slb, slh, slm,
    ssb,
    num_heads_q, group, seqlen_q, seqlen_k,
    sm_scale, softcap, window_left, window_right, dropout_p, seed, dist_threshold,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    VARLEN: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, DROPOUT: tl.constexpr, PIECEWISE: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, IDX64: tl.constexpr,
    USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr, SINK: tl.constexpr,
):
    """Query block ``pid_m`` of (batch, head) ``bh``; blocks past a (varlen) sequence's end do nothing."""
    b = bh // num_heads_q
    h = bh % num_heads_q
    hk = h // group

    q_start, sq, k_start, sk = sequence_bounds(CuQ, CuK, b, seqlen_q, seqlen_k, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 < sq:
        b64 = b.to(tl.int64)
        q_base = b64 * sqb + h.to(tl.int64) * sqh + q_start * sqm
        k_base = b64 * skb + hk.to(tl.int64) * skh + k_start * skn
        v_base = b64 * svb + hk.to(tl.int64) * svh + k_start * svn

        rows = m0 + tl.arange(0, BLOCK_M)
        rows_i = rows
        if IDX64:
            rows_i = rows.to(tl.int64)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)

        q = load_tile(Q + q_base + rows_i[:, None] * sqm + offs_d[None, :] * sqd, rows, sq, offs_d, HEAD_DIM, BLOCK_D,
                      True)
        q = dot_operand(q, UPCAST)
        q2 = q
        K2_base = K
        if PIECEWISE:
            q2_base = b64 * sq2b + h.to(tl.int64) * sq2h + q_start * sq2m
            q2 = load_tile(Q2 + q2_base + rows_i[:, None] * sq2m + offs_d[None, :] * sq2d,
                           rows, sq, offs_d, HEAD_DIM, BLOCK_D, True)
            q2 = dot_operand(q2, UPCAST)
            K2_base = K2 + b64 * sk2b + hk.to(tl.int64) * sk2h + k_start * sk2n

        slope = 0.0
        if ALIBI:
            slope = tl.load(Slopes + b * ssb + h) * LOG2E
        qk_scale = sm_scale * LOG2E
        cap_in = 0.0
        cap_out = 0.0
        if SOFTCAP:
            cap_in = sm_scale / softcap
            cap_out = softcap * LOG2E

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

        if USE_TMA:
            # Per-program descriptors bounded by this sequence: the copy engine zero-fills past its end (no leak from
            # the next varlen sequence) and past HEAD_DIM (padded head dims need no mask).
            K_src = tl.make_tensor_descriptor(K + k_base, shape=[sk, HEAD_DIM], strides=[skn, 1],
                                              block_shape=[BLOCK_N, BLOCK_D])
            V_src = tl.make_tensor_descriptor(V + v_base, shape=[sk, HEAD_DIM_V], strides=[svn, 1],
                                              block_shape=[BLOCK_N, BLOCK_DV])
        else:
            K_src = K + k_base
            V_src = V + v_base

        lo, full_lo, full_hi, hi = q_block_kv_range(m0, sq, sk, window_left, window_right,
                                                    BLOCK_M, BLOCK_N, HAS_WL, HAS_WR)
        acc, l_i, m_i = _fwd_key_blocks(
            acc, l_i, m_i, q, q2, K_src, V_src, K2_base, skn, skd, svn, svd, sk2n, sk2d,
            full_lo, full_hi, rows, offs_n, offs_d, offs_dv, sq, sk,
            qk_scale, cap_in, cap_out, window_left, window_right, slope, dropout_p, seed, bh, dist_threshold,
            False, BLOCK_N, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV,
            HAS_WL, HAS_WR, SOFTCAP, ALIBI, DROPOUT, PIECEWISE, UPCAST, DOT_PREC, IDX64, USE_TMA, WARP_SPEC,
        )
        acc, l_i, m_i = _fwd_key_blocks(
            acc, l_i, m_i, q, q2, K_src, V_src, K2_base, skn, skd, svn, svd, sk2n, sk2d,
            lo, full_lo, rows, offs_n, offs_d, offs_dv, sq, sk,
            qk_scale, cap_in, cap_out, window_left, window_right, slope, dropout_p, seed, bh, dist_threshold,
            True, BLOCK_N, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV,
            HAS_WL, HAS_WR, SOFTCAP, ALIBI, DROPOUT, PIECEWISE, UPCAST, DOT_PREC, IDX64, USE_TMA, WARP_SPEC,
        )
        acc, l_i, m_i = _fwd_key_blocks(
            acc, l_i, m_i, q, q2, K_src, V_src, K2_base, skn, skd, svn, svd, sk2n, sk2d,
            full_hi, hi, rows, offs_n, offs_d, offs_dv, sq, sk,
            qk_scale, cap_in, cap_out, window_left, window_right, slope, dropout_p, seed, bh, dist_threshold,
            True, BLOCK_N, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV,
            HAS_WL, HAS_WR, SOFTCAP, ALIBI, DROPOUT, PIECEWISE, UPCAST, DOT_PREC, IDX64, USE_TMA, WARP_SPEC,
        )

        if SINK:
            # The head's sink logit joins the denominator only (attnkit/sink.py): bring l to the common max.
            sink = tl.load(Sink + h) * LOG2E
            m_f = tl.maximum(m_i, sink)
            m_f = tl.where(m_f == float("-inf"), 0.0, m_f)
            alpha = tl.exp2(m_i - m_f)
            l_i = l_i * alpha + tl.exp2(sink - m_f)
            acc = acc * alpha[:, None]
            m_i = m_f
        empty = l_i == 0.0  # no visible key: out = 0, lse = -inf
        inv_l = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
        if DROPOUT:
            inv_l = inv_l / (1.0 - dropout_p)
        out = acc * inv_l[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2)

        o_base = b64 * sob + h.to(tl.int64) * soh + q_start * som
        store_tile(Out + o_base + rows_i[:, None] * som + offs_dv[None, :] * sod, out.to(Out.dtype.element_ty),
                   rows, sq, offs_dv, HEAD_DIM_V, BLOCK_DV)
        l_base = b64 * slb + h.to(tl.int64) * slh + q_start * slm
        tl.store(Lse + l_base + rows_i * slm, lse, mask=rows < sq)


@triton.jit(do_not_specialize=["batch"])  # one compile for every batch size, 1 included (precompile uses 1)
def attn_fwd(
    Q, K, V, Q2, K2, Out, Lse, Slopes, CuQ, CuK,
    sqb, sqm, sqh, sqd,
    skb, skn, skh, skd,
    svb, svn, svh, svd,
    sq2b, sq2m, sq2h, sq2d,
    sk2b, sk2n, sk2h, sk2d,
    sob, som, soh, sod,
    slb, slh, slm,
    ssb,
    num_heads_q, group, seqlen_q, seqlen_k,
    sm_scale, softcap, window_left, window_right, dropout_p, seed, dist_threshold,
    batch, Sink,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    VARLEN: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, DROPOUT: tl.constexpr, PIECEWISE: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, IDX64: tl.constexpr,
    USE_TMA: tl.constexpr,
    PERSISTENT: tl.constexpr = False,
    WARP_SPEC: tl.constexpr = False,
    SINK: tl.constexpr = False,
):
    # Query block fastest: programs running together share a head's K/V in L2, and each head's heaviest
    # (causal: last) query block comes first. One program per tile, or (PERSISTENT) a grid of a few programs
    # per SM, each walking the tiles pid, pid + nprog, ... in that order: no partial last wave.
    num_m = tl.cdiv(seqlen_q, BLOCK_M)
    if PERSISTENT:
        num_tiles = num_m * batch * num_heads_q
        # One stage, like the backward's head loop: with seqlen_k == 1 the key loop folds away, and triton 3.6's
        # pipeliner aborts on the descriptors each tile creates.
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), num_stages=1):
            _fwd_tile(
                num_m - 1 - tile % num_m, tile // num_m,
                Q, K, V, Q2, K2, Out, Lse, Slopes, CuQ, CuK, Sink,
                sqb, sqm, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd,
                sq2b, sq2m, sq2h, sq2d, sk2b, sk2n, sk2h, sk2d, sob, som, soh, sod, slb, slh, slm, ssb,
                num_heads_q, group, seqlen_q, seqlen_k,
                sm_scale, softcap, window_left, window_right, dropout_p, seed, dist_threshold,
                BLOCK_M, BLOCK_N, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV,
                VARLEN, HAS_WL, HAS_WR, SOFTCAP, ALIBI, DROPOUT, PIECEWISE, UPCAST, DOT_PREC, IDX64, USE_TMA,
                WARP_SPEC, SINK,
            )
    else:
        pid = tl.program_id(0)
        _fwd_tile(
            num_m - 1 - pid % num_m, pid // num_m,
            Q, K, V, Q2, K2, Out, Lse, Slopes, CuQ, CuK, Sink,
            sqb, sqm, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd,
            sq2b, sq2m, sq2h, sq2d, sk2b, sk2n, sk2h, sk2d, sob, som, soh, sod, slb, slh, slm, ssb,
            num_heads_q, group, seqlen_q, seqlen_k,
            sm_scale, softcap, window_left, window_right, dropout_p, seed, dist_threshold,
            BLOCK_M, BLOCK_N, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV,
            VARLEN, HAS_WL, HAS_WR, SOFTCAP, ALIBI, DROPOUT, PIECEWISE, UPCAST, DOT_PREC, IDX64, USE_TMA,
            WARP_SPEC, SINK,
        )


# triton 3.6 specialises an integer argument equal to 1 into a constant, and with seqlen_k 1 it miscompiled a tile
# (H200: an out-of-range shared-memory address in the output store at head dims 48/32, fuzz seed 1749773976;
# NOTES-triton.md, "Lengths of one"). Calls with a length of 1 take this copy, whose lengths stay runtime values;
# every other call keeps attn_fwd's specialisations, so their code is unchanged.
attn_fwd_length_one = triton.jit(do_not_specialize=["batch", "seqlen_q", "seqlen_k"])(attn_fwd.fn)
