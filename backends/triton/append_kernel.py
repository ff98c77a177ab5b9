"""The kv-cache append in one kernel: new keys and values written at each row's length, and the lengths after it.

One program per (batch row, new token) writes that token's keys and values of every kv head, cast to the cache
dtype, into its cache row (``BATCH_IDX``) or page (``BLOCK_TABLE``); the programs of token 0 also write
``TOTAL[b] = SEQLENS[b] + seqlen_new`` (``length + seqlen_new`` with one int length), the lengths the decode
kernel attends over. The frontend has checked every position before the launch; positions outside
``[0, capacity)`` are still masked, so a bad length cannot write outside the cache.
"""

from __future__ import annotations

import triton
import triton.language as tl


# ``length``: every row's length when the caller gave one int (SCALAR_LENGTH; SEQLENS is then not read), so a
# decode step needs no device tensor of it. Not specialised: its value changes every step.
def _append_kv(
    K_CACHE, V_CACHE, K, V, SEQLENS, BATCH_IDX, BLOCK_TABLE, TOTAL, length, high,
    seqlen_new, num_kv_heads, capacity,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt_b,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr, HAS_BATCH_IDX: tl.constexpr,
    SCALAR_LENGTH: tl.constexpr, CHECK_RANGE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = pid // seqlen_new
    s = pid % seqlen_new
    if SCALAR_LENGTH:
        start = length
    else:
        start = tl.load(SEQLENS + b)
    if CHECK_RANGE:
        # A bad row's program stops before its write and the GPU stops before the attention after it, in stream
        # order (other rows' writes may land, in a context the assert has ended). The message is a literal: triton
        # 3.6 refuses a module-level string that is not a tl.constexpr. Only append_kv_checked_fwd, compiled with
        # debug=True, keeps the assert (the interpreter does not run it).
        tl.device_assert(
            (start >= 0) & (start <= high),
            "attention_with_kvcache: cache_seqlens has an entry outside [0, capacity - new tokens] (negative, or a "
            "row without room for the appended tokens)",
        )
    if s == 0:
        tl.store(TOTAL + b, (start + seqlen_new).to(tl.int32))
    pos = (start + s).to(tl.int64)
    ok = (pos >= 0) & (pos < capacity)
    pos = tl.where(ok, pos, 0)
    if PAGED:
        page = tl.load(BLOCK_TABLE + b * stride_bt_b + pos // PAGE_SIZE).to(tl.int64)
        slot = pos % PAGE_SIZE
    else:
        if HAS_BATCH_IDX:
            page = tl.load(BATCH_IDX + b).to(tl.int64)
        else:
            page = b.to(tl.int64)
        slot = pos
    heads = tl.where(ok, num_kv_heads, 0)  # no head of a position outside the cache is written
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < heads) & (d < HEAD_DIM)
    src = tl.load(K + b.to(tl.int64) * stride_kb + s * stride_ks + h * stride_kh + d, mask=mask)
    dst = K_CACHE + page * stride_kcb + slot * stride_kcs + h * stride_kch + d
    tl.store(dst, src.to(K_CACHE.dtype.element_ty), mask=mask)
    dv = tl.arange(0, BLOCK_DV)[None, :]
    mask_v = (h < heads) & (dv < HEAD_DIM_V)
    src_v = tl.load(V + b.to(tl.int64) * stride_vb + s * stride_vs + h * stride_vh + dv, mask=mask_v)
    dst_v = V_CACHE + page * stride_vcb + slot * stride_vcs + h * stride_vch + dv
    tl.store(dst_v, src_v.to(V_CACHE.dtype.element_ty), mask=mask_v)


append_kv_fwd = triton.jit(do_not_specialize=["length", "high"])(_append_kv)
# Tensor lengths of a repeated decode step: the range check in the append itself (one launch fewer than a separate
# check kernel); debug=True is what keeps tl.device_assert.
append_kv_checked_fwd = triton.jit(debug=True, do_not_specialize=["length", "high"])(_append_kv)
