"""Host side of the warp-specialised Hopper forward (kernels/fwd_sm90_ws.cu): when it may run, the tensors the
TMA unit can read, their tensor maps, the kernel's argument list, :func:`ws_forward` (an explicit-config entry
point for ablations and benchmarks), and the fp8 forward (:func:`fp8_forward`, with its V^T pass, fp8_vt.cu).

All but the driver's map encoding is plain Python over tensor metadata, unit-tested without a GPU
(tests/cupy/test_cupy_ws_cpu.py).
"""

from __future__ import annotations

from typing import Any

import torch

from attnkit import env
from attnkit.errors import InvalidArgumentError
from attnkit.fp8 import Fp8Scales
from attnkit.params import AttentionParams

from . import compiler, config, tma
from .args import alibi_ready, f32, i32, i64, kernel_ready, ptr, score_args
from .config import Sm90WsFwdConfig, padded_head_dim, sm90_ws_fwd_config
from .launcher import Launcher

SOURCE = "fwd_sm90_ws.cu"
KERNEL = "attnkit_fwd_sm90_ws"
VT_SOURCE = "fp8_vt.cu"
VT_KERNEL = "attnkit_fp8_vt"
SWIZZLE_BYTES = 128  # one TMA box row: the span of the kernels' 128-byte swizzle


def ws_forward_config(head_dim: int, dtype: torch.dtype, arch: str, smem_limit: int,
                      seqlen_k: int) -> Sm90WsFwdConfig | None:  # fmt: skip
    """The warp-specialised TMA forward's configuration when it may serve this call: sm_90 machine code, wgmma
    and TMA allowed (``ATTNKIT_CUPY_WGMMA``, ``ATTNKIT_CUPY_TMA``), a head dim it covers, the tiles fit, and it is
    the faster kernel for the call (at kernel head dim 64, only from ``SM90_WS_D64_MIN_SEQLEN_K`` keys on).
    The tensors' own eligibility (dense, TMA strides) is decided by :func:`tma_ready`."""
    if arch != "sm_90" or not env.cupy_wgmma() or not env.cupy_tma():
        return None
    cfg = sm90_ws_fwd_config(head_dim, dtype, smem_limit)
    if cfg is not None and cfg.head_dim == 64 and seqlen_k < config.SM90_WS_D64_MIN_SEQLEN_K:
        return None
    return cfg


def tma_ready(t: torch.Tensor) -> bool:
    """A dense (batch, seqlen, heads, dim) tensor the TMA unit can read as it is: contiguous last dim, 16-byte
    aligned base, and every other dim of size > 1 with a positive stride of a multiple of 16 bytes."""
    if t.dim() != 4 or t.stride(-1) != 1 or t.data_ptr() % 16:
        return False
    elem = t.element_size()
    return all(n == 1 or (s > 0 and (s * elem) % 16 == 0) for n, s in zip(t.shape[:-1], t.stride()[:-1]))


def tma_map(t: torch.Tensor, rows: int) -> Any:
    """Tensor map of a (batch, seqlen, heads, dim) tensor with a box of 128 bytes of columns (64 16-bit or 128 fp8
    values) x ``rows`` positions: one 128-byte-swizzled slab of the kernel's layout. Dims of size 1 get the
    contiguous stride, which TMA accepts whatever their real stride is (a size-1 dim is only ever indexed at 0)."""
    b, n, h, d = t.shape
    strides = list(t.stride()[:-1])  # batch, seqlen, heads
    natural = (n * h * d, h * d, d)
    strides = [st if size > 1 else nat for st, size, nat in zip(strides, (b, n, h), natural)]
    cols = SWIZZLE_BYTES // t.element_size()
    return tma.encode_tiled(t, (d, n, h, b), (strides[1], strides[2], strides[0]), (cols, rows, 1, 1))


def vt_map(vt: torch.Tensor, block_n: int) -> Any:
    """Tensor map of the fp8 forward's contiguous V^T, (batch, heads_k, dim, keys): a box of ``block_n`` keys (one
    128-byte row) x the kernel's 128 channel rows; channels past the head dim arrive as zeros."""
    b, h, d, n = vt.shape
    return tma.encode_tiled(vt, (n, d, h, b), (n, d * n, h * d * n), (block_n, config.FP8_WS_HEAD_DIM, 1, 1))


def ws_forward_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    alibi: torch.Tensor | None,
    alibi_sb: int,
    params: AttentionParams,
    cfg: Sm90WsFwdConfig,
    scales: Fp8Scales | None = None,
) -> list[Any]:
    """The argument list of ``attnkit_fwd_sm90_ws``, in the kernel's parameter order (the one place it is built).
    For the fp8 kernel ``v`` is V^T from :func:`transposed_v` and ``scales`` holds the descales."""
    if cfg.fp8 != (scales is not None):
        raise InvalidArgumentError("the fp8 forward takes descales, the 16-bit one none")
    scale_log2, cap_pre, cap_post, use_cap, use_alibi = score_args(params, alibi)
    hq, hk = q.shape[2], k.shape[2]
    descales = (None, None, None) if scales is None else (scales.q_descale, scales.k_descale, scales.v_descale)
    return [
        tma_map(q, cfg.block_m),
        tma_map(k, cfg.block_n),
        vt_map(v, cfg.block_n) if cfg.fp8 else tma_map(v, cfg.block_n),
        ptr(out),
        ptr(lse),
        ptr(alibi),
        *(ptr(x) for x in descales),
        *i64(out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1)),
        *i32(q.shape[1], k.shape[1], hq // hk, q.shape[3], alibi_sb),
        *f32(scale_log2, cap_pre, cap_post),
        *i32(use_cap, use_alibi, params.window_left, params.window_right),
    ]


def launch_ws(
    launch: Any,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    alibi: torch.Tensor | None,
    alibi_sb: int,
    params: AttentionParams,
    cfg: Sm90WsFwdConfig,
    scales: Fp8Scales | None = None,
) -> None:
    """Launch the kernel through ``launch`` (a :class:`Launcher` or a test's recorder) on kernel-ready tensors."""
    args = ws_forward_args(q, k, v, out, lse, alibi, alibi_sb, params, cfg, scales)
    spec = compiler.ModuleSpec.make(SOURCE, cfg.defines(), "sm_90a")
    launch(spec, KERNEL, cfg.grid(q.shape[1], q.shape[2], q.shape[0]), cfg.threads, cfg.smem_bytes, args)


def ws_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    params: AttentionParams,
    cfg: Sm90WsFwdConfig,
    alibi_slopes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The warp-specialised forward with an explicit configuration (ablations, benchmarks), dense inputs only.

    Unlike ``CupyCudaBackend.forward`` it does not choose: it raises when ``cfg`` cannot serve the call."""
    d = q.shape[-1]
    dp = padded_head_dim(d)
    if q.dim() != 4 or k.shape[-1] != d or v.shape[-1] != d or dp > cfg.head_dim:
        raise InvalidArgumentError(
            f"ws_forward takes dense (batch, seqlen, heads, dim) tensors of one head dim <= {cfg.head_dim}; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[-2] % k.shape[-2]:
        raise InvalidArgumentError(f"query heads {q.shape[-2]} are not a multiple of key heads {k.shape[-2]}")
    batch, sq, hq = q.shape[:3]
    out = torch.empty(batch, sq, hq, dp, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, hq, sq, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out[..., :d], lse
    qp, kp, vp = (kernel_ready(t, dp) for t in (q, k, v))
    if not all(tma_ready(t) for t in (qp, kp, vp)):
        raise InvalidArgumentError("ws_forward: the TMA unit cannot read these tensors (stride 0 or unaligned)")
    alibi, alibi_sb = alibi_ready(alibi_slopes)
    launch_ws(Launcher(q.device), qp, kp, vp, out, lse, alibi, alibi_sb, params, cfg)
    return (out if dp == d else out[..., :d].contiguous()), lse


# ---- fp8 ---------------------------------------------------------------------------------------------------------
def fp8_forward_config(head_dim: int, out_dtype: torch.dtype, arch: str, smem_limit: int) -> Sm90WsFwdConfig | None:
    """The fp8 forward's configuration when it may serve this call: sm_90 machine code with wgmma and TMA allowed
    (``ATTNKIT_CUPY_WGMMA``, ``ATTNKIT_CUPY_TMA``), a head dim it covers (multiples of 16 up to 128)."""
    if arch != "sm_90" or not env.cupy_wgmma() or not env.cupy_tma():
        return None
    return config.fp8_ws_fwd_config(head_dim, out_dtype, smem_limit)


def fresh_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy in a new allocation (aligned, unlike ``contiguous()`` of a tensor that already is
    contiguous but starts at an odd address)."""
    return t.clone(memory_format=torch.contiguous_format)


def vt_ready(v: torch.Tensor) -> bool:
    """V as the V^T pass reads it: channels contiguous, 16-byte aligned base and strides (16-byte loads)."""
    return (
        v.dim() == 4
        and v.stride(-1) == 1
        and v.data_ptr() % 16 == 0
        and all(n == 1 or s % 16 == 0 for n, s in zip(v.shape[:-1], v.stride()[:-1]))
    )


def vt_key_of_slot(slot: int) -> int:
    """The key (within its block of 32) that V^T position ``slot`` holds: fp8_vt.cu's ``key_of_slot``."""
    j, t = slot & 3, (slot >> 2) & 3
    return (slot & 16) + 2 * t + (j & 1) + 8 * (j >> 1)


def transposed_v_reference(v: torch.Tensor) -> torch.Tensor:
    """What :func:`transposed_v` computes, in plain torch (tests): padded, permuted, contiguous V^T."""
    b, sk, hk, d = v.shape
    keys = config.fp8_vt_keys(sk)
    raw = torch.zeros(b, keys, hk, d, dtype=torch.uint8, device=v.device)
    raw[:, :sk] = v.view(torch.uint8)
    order = torch.tensor([s - s % 32 + vt_key_of_slot(s % 32) for s in range(keys)], device=v.device)
    return raw[:, order].permute(0, 2, 3, 1).contiguous().view(v.dtype)


def transposed_v_args(v: torch.Tensor, vt: torch.Tensor) -> list[Any]:
    """The argument list of ``attnkit_fp8_vt`` (v as stored, vt from :func:`transposed_v`)."""
    return [ptr(v), ptr(vt), *i64(v.stride(0), v.stride(1), v.stride(2)), *i32(v.shape[1], vt.shape[3], v.shape[3])]


def transposed_v(launch: Any, arch: str, v: torch.Tensor) -> torch.Tensor:
    """V^T of a float8 (batch, seqlen_k, heads_k, dim) tensor for the fp8 forward: contiguous (batch, heads_k, dim,
    keys) with the keys padded to whole blocks of 32 (zeros) and permuted inside each block (fp8_vt.cu says why).
    One read and one write of V's bytes."""
    vs = v if vt_ready(v) else fresh_copy(v)
    b, sk, hk, d = vs.shape
    keys = config.fp8_vt_keys(sk)
    vt = torch.empty(b, hk, d, keys, dtype=v.dtype, device=v.device)
    spec = compiler.ModuleSpec.make(VT_SOURCE, {}, arch)
    launch(spec, VT_KERNEL, config.fp8_vt_grid(keys, hk, b), config.FP8_VT_THREADS, 0, transposed_v_args(vs, vt))
    return vt


def fp8_forward(
    launch: Any,
    arch: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alibi_slopes: torch.Tensor | None,
    params: AttentionParams,
    scales: Fp8Scales,
    cfg: Sm90WsFwdConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp8 forward of dense float8_e4m3fn (batch, seqlen, heads, dim) q, k, v: out in ``scales.out_dtype``,
    lse float32 (batch, heads, seqlen_q). Two launches: the V^T pass, then the forward."""
    batch, sq, hq, d = q.shape
    out = torch.empty(batch, sq, hq, d, dtype=scales.out_dtype, device=q.device)
    lse = torch.empty(batch, hq, sq, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    qp, kp = (t if tma_ready(t) else fresh_copy(t) for t in (q, k))
    vt = transposed_v(launch, arch, v)
    alibi, alibi_sb = alibi_ready(alibi_slopes)
    launch_ws(launch, qp, kp, vt, out, lse, alibi, alibi_sb, params, cfg, scales)
    return out, lse
