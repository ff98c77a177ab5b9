"""Host side of ``merge_states_fwd``: output buffers, grid and launch."""

from __future__ import annotations

import torch
import triton

from . import device
from .merge_kernel import block_rows, merge_states_fwd


def merge_states(
    out_parts: torch.Tensor, lse_parts: torch.Tensor, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``out_parts`` (P, B, S, H, D), ``lse_parts`` (P, B, H, S), any strides -> out (B, S, H, D), lse (B, H, S)."""
    parts, batch, seqlen, heads, head_dim = out_parts.shape
    out = torch.empty(batch, seqlen, heads, head_dim, dtype=out_dtype, device=out_parts.device)
    lse = torch.empty(batch, heads, seqlen, dtype=torch.float32, device=out_parts.device)
    rows = batch * seqlen * heads
    if rows == 0:
        return out, lse
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_r = block_rows(block_d)
    with device.on_device(out_parts):
        merge_states_fwd[(triton.cdiv(rows, block_r),)](
            out_parts, lse_parts, out, lse, parts, rows, seqlen, heads,
            *out_parts.stride(), *lse_parts.stride(), *out.stride()[:3], *lse.stride(),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_R=block_r, num_warps=4,
        )  # fmt: skip
    return out, lse
