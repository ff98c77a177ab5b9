"""FP8 (float8_e4m3fn) forward kernel: both products on fp8 tensor cores, FlashAttention-3's numerics.

One program per (query block, batch, head), online softmax over key blocks, as in :mod:`.fwd_kernel`, with:

* descales folded in: ``q_descale * k_descale`` (per batch row and KV head) multiplies the softmax scale, and
  ``v_descale`` multiplies the output once at the end, so the key loop never touches a dequantized value;
* P quantized to float8_e4m3fn for the PV product. Before quantizing, P is ``exp2(s - rowmax + 8)``, in (0, 256]:
  the 2^8 offset (FA3's) keeps small probabilities out of e4m3's subnormals (step 2^-9), so each one keeps 4
  significant bits (relative rounding error <= 2^-4); the row sum uses the unrounded P and the offset cancels in
  ``acc / l``. This rounding is the kernel's main error against an exact computation (docs/fp8.md);
* V as the K-major operand Hopper's fp8 wgmma needs for its B side: with ``V_T`` the host passes V^T (a
  ``(Dv, Sk)``-strided copy) and the kernel loads ``(Dv, BLOCK_N)`` tiles, contiguous along the keys, and feeds
  ``tl.trans`` of them to the dot; without it the kernel loads ``(BLOCK_N, Dv)`` tiles of V as stored and the
  compiler transposes them through shared memory.

The interpreter runs the same code with ``UPCAST``: float32 products (exact for fp8 operands) and P rounded to
e4m3 in float32 arithmetic (:func:`round_to_e4m3`; the interpreter's own float32 -> fp8 cast mis-rounds values
whose mantissa rounds up into the next binade, and it decodes e4m3's NaN as 480), so CPU tests see the GPU's
quantization of P.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernel_utils import LN2, LOG2E, dropout_keep, load_tile, q_block_kv_range, sequence_bounds, store_tile, tanh

# P = exp2(s - rowmax + P_SHIFT) lies in (0, 2^P_SHIFT]; 2^8 = 256 stays below e4m3's largest value (448).
P_SHIFT = tl.constexpr(8.0)


@triton.jit
def round_to_e4m3(x):
    """``x`` (float32, |x| <= 448) rounded to the nearest float8_e4m3fn value, ties to even, as float32."""
    bits = x.to(tl.uint32, bitcast=True)
    # Normal e4m3 values keep 3 of float32's 23 mantissa bits: round the dropped 20 bits to nearest even.
    lsb = (bits >> 20) & 1
    normal = ((bits + 0x7FFFF + lsb) & 0xFFF00000).to(tl.float32, bitcast=True)
    # Below 2^-6 e4m3 is subnormal, with a fixed step of 2^-9: round x * 2^9 to an integer (1.5 * 2^23 trick).
    sub = ((x * 512.0 + 12582912.0) - 12582912.0) * (1.0 / 512.0)
    return tl.where(tl.abs(x) < 0.015625, sub, normal)


@triton.jit
def _operand(x, UPCAST: tl.constexpr):
    if UPCAST:
        x = x.to(tl.float32)
        # The interpreter decodes e4m3fn's NaN (S.1111.111) as +-480, a value e4m3fn cannot hold (its largest is
        # 448): give NaN back, so NaN inputs propagate as they do on the GPU.
        x = tl.where(tl.abs(x) == 480.0, float("nan"), x)
    return x


@triton.jit
def _quantize_p(p, UPCAST: tl.constexpr):
    if UPCAST:
        q = round_to_e4m3(p)
    else:
        q = p.to(tl.float8e4nv, fp_downcast_rounding="rtne")
    return q


# fmt: off
# Kernel signatures and calls carry dozens of arguments; one per line would triple this file.
@triton.jit
def _fp8_step(
    acc, l_i, m_i, q, start_n, K_src, V_src, skn, skd, svn, svd,
    rows, offs_n, offs_d, offs_dv, sq, sk,
    qk_scale, cap_in, cap_out, window_left, window_right, slope, dropout_p, seed, bh,
    MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    DROPOUT: tl.constexpr, V_T: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    IDX64: tl.constexpr, USE_TMA: tl.constexpr,
):
    """One key block. Scores are in log2 units; m_i is the running row max of the scaled scores."""
    # Every loop starts at a multiple of BLOCK_N (q_block_kv_range): V^T tiles, contiguous along the keys, can
    # then be copied 16 bytes at a time (and so pipelined).
    start_n = tl.multiple_of(start_n, BLOCK_N)
    cols = start_n + offs_n
    cols_i = cols
    if IDX64:
        cols_i = cols.to(tl.int64)
    if USE_TMA:
        k = K_src.load([start_n, 0])
    else:
        k = load_tile(K_src + cols_i[:, None] * skn + offs_d[None, :] * skd, cols, sk, offs_d, HEAD_DIM, BLOCK_D,
                      MASKED)
    qk = tl.dot(q, tl.trans(_operand(k, UPCAST)), input_precision=DOT_PREC)
    if SOFTCAP:
        s = tanh(qk * cap_in) * cap_out
    else:
        # The scale is scaled before the row max: q_descale * k_descale may be negative.
        s = qk * qk_scale
    if ALIBI or MASKED:
        dist = rows[:, None] + (sk - sq) - cols[None, :]
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
    # A row that has seen only masked keys keeps m = -inf; shift by 0 instead so exp2 gives 0, not NaN.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - (m_use - P_SHIFT)[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        keep = dropout_keep(seed, rows[:, None] + tl.zeros_like(cols)[None, :],
                            cols[None, :] + tl.zeros_like(rows)[:, None], bh, dropout_p)
        p = tl.where(keep, p, 0.0)
    if V_T:
        # V^T tiles (Dv x keys), contiguous along the keys: their transpose is the K-major B operand.
        if USE_TMA:
            vt = V_src.load([0, start_n])
        else:
            ptrs = V_src + offs_dv[:, None] * svd + cols_i[None, :] * svn
            if MASKED:
                vt = tl.load(ptrs, mask=(offs_dv[:, None] < HEAD_DIM_V) & (cols[None, :] < sk), other=0.0)
            elif HEAD_DIM_V < BLOCK_DV:
                vt = tl.load(ptrs, mask=offs_dv[:, None] < HEAD_DIM_V, other=0.0)
            else:
                vt = tl.load(ptrs)
        v = tl.trans(vt)
    else:
        if USE_TMA:
            v = V_src.load([start_n, 0])
        else:
            v = load_tile(V_src + cols_i[:, None] * svn + offs_dv[None, :] * svd, cols, sk, offs_dv, HEAD_DIM_V,
                          BLOCK_DV, MASKED)
    acc = acc * alpha[:, None]
    acc = tl.dot(_quantize_p(p, UPCAST), _operand(v, UPCAST), acc, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _fp8_key_blocks(
    acc, l_i, m_i, q, K_src, V_src, skn, skd, svn, svd,
    lo, hi, rows, offs_n, offs_d, offs_dv, sq, sk,
    qk_scale, cap_in, cap_out, window_left, window_right, slope, dropout_p, seed, bh,
    MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
    DROPOUT: tl.constexpr, V_T: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    IDX64: tl.constexpr, USE_TMA: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        acc, l_i, m_i = _fp8_step(
            acc, l_i, m_i, q, start_n, K_src, V_src, skn, skd, svn, svd,
            rows, offs_n, offs_d, offs_dv, sq, sk,
            qk_scale, cap_in, cap_out, window_left, window_right, slope, dropout_p, seed, bh,
            MASKED, BLOCK_N, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV,
            HAS_WL, HAS_WR, SOFTCAP, ALIBI, DROPOUT, V_T, UPCAST, DOT_PREC, IDX64, USE_TMA,
        )
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["batch"])
def attn_fwd_fp8(
    Q, K, V, Out, Lse, Slopes, CuQ, CuK, QDescale, KDescale, VDescale,
    sqb, sqm, sqh, sqd,
    skb, skn, skh, skd,
    svb, svn, svh, svd,
    sob, som, soh, sod,
    slb, slh, slm,
    ssb,
    num_heads_q, group, seqlen_q, seqlen_k,
    sm_scale, softcap, window_left, window_right, dropout_p, seed,
    batch,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    VARLEN: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, DROPOUT: tl.constexpr, V_T: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, IDX64: tl.constexpr, USE_TMA: tl.constexpr,
):
    """V's strides ``svn``/``svd`` are those of key row and channel, whatever the layout (V^T with ``V_T``).
    Descales are contiguous float32 ``(batch, num_heads_k)``. Query block fastest (programs running together
    share a head's K/V in L2), each head's heaviest (causal: last) query block first."""
    num_m = tl.cdiv(seqlen_q, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = num_m - 1 - pid % num_m
    bh = pid // num_m
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
        q = _operand(q, UPCAST)

        scale_at = b * (num_heads_q // group) + hk
        qk_descale = tl.load(QDescale + scale_at) * tl.load(KDescale + scale_at)
        v_descale = tl.load(VDescale + scale_at)
        slope = 0.0
        if ALIBI:
            slope = tl.load(Slopes + b * ssb + h) * LOG2E
        qk_scale = sm_scale * qk_descale * LOG2E
        cap_in = 0.0
        cap_out = 0.0
        if SOFTCAP:
            cap_in = sm_scale * qk_descale / softcap
            cap_out = softcap * LOG2E

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

        if USE_TMA:
            # Per-program descriptors bounded by this sequence: the copy engine zero-fills past its end and past
            # the head dims. V_T descriptors walk V^T (channels x keys).
            K_src = tl.make_tensor_descriptor(K + k_base, shape=[sk, HEAD_DIM], strides=[skn, 1],
                                              block_shape=[BLOCK_N, BLOCK_D])
            if V_T:
                V_src = tl.make_tensor_descriptor(V + v_base, shape=[HEAD_DIM_V, sk], strides=[svd, 1],
                                                  block_shape=[BLOCK_DV, BLOCK_N])
            else:
                V_src = tl.make_tensor_descriptor(V + v_base, shape=[sk, HEAD_DIM_V], strides=[svn, 1],
                                                  block_shape=[BLOCK_N, BLOCK_DV])
        else:
            K_src = K + k_base
            V_src = V + v_base

        lo, full_lo, full_hi, hi = q_block_kv_range(m0, sq, sk, window_left, window_right,
                                                    BLOCK_M, BLOCK_N, HAS_WL, HAS_WR)
        acc, l_i, m_i = _fp8_key_blocks(
            acc, l_i, m_i, q, K_src, V_src, skn, skd, svn, svd,
            full_lo, full_hi, rows, offs_n, offs_d, offs_dv, sq, sk,
            qk_scale, cap_in, cap_out, window_left, window_right, slope, dropout_p, seed, bh,
            False, BLOCK_N, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV,
            HAS_WL, HAS_WR, SOFTCAP, ALIBI, DROPOUT, V_T, UPCAST, DOT_PREC, IDX64, USE_TMA,
        )
        acc, l_i, m_i = _fp8_key_blocks(
            acc, l_i, m_i, q, K_src, V_src, skn, skd, svn, svd,
            lo, full_lo, rows, offs_n, offs_d, offs_dv, sq, sk,
            qk_scale, cap_in, cap_out, window_left, window_right, slope, dropout_p, seed, bh,
            True, BLOCK_N, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV,
            HAS_WL, HAS_WR, SOFTCAP, ALIBI, DROPOUT, V_T, UPCAST, DOT_PREC, IDX64, USE_TMA,
        )
        acc, l_i, m_i = _fp8_key_blocks(
            acc, l_i, m_i, q, K_src, V_src, skn, skd, svn, svd,
            full_hi, hi, rows, offs_n, offs_d, offs_dv, sq, sk,
            qk_scale, cap_in, cap_out, window_left, window_right, slope, dropout_p, seed, bh,
            True, BLOCK_N, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV,
            HAS_WL, HAS_WR, SOFTCAP, ALIBI, DROPOUT, V_T, UPCAST, DOT_PREC, IDX64, USE_TMA,
        )

        empty = l_i == 0.0  # no visible key: out = 0, lse = -inf
        inv_l = tl.where(empty, 0.0, v_descale / tl.where(empty, 1.0, l_i))
        if DROPOUT:
            inv_l = inv_l / (1.0 - dropout_p)
        out = acc * inv_l[:, None]
        # l carries the 2^P_SHIFT of P; m is the row max in log2 units.
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i)) - P_SHIFT) * LN2)

        o_base = b64 * sob + h.to(tl.int64) * soh + q_start * som
        store_tile(Out + o_base + rows_i[:, None] * som + offs_dv[None, :] * sod, out.to(Out.dtype.element_ty),
                   rows, sq, offs_dv, HEAD_DIM_V, BLOCK_DV)
        l_base = b64 * slb + h.to(tl.int64) * slh + q_start * slm
        tl.store(Lse + l_base + rows_i * slm, lse, mask=rows < sq)
