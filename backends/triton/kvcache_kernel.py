"""Split-KV decoding kernel for ``attention_with_kvcache`` (contiguous or paged caches), forward only.

Decoding reads the whole cache once per step, so it is memory-bound: one program handles one KV head and *all*
query rows of its GQA group (``rows = g * Sq + i``), so each key/value block is read once per group instead of
once per query head, and the key range is split across programs so that even batch 1 fills the GPU. Each split
writes a normalised partial output and its log-sum-exp; ``combine_splits`` merges them. With one split the
partial buffers are the outputs themselves (the store casts to their dtype) and there is nothing to combine.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernel_utils import LN2, LOG2E, dot_operand, tanh


@triton.jit
def _fp8_as_bf16(x, FP8: tl.constexpr, UPCAST: tl.constexpr):
    # fp8 (e4m3) tiles multiply in bf16, which holds every e4m3 value exactly: decoding is bound by the cache
    # reads, which fp8 halves, not by the products. (The interpreter's products are float32 anyway.)
    if FP8:
        if not UPCAST:
            x = x.to(tl.bfloat16)
    return x


@triton.jit
def _decode_block(
    acc, l_i, m_i, q, k_src, v_src, block_start, end, first_key, shift, qi, row_ok, slope, d, dv,
    cache_row, b, stride_bt_b, BLOCK_TABLE,
    stride_kb, stride_ks, stride_vb, stride_vs,
    scale_log2, softcap, window_left, window_right,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    PAGED: tl.constexpr, ONE_PAGE_PER_BLOCK: tl.constexpr, HAS_LEFTPAD: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, FP8: tl.constexpr, TMA: tl.constexpr,
    MASK_V: tl.constexpr,
):  # fmt: skip
    """One block of BLOCK_N keys of the online softmax. With TMA, k_src/v_src are descriptors: the contiguous
    cache's are bounded by the split's end (the copy engine zero-fills past it), the paged pool's are not, so
    there the block that ends the split (MASK_V) zeroes the values past its end, which may be unwritten memory."""
    cols = block_start + tl.arange(0, BLOCK_N)
    col_ok = cols < end
    if HAS_LEFTPAD:
        col_ok = col_ok & (cols >= first_key)
    if TMA:
        if PAGED:  # one page per block: the block's rows of the pool (pages x page rows)
            page = tl.load(BLOCK_TABLE + b * stride_bt_b + block_start // PAGE_SIZE)
            row = page * PAGE_SIZE + block_start % PAGE_SIZE
        else:
            row = block_start
        k = tl.trans(k_src.load([row, 0]))
    else:
        if PAGED:
            if ONE_PAGE_PER_BLOCK:  # BLOCK_N divides PAGE_SIZE: a block never straddles two pages
                page = tl.load(BLOCK_TABLE + b * stride_bt_b + block_start // PAGE_SIZE).to(tl.int64)
                k_rows = page * stride_kb + (cols % PAGE_SIZE) * stride_ks
                v_rows = page * stride_vb + (cols % PAGE_SIZE) * stride_vs
            else:  # pages smaller than a block: each key finds its own page (a gather; each key row stays contiguous)
                pages = tl.load(BLOCK_TABLE + b * stride_bt_b + cols // PAGE_SIZE, mask=col_ok, other=0).to(tl.int64)
                k_rows = pages * stride_kb + (cols % PAGE_SIZE) * stride_ks
                v_rows = pages * stride_vb + (cols % PAGE_SIZE) * stride_vs
        else:
            k_rows = cache_row * stride_kb + cols * stride_ks
            v_rows = cache_row * stride_vb + cols * stride_vs
        k_mask = col_ok[None, :] & (d[:, None] < HEAD_DIM)
        k = tl.load(k_src + k_rows[None, :] + d[:, None], mask=k_mask, other=0.0)
    k = _fp8_as_bf16(k, FP8, UPCAST)
    s = tl.dot(q, dot_operand(k, UPCAST), input_precision=DOT_PRECISION)
    if HAS_SOFTCAP:
        s = tanh(s * (scale_log2 * LN2 / softcap)) * (softcap * LOG2E)
    else:
        s = s * scale_log2
    dist = qi[:, None] + shift - cols[None, :]
    if HAS_ALIBI:
        s = s - slope[:, None] * tl.abs(dist).to(tl.float32)
    visible = col_ok[None, :] & row_ok[:, None]
    if HAS_WINDOW_LEFT:
        visible = visible & (dist <= window_left)
    if HAS_WINDOW_RIGHT:
        visible = visible & (dist >= -window_right)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if TMA:
        vt = v_src.load([row, 0])
        if MASK_V:
            vt = tl.where(col_ok[:, None], vt, 0.0)
    else:
        v_mask = col_ok[:, None] & (dv[None, :] < HEAD_DIM_V)
        vt = tl.load(v_src + v_rows[:, None] + dv[None, :], mask=v_mask, other=0.0)
    vt = _fp8_as_bf16(vt, FP8, UPCAST)
    if UPCAST:
        acc = acc * alpha[:, None] + tl.dot(p, vt.to(tl.float32), input_precision=DOT_PRECISION)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def kvcache_split_fwd(
    Q, K, V, SLOPES, SEQLENS, BATCH_IDX, BLOCK_TABLE, LEFTPAD, OUT_PART, LSE_PART, Q_DESCALE, K_DESCALE, V_DESCALE,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_slope_b, stride_bt_b,
    stride_os, stride_ob, stride_oh, stride_om,
    stride_ls, stride_lb, stride_lh,
    seqlen_q, group, num_kv_heads, keys_per_split, pool_rows,
    scale_log2, softcap, window_left, window_right,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    PAGED: tl.constexpr, ONE_PAGE_PER_BLOCK: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FP8: tl.constexpr = False, TMA: tl.constexpr = False,
):  # fmt: skip
    """``TMA``: K/V blocks stream through the copy engine (Hopper; contiguous caches, or pages that hold whole key
    blocks of a pool with rows ``pool_rows`` = pages x page size; no left padding), else through pointer loads."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    m_block = tl.program_id(2)
    b = bh // num_kv_heads
    hk = bh % num_kv_heads
    seqlen_k = tl.load(SEQLENS + b)
    if FP8:  # descales (attnkit.fp8), (batch, nheads_k): q's and k's scale the scores, v's the output
        scale_log2 = scale_log2 * tl.load(Q_DESCALE + bh) * tl.load(K_DESCALE + bh)

    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # rows of the (group x seqlen_q) block of this kv head
    g = rows // seqlen_q
    qi = rows % seqlen_q
    row_ok = rows < group * seqlen_q
    hq = hk * group + g
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)

    q_ptrs = Q + b.to(tl.int64) * stride_qb + qi[:, None] * stride_qs + hq[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    q = _fp8_as_bf16(dot_operand(q, UPCAST), FP8, UPCAST)

    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(SLOPES + b * stride_slope_b + hq, mask=row_ok, other=0.0) * LOG2E

    if HAS_BATCH_IDX:
        cache_row = tl.load(BATCH_IDX + b).to(tl.int64)
    else:
        cache_row = b.to(tl.int64)

    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, seqlen_k)
    first_key = 0
    if HAS_LEFTPAD:
        # Valid keys are [first_key, seqlen_k) of the row. Positions stay absolute: the distance below only
        # depends on the row's end, so the left padding changes no mask or ALiBi term.
        first_key = tl.load(LEFTPAD + b)
        start = tl.maximum(start, first_key // BLOCK_N * BLOCK_N)
    # Bottom-right alignment: query i sits at key position i + seqlen_k - seqlen_q.
    shift = seqlen_k - seqlen_q
    if HAS_WINDOW_RIGHT:
        end = tl.minimum(end, tl.max(tl.where(row_ok, qi, 0)) + shift + window_right + 1)
    if HAS_WINDOW_LEFT:
        start = tl.maximum(start, (tl.min(tl.where(row_ok, qi, seqlen_q)) + shift - window_left) // BLOCK_N * BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    k_src = K + hk * stride_kh
    v_src = V + hk * stride_vh
    if TMA:
        if PAGED:
            k_src = tl.make_tensor_descriptor(
                k_src, shape=[pool_rows, HEAD_DIM], strides=[stride_ks, 1], block_shape=[BLOCK_N, BLOCK_D]
            )
            v_src = tl.make_tensor_descriptor(
                v_src, shape=[pool_rows, HEAD_DIM_V], strides=[stride_vs, 1], block_shape=[BLOCK_N, BLOCK_DV]
            )
        else:  # this row's keys up to the split's end: the copy engine zero-fills the rest of the last block
            rows_seen = tl.maximum(end, 1)
            k_src = tl.make_tensor_descriptor(
                k_src + cache_row * stride_kb,
                shape=[rows_seen, HEAD_DIM],
                strides=[stride_ks, 1],
                block_shape=[BLOCK_N, BLOCK_D],
            )
            v_src = tl.make_tensor_descriptor(
                v_src + cache_row * stride_vb,
                shape=[rows_seen, HEAD_DIM_V],
                strides=[stride_vs, 1],
                block_shape=[BLOCK_N, BLOCK_DV],
            )
        # Whole blocks first; the block that ends the split masks its values (paged pools are not bounded).
        full_end = tl.maximum(start, start + (end - start) // BLOCK_N * BLOCK_N)
    else:
        full_end = end  # the pointer loads mask every block
    for block_start in range(start, full_end, BLOCK_N):
        acc, l_i, m_i = _decode_block(
            acc, l_i, m_i, q, k_src, v_src, block_start, end, first_key, shift, qi, row_ok, slope, d, dv,
            cache_row, b, stride_bt_b, BLOCK_TABLE, stride_kb, stride_ks, stride_vb, stride_vs,
            scale_log2, softcap, window_left, window_right,
            HEAD_DIM, HEAD_DIM_V, BLOCK_N, PAGE_SIZE, PAGED, ONE_PAGE_PER_BLOCK, HAS_LEFTPAD, HAS_ALIBI,
            HAS_SOFTCAP, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, UPCAST, DOT_PRECISION, FP8, TMA, False,
        )  # fmt: skip
    if TMA:
        for block_start in tl.range(full_end, end, BLOCK_N, num_stages=1):  # at most one block
            acc, l_i, m_i = _decode_block(
                acc, l_i, m_i, q, k_src, v_src, block_start, end, first_key, shift, qi, row_ok, slope, d, dv,
                cache_row, b, stride_bt_b, BLOCK_TABLE, stride_kb, stride_ks, stride_vb, stride_vs,
                scale_log2, softcap, window_left, window_right,
                HEAD_DIM, HEAD_DIM_V, BLOCK_N, PAGE_SIZE, PAGED, ONE_PAGE_PER_BLOCK, HAS_LEFTPAD, HAS_ALIBI,
                HAS_SOFTCAP, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, UPCAST, DOT_PRECISION, FP8, TMA, PAGED,
            )  # fmt: skip

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if FP8:
        out = out * tl.load(V_DESCALE + bh)
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2)
    o_ptrs = (OUT_PART + split * stride_os + b * stride_ob + hq[:, None] * stride_oh + qi[:, None] * stride_om
              + dv[None, :])  # fmt: skip
    tl.store(o_ptrs, out.to(OUT_PART.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < HEAD_DIM_V))
    tl.store(LSE_PART + split * stride_ls + b * stride_lb + hq * stride_lh + qi, lse, mask=row_ok)


@triton.jit
def combine_splits(
    OUT_PART, LSE_PART, OUT, LSE, num_splits, num_heads_q, seqlen_q,
    stride_os, stride_ob, stride_oh, stride_om,
    stride_ls, stride_lb, stride_lh,
    stride_out_b, stride_out_s, stride_out_h,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)  # one (b, h, i) row per program
    i = row % seqlen_q
    h = (row // seqlen_q) % num_heads_q
    b = row // (seqlen_q * num_heads_q)
    splits = tl.arange(0, BLOCK_SPLITS)
    ok = splits < num_splits
    lses = tl.load(LSE_PART + splits * stride_ls + b * stride_lb + h * stride_lh + i, mask=ok, other=float("-inf"))
    m = tl.max(lses, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lses - m_safe)
    total = tl.sum(w, 0)
    dv = tl.arange(0, BLOCK_DV)
    parts = tl.load(
        OUT_PART + splits[:, None] * stride_os + b * stride_ob + h * stride_oh + i * stride_om + dv[None, :],
        mask=ok[:, None] & (dv[None, :] < HEAD_DIM_V),
        other=0.0,
    )
    out = tl.sum(parts * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    lse = tl.where(total == 0.0, float("-inf"), m_safe + tl.log(tl.where(total == 0.0, 1.0, total)))
    tl.store(OUT + b * stride_out_b + i * stride_out_s + h * stride_out_h + dv, out.to(OUT.dtype.element_ty),
             mask=dv < HEAD_DIM_V)  # fmt: skip
    tl.store(LSE + (b * num_heads_q + h) * seqlen_q + i, lse)
