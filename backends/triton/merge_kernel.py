"""Merging partial attention states (``attnkit.merge_attention_states``): a memory-bound pass over the parts.

One program takes ``BLOCK_R`` rows (a row is one (batch, query, head) triple, heads fastest) and the whole head
dim. A first loop over the parts finds each row's largest lse, a second one accumulates ``exp(lse_i - max) *
out_i`` in float32. Parts with ``lse_i = -inf`` are skipped (their out is never read into the sum); a NaN lse
reaches the rows it belongs to. The semantics are those of ``backends/reference/merge.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def merge_states_fwd(
    OUT_PARTS, LSE_PARTS, OUT, LSE, num_parts, rows, seqlen, heads,
    stride_op, stride_ob, stride_os, stride_oh, stride_od,
    stride_lp, stride_lb, stride_lh, stride_ls,
    stride_out_b, stride_out_s, stride_out_h,
    stride_lse_b, stride_lse_h, stride_lse_s,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = r < rows
    h = r % heads
    s = (r // heads) % seqlen
    b = r // (heads * seqlen)
    d = tl.arange(0, BLOCK_D)
    lse_ptrs = LSE_PARTS + b * stride_lb + h * stride_lh + s * stride_ls
    top = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for p in range(num_parts):
        lse = tl.load(lse_ptrs + p * stride_lp, mask=row_ok, other=float("-inf")).to(tl.float32)
        # A NaN lse must win: tl.maximum would drop it.
        top = tl.where(lse != lse, lse, tl.maximum(top, lse))
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    out_ptrs = OUT_PARTS + (b * stride_ob + s * stride_os + h * stride_oh)[:, None] + d[None, :] * stride_od
    for p in range(num_parts):
        lse = tl.load(lse_ptrs + p * stride_lp, mask=row_ok, other=float("-inf")).to(tl.float32)
        present = lse != float("-inf")
        w = tl.where(present, tl.exp(lse - top_safe), 0.0)
        part = tl.load(out_ptrs + p * stride_op, mask=(row_ok & present)[:, None] & (d[None, :] < HEAD_DIM),
                       other=0.0)  # fmt: skip
        acc += w[:, None] * part.to(tl.float32)
        total += w
    empty = total == 0.0
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, total)[:, None])
    merged = tl.where(empty, float("-inf"), top_safe + tl.log(tl.where(empty, 1.0, total)))
    o_ptrs = OUT + (b * stride_out_b + s * stride_out_s + h * stride_out_h)[:, None] + d[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (d[None, :] < HEAD_DIM))
    tl.store(LSE + b * stride_lse_b + h * stride_lse_h + s * stride_lse_s, merged, mask=row_ok)


def block_rows(head_dim_block: int) -> int:
    """Rows per program: about 4k float32 accumulators (16 KiB of registers over 4 warps)."""
    return max(1, min(128, 4096 // head_dim_block))
