"""Triton helpers shared by the forward and backward kernels (imported only once triton is known to exist)."""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


# tanh(x) = x * P(x^2) on |x| < TANH_SMALL: least-squares fit of tanh(x)/x in float64 (relative error of the
# float32 evaluation <= 1.2 ulp on [-0.55, 0.55]), highest power first.
TANH_SMALL = tl.constexpr(0.55)
TANH_C5 = tl.constexpr(-0.00623035302587604)
TANH_C4 = tl.constexpr(0.021035726299584244)
TANH_C3 = tl.constexpr(-0.05384165795588375)
TANH_C2 = tl.constexpr(0.133324493581923)
TANH_C1 = tl.constexpr(-0.3333331052535812)
TANH_C0 = tl.constexpr(0.9999999990387674)


@triton.jit
def tanh(x):
    # No portable tanh across CUDA, ROCm and the interpreter. 1 - 2/(e^2x + 1) saturates to +-1 without NaN
    # (exp2 overflows to inf, giving exactly 1) and stays within ~3 fp32 ulps for |x| >= 0.55, but for small |x|
    # it cancels: its absolute error stays ~1e-7 however small tanh(x) is, and softcap * tanh(s / softcap) with a
    # large softcap multiplies that back (softcap 1e8: score errors ~1). Small arguments use an odd polynomial.
    e = tl.exp2(x * 2.8853900817779268)  # 2 * log2(e)
    large = 1.0 - 2.0 / (e + 1.0)
    u = x * x
    p = TANH_C5 * u + TANH_C4
    p = p * u + TANH_C3
    p = p * u + TANH_C2
    p = p * u + TANH_C1
    p = p * u + TANH_C0
    return tl.where(tl.abs(x) < TANH_SMALL, x * p, large)


@triton.jit
def dropout_keep(seed, rows, cols, bh, p):
    """Keep mask of attnkit.dropout: Philox counter (key j, query i, b*Hq+h, 0); rows/cols are 2-D, same shape."""
    zero = tl.zeros(rows.shape, dtype=tl.int32)
    r0, _, _, _ = tl.philox(seed, cols.to(tl.uint32), rows.to(tl.uint32), (zero + bh).to(tl.uint32), zero.to(tl.uint32))
    return tl.uint_to_uniform_float(r0) >= p


@triton.jit
def load_tile(ptrs, rows, nrows, cols, NCOLS: tl.constexpr, BLOCK_COLS: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Load a (rows x cols) tile, zero outside ``rows < nrows`` (when CHECK_ROWS) and ``cols < NCOLS``."""
    if CHECK_ROWS:
        if NCOLS < BLOCK_COLS:
            x = tl.load(ptrs, mask=(rows[:, None] < nrows) & (cols[None, :] < NCOLS), other=0.0)
        else:
            x = tl.load(ptrs, mask=rows[:, None] < nrows, other=0.0)
    else:
        if NCOLS < BLOCK_COLS:
            x = tl.load(ptrs, mask=cols[None, :] < NCOLS, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def store_tile(ptrs, x, rows, nrows, cols, NCOLS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    if NCOLS < BLOCK_COLS:
        tl.store(ptrs, x, mask=(rows[:, None] < nrows) & (cols[None, :] < NCOLS))
    else:
        tl.store(ptrs, x, mask=rows[:, None] < nrows)


@triton.jit
def dot_operand(x, UPCAST: tl.constexpr):
    # The interpreter's tl.dot returns garbage for bfloat16 operands and accumulates float16 in float16, so
    # interpreted runs compute products in float32 (exact for 16-bit inputs) instead.
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def q_block_kv_range(
    m0,
    sq,
    sk,
    window_left,
    window_right,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WL: tl.constexpr,
    HAS_WR: tl.constexpr,
):
    """Key range of the query rows [m0, m0 + BLOCK_M): (lo, full_lo, full_hi, hi).

    Key blocks starting in [lo, full_lo) and [full_hi, hi) need masking; [full_lo, full_hi) are fully visible to
    every valid row, so they skip the mask. lo, full_lo and full_hi are multiples of BLOCK_N.
    """
    off = sk - sq  # bottom-right alignment: d = i + off - j
    m_last = tl.minimum(m0 + BLOCK_M, sq) - 1
    lo = 0
    hi = sk
    if HAS_WL:
        lo = tl.maximum(m0 + off - window_left, 0)
    if HAS_WR:
        hi = tl.minimum(tl.maximum(m_last + off + window_right + 1, 0), sk)
    lo = (lo // BLOCK_N) * BLOCK_N
    full_lo = lo
    full_hi = (sk // BLOCK_N) * BLOCK_N
    if HAS_WL:
        full_lo = tl.cdiv(tl.maximum(m_last + off - window_left, 0), BLOCK_N) * BLOCK_N
    if HAS_WR:
        full_hi = tl.minimum(full_hi, (tl.maximum(m0 + off + window_right + 1, 0) // BLOCK_N) * BLOCK_N)
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def kv_block_q_range(
    n0,
    sq,
    sk,
    window_left,
    window_right,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WL: tl.constexpr,
    HAS_WR: tl.constexpr,
):
    """Query range seeing the keys [n0, n0 + BLOCK_N): (lo, full_lo, full_hi, hi), as in q_block_kv_range."""
    off = sk - sq
    n_last = tl.minimum(n0 + BLOCK_N, sk) - 1
    lo = 0
    hi = sq
    if HAS_WR:
        lo = tl.maximum(n0 - off - window_right, 0)
    if HAS_WL:
        hi = tl.minimum(tl.maximum(n_last - off + window_left + 1, 0), sq)
    lo = tl.minimum(lo, sq)
    lo = (lo // BLOCK_M) * BLOCK_M
    full_lo = lo
    full_hi = (sq // BLOCK_M) * BLOCK_M
    if HAS_WR:
        full_lo = tl.cdiv(tl.maximum(n_last - off - window_right, 0), BLOCK_M) * BLOCK_M
    if HAS_WL:
        full_hi = tl.minimum(full_hi, (tl.maximum(n0 - off + window_left + 1, 0) // BLOCK_M) * BLOCK_M)
    # A key block cut by the end of the sequence needs its column mask everywhere.
    full_hi = tl.where(n0 + BLOCK_N > sk, full_lo, full_hi)
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def sequence_bounds(CuQ, CuK, b, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    """(q_start, seqlen_q, k_start, seqlen_k) of sequence ``b``: packed offsets for varlen, the whole axis else."""
    if VARLEN:
        q_start = tl.load(CuQ + b)
        sq = tl.load(CuQ + b + 1) - q_start
        k_start = tl.load(CuK + b)
        sk = tl.load(CuK + b + 1) - k_start
        q_start = q_start.to(tl.int64)
        k_start = k_start.to(tl.int64)
    else:
        q_start = 0
        sq = seqlen_q
        k_start = 0
        sk = seqlen_k
    return q_start, sq, k_start, sk
