"""Kernel arguments of the cupy_cuda backend: tensors made kernel-ready, the typed scalars CuPy passes by value,
and the one place the argument list of each cp.async / wgmma kernel is built, in its parameter order.

The warp-specialised kernels build theirs in ws_fwd.py and ws_bwd.py from the same helpers. Every builder is
checked against the parameter list of its ``extern "C"`` entry point, read from the .cu source, by
tests/cupy/test_cupy_args.py (no GPU needed).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from attnkit.errors import InvalidArgumentError
from attnkit.params import AttentionParams

from .config import pre_lanes_per_row

LOG2E = 1.4426950408889634


# ---- typed scalars (NumPy, so CuPy passes each with the width of the kernel's parameter) ----------------------------
def ptr(t: torch.Tensor | None) -> Any:
    """A tensor's device address (0 for an absent optional tensor) as the kernel's pointer parameter."""
    import numpy as np

    return np.uint64(0 if t is None else t.data_ptr())


def i64(*values: int) -> list[Any]:
    import numpy as np

    return [np.int64(v) for v in values]


def i32(*values: int) -> list[Any]:
    """32-bit ints; raises when a value does not fit (a length or stride past 2**31 would wrap in the kernel)."""
    import numpy as np

    for v in values:
        if not -(2**31) <= v < 2**31:
            raise InvalidArgumentError(f"value {v} does not fit the CuPy kernels' 32-bit argument")
    return [np.int32(v) for v in values]


def f32(*values: float) -> list[Any]:
    import numpy as np

    return [np.float32(v) for v in values]


# ---- tensors and derived scalars ----------------------------------------------------------------------------------
def kernel_ready(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` with its last dim padded to ``width`` and laid out for 16-byte loads (copied only when needed)."""
    if t.shape[-1] != width:
        return F.pad(t, (0, width - t.shape[-1])).contiguous()
    aligned = t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in t.stride()[:-1])
    if aligned:
        return t
    return t.contiguous() if not t.is_contiguous() else t.clone()


def seq_strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, position, head) strides in elements; varlen tensors have no batch dim."""
    if varlen:
        return (0, t.stride(0), t.stride(1))
    return (t.stride(0), t.stride(1), t.stride(2))


def score_args(params: AttentionParams, alibi: torch.Tensor | None) -> tuple[float, float, float, int, int]:
    """(scale_log2, cap_pre, cap_post, use_softcap, use_alibi): the score transform every kernel applies."""
    scale = params.softmax_scale
    cap = params.softcap
    use_cap = cap > 0.0
    return (
        scale * LOG2E,
        scale / cap if use_cap else 0.0,
        cap * LOG2E if use_cap else 0.0,
        int(use_cap),
        int(alibi is not None),
    )


def alibi_ready(alibi: torch.Tensor | None) -> tuple[torch.Tensor | None, int]:
    """Slopes as contiguous float32 plus the batch stride (0 for per-head slopes of shape (Hq,))."""
    if alibi is None:
        return None, 0
    a = alibi.to(torch.float32).contiguous()
    return a, (a.shape[-1] if a.dim() == 2 else 0)


# ---- argument lists ---------------------------------------------------------------------------------------------
def forward_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    lse_strides: tuple[int, int],
    cu_q: torch.Tensor | None,
    cu_k: torch.Tensor | None,
    alibi: torch.Tensor | None,
    alibi_sb: int,
    max_seqlen_q: int,
    max_seqlen_k: int,
    head_dim: int,
    params: AttentionParams,
) -> list[Any]:
    """Arguments of ``attnkit_fwd`` (fwd.cu) and ``attnkit_fwd_sm90`` (fwd_sm90.cu), which share one signature.

    ``q``/``k``/``v`` are kernel-ready (``head_dim`` is their padded last dim); varlen calls pass ``cu_q`` and
    ``cu_k`` and batch-less tensors."""
    is_var = cu_q is not None
    scale_log2, cap_pre, cap_post, use_cap, use_alibi = score_args(params, alibi)
    return [
        ptr(q),
        ptr(k),
        ptr(v),
        ptr(out),
        ptr(lse),
        ptr(cu_q),
        ptr(cu_k),
        ptr(alibi),
        *i64(
            *seq_strides(q, is_var),
            *seq_strides(k, is_var),
            *seq_strides(v, is_var),
            *seq_strides(out, is_var),
            *lse_strides,
        ),
        *i32(max_seqlen_q, max_seqlen_k, q.shape[-2] // k.shape[-2], head_dim, alibi_sb),
        *f32(scale_log2, cap_pre, cap_post),
        *i32(use_cap, use_alibi, params.window_left, params.window_right),
    ]


def backward_pre_args(
    out: torch.Tensor,
    dout: torch.Tensor,
    delta: torch.Tensor,
    dq_acc: torch.Tensor,
    varlen: bool,
    delta_strides: tuple[int, int],
    seqlen: int,
    heads: int,
    head_dim: int,
) -> list[Any]:
    """Arguments of ``attnkit_bwd_pre`` (bwd.cu): delta = rowsum(dO * O), written with ``delta_strides``
    (batch, head) over ``seqlen`` rows per head, and the float32 ``dq_acc`` (out's rows, ``head_dim`` contiguous
    columns) zeroed in the same pass."""
    if dq_acc.dtype != torch.float32 or dq_acc.stride(-1) != 1 or dq_acc.shape[-1] != head_dim:
        raise InvalidArgumentError(
            f"dq_acc must be float32 with {head_dim} contiguous columns, got {dq_acc.dtype}, shape "
            f"{tuple(dq_acc.shape)}, strides {dq_acc.stride()}"
        )
    return [
        ptr(out),
        ptr(dout),
        ptr(delta),
        ptr(dq_acc),
        *i64(*seq_strides(out, varlen), *seq_strides(dout, varlen), *delta_strides, *seq_strides(dq_acc, varlen)),
        *i32(seqlen, heads, head_dim, pre_lanes_per_row(head_dim)),
    ]


def backward_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    lse_strides: tuple[int, int],
    dq_acc: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    cu_q: torch.Tensor | None,
    cu_k: torch.Tensor | None,
    alibi: torch.Tensor | None,
    alibi_sb: int,
    max_seqlen_q: int,
    max_seqlen_k: int,
    head_dim: int,
    params: AttentionParams,
) -> list[Any]:
    """Arguments of ``attnkit_bwd`` (bwd.cu) and ``attnkit_bwd_sm90`` (bwd_sm90.cu), which share one signature.

    lse and delta share ``lse_strides``; dk and dv share dk's layout (both are allocated alike)."""
    is_var = cu_q is not None
    scale_log2, cap_pre, cap_post, use_cap, use_alibi = score_args(params, alibi)
    return [
        ptr(q),
        ptr(k),
        ptr(v),
        ptr(dout),
        ptr(lse),
        ptr(delta),
        ptr(dq_acc),
        ptr(dk),
        ptr(dv),
        ptr(cu_q),
        ptr(cu_k),
        ptr(alibi),
        *i64(
            *seq_strides(q, is_var),
            *seq_strides(k, is_var),
            *seq_strides(v, is_var),
            *seq_strides(dout, is_var),
            *lse_strides,
            *seq_strides(dq_acc, is_var),
            *seq_strides(dk, is_var),
        ),
        *i32(max_seqlen_q, max_seqlen_k, q.shape[-2] // k.shape[-2], head_dim, alibi_sb),
        *f32(params.softmax_scale, scale_log2, cap_pre, cap_post),
        *i32(use_cap, use_alibi, params.window_left, params.window_right),
    ]
