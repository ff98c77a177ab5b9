"""Host side of the warp-specialized Hopper backward (kernels/bwd_sm90_ws.cu): when it runs, its tensor maps, its
padded lse/delta buffers, its argument list and :func:`ws_backward`, the launch of the pre-pass and the kernel.

Everything here but :func:`encode_maps` is plain Python over tensor metadata, so the selection rules and the
exact launch arguments are unit-tested without a GPU (tests/cupy/test_cupy_ws_bwd_cpu.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from attnkit import env
from attnkit.errors import InvalidArgumentError
from attnkit.params import AttentionParams

from . import compiler, tma
from .args import alibi_ready, f32, i32, i64, kernel_ready, ptr, score_args
from .config import Sm90WsBwdConfig, padded_head_dim, sm90_ws_bwd_config
from .pre_pass import launch_backward_pre

SOURCE = "bwd_sm90_ws.cu"
KERNEL = "attnkit_bwd_sm90_ws"
# Columns of one TMA box: 64 16-bit elements (Q, K, V, dO) or 32 floats (dQ) fill one 128-byte swizzle row.
HALF_BOX_COLS = 64
DQ_BOX_COLS = 32


def ws_backward_config(
    head_dim: int, dtype: torch.dtype, arch: str, smem_limit: int, varlen: bool
) -> Sm90WsBwdConfig | None:
    """The warp-specialized backward's tiles when it may run for this call, else None (the caller keeps
    bwd_sm90.cu / bwd.cu): sm_90 with ``ATTNKIT_CUPY_WGMMA`` and ``ATTNKIT_CUPY_TMA_BWD`` on, dense batch, kernel
    head dim 64 or 128, enough shared memory."""
    if arch != "sm_90" or varlen or not env.cupy_wgmma() or not env.cupy_tma_bwd():
        return None
    return sm90_ws_bwd_config(head_dim, dtype, smem_limit)


@dataclass(frozen=True)
class WsMaps:
    """The five tensor-map descriptions of one launch, in the kernel's parameter order."""

    q: tma.TiledArguments
    k: tma.TiledArguments
    v: tma.TiledArguments
    dout: tma.TiledArguments
    dq: tma.TiledArguments

    def all(self) -> tuple[tma.TiledArguments, ...]:
        return (self.q, self.k, self.v, self.dout, self.dq)


def _map4(t: torch.Tensor, box_cols: int, box_rows: int) -> tma.TiledArguments:
    """4-D map over a (batch, seqlen, heads, dim) tensor, innermost first: (dim, seqlen, heads, batch)."""
    if t.dim() != 4 or t.stride(3) != 1:
        raise InvalidArgumentError(
            f"TMA needs a 4-D tensor with a contiguous last dim, got shape {tuple(t.shape)} strides {t.stride()}"
        )
    b, s, h, d = t.shape
    return tma.tiled_arguments(
        t.data_ptr(), t.dtype, (d, s, h, b), (t.stride(1), t.stride(2), t.stride(0)), (box_cols, box_rows, 1, 1), 128
    )


def tensor_maps(
    cfg: Sm90WsBwdConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, dq_acc: torch.Tensor
) -> WsMaps:
    """Checked map descriptions; raises InvalidArgumentError (a TMA rule broken) so the caller can fall back."""
    return WsMaps(
        q=_map4(q, HALF_BOX_COLS, cfg.block_m),
        k=_map4(k, HALF_BOX_COLS, cfg.block_n),
        v=_map4(v, HALF_BOX_COLS, cfg.block_n),
        dout=_map4(dout, HALF_BOX_COLS, cfg.block_m),
        dq=_map4(dq_acc, DQ_BOX_COLS, cfg.dq_tile_rows),
    )


def encode_maps(maps: WsMaps) -> list[Any]:
    """The driver-encoded maps (NumPy structured scalars passed by value); needs the CUDA driver."""
    return [tma.encode(m) for m in maps.all()]


def padded_rows(cfg: Sm90WsBwdConfig, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse, delta) buffers of shape (batch, heads, cfg.lse_len(seqlen_q)): lse copied in, delta zeroed for the
    pre-pass to fill. The padding keeps each block's bulk copy inside the buffer and 16-byte aligned."""
    b, h, sq = lse.shape
    n = cfg.lse_len(sq)
    lse_p = torch.zeros(b, h, n, dtype=torch.float32, device=lse.device)
    lse_p[..., :sq].copy_(lse)
    return lse_p, torch.zeros_like(lse_p)


def kernel_arguments(
    encoded_maps: list[Any],
    lse_p: torch.Tensor,
    delta_p: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    alibi: torch.Tensor | None,
    alibi_sb: int,
    seqlen_q: int,
    seqlen_k: int,
    heads_q: int,
    heads_k: int,
    head_dim: int,
    softmax_scale: float,
    score: tuple[float, float, float, int, int],
    window: tuple[int, int],
) -> list[Any]:
    """The launch's argument list in attnkit_bwd_sm90_ws's parameter order (the one place it is built).

    ``score`` is :func:`args.score_args`' (scale_log2, cap_pre, cap_post, use_softcap, use_alibi); ``head_dim``
    the padded head dim of the tensors; dk and dv share one layout."""
    if dk.shape != dv.shape or dk.stride() != dv.stride():
        raise InvalidArgumentError(f"dk {tuple(dk.shape)}/{dk.stride()} and dv {tuple(dv.shape)}/{dv.stride()} differ")
    if len(encoded_maps) != 5:
        raise InvalidArgumentError(f"the kernel takes 5 tensor maps, got {len(encoded_maps)}")
    scale_log2, cap_pre, cap_post, use_cap, use_alibi = score
    return [
        *encoded_maps,
        ptr(lse_p),
        ptr(delta_p),
        ptr(dk),
        ptr(dv),
        ptr(alibi),
        *i64(lse_p.shape[-1], dk.stride(0), dk.stride(1), dk.stride(2)),
        *i32(seqlen_q, seqlen_k, heads_q, heads_q // heads_k, head_dim, alibi_sb),
        *f32(softmax_scale, scale_log2, cap_pre, cap_post),
        *i32(use_cap, use_alibi, window[0], window[1]),
    ]


def ws_backward(
    launch: Any,
    arch: str,
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    alibi_slopes: torch.Tensor | None,
    params: AttentionParams,
    varlen: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Gradients from the TMA warp-specialized kernel, or None when it does not apply to this call (the
    caller then runs bwd_sm90.cu / bwd.cu); nothing is written before that decision. ``launch`` is a
    :class:`launcher.Launcher` (or a test's recorder)."""
    d = q.shape[-1]
    cfg = ws_backward_config(d, q.dtype, arch, launch.smem_limit(), varlen)
    if cfg is None or q.numel() == 0 or k.numel() == 0:
        return None
    dp = padded_head_dim(d)
    batch, sq, hq = q.shape[0], q.shape[1], q.shape[2]
    sk, hk = k.shape[1], k.shape[2]
    qp, kp, vp, op, dop = (kernel_ready(t, dp) for t in (q, k, v, out, dout))
    dq_acc = torch.empty(*q.shape[:-1], dp, dtype=torch.float32, device=q.device)  # zeroed by the pre-pass
    try:
        maps = tensor_maps(cfg, qp, kp, vp, dop, dq_acc)
    except InvalidArgumentError:
        return None  # a stride or address TMA cannot describe: the cp.async kernels take any layout
    dk = torch.empty(*k.shape[:-1], dp, dtype=q.dtype, device=q.device)
    dv = torch.empty_like(dk)
    lse_p, delta_p = padded_rows(cfg, lse.to(torch.float32))
    n = lse_p.shape[-1]
    launch_backward_pre(launch, arch, op, dop, delta_p, dq_acc, False, (hq * n, n), sq, hq, batch, dp)
    alibi, alibi_sb = alibi_ready(alibi_slopes)
    args = kernel_arguments(
        encode_maps(maps),
        lse_p,
        delta_p,
        dk,
        dv,
        alibi,
        alibi_sb,
        sq,
        sk,
        hq,
        hk,
        dp,
        params.softmax_scale,
        score_args(params, alibi),
        (params.window_left, params.window_right),
    )
    spec = compiler.ModuleSpec.make(SOURCE, cfg.defines(), "sm_90a")
    launch(spec, KERNEL, cfg.grid(sk, hk, batch), cfg.threads, cfg.smem_bytes, args)
    dq = dq_acc[..., :d].to(q.dtype)
    if dp != d:
        dk, dv = dk[..., :d].contiguous(), dv[..., :d].contiguous()
    return dq, dk, dv
