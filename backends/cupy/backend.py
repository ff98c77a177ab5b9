"""The ``cupy_cuda`` backend: FlashAttention-2 style CUDA C++ kernels compiled at run time by NVRTC via CuPy.

Importing this module needs neither CuPy nor a GPU; both are looked up when the backend is first asked
whether it can run. Tensors reach the kernels zero-copy as raw pointers plus strides in elements, and every
launch goes onto PyTorch's current stream of the tensors' device.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F

from attnkit import env
from attnkit.errors import BackendUnsupportedError, InvalidArgumentError
from attnkit.params import AttentionParams, VarlenInfo
from attnkit.registry import Backend, BackendCapabilities
from attnkit.spec import AttentionSpec

from . import compiler, tma, ws_bwd
from .config import (
    MAX_GRID_YZ,
    PRE_THREADS,
    BwdConfig,
    FwdConfig,
    Sm90BwdConfig,
    Sm90FwdConfig,
    Sm90WsFwdConfig,
    bwd_config,
    fwd_config,
    padded_head_dim,
    pre_grid,
    sm90_bwd_config,
    sm90_fwd_config,
    sm90_ws_fwd_config,
)

LOG2E = 1.4426950408889634

CUPY_MISSING = (
    "cupy is not installed: pip install 'attnkit[cupy]' "
    "(or 'attnkit[cupy-cuda12x]' / 'attnkit[cupy-cuda13x]' to match your CUDA toolkit)"
)


@functools.lru_cache(maxsize=1)
def _cupy_problem() -> str | None:
    if importlib.util.find_spec("cupy") is None:
        return CUPY_MISSING
    try:
        import cupy  # noqa: F401
    except Exception as exc:
        return f"cupy failed to import ({type(exc).__name__}: {exc}); reinstall the cupy-cuda wheel matching your CUDA"
    return None


@functools.cache
def _max_smem_optin(device: int) -> int:
    props = torch.cuda.get_device_properties(device)
    value = getattr(props, "shared_memory_per_block_optin", None)
    if value:
        return int(value)
    import cupy

    return int(cupy.cuda.Device(device).attributes["MaxSharedMemoryPerBlockOptin"])


@functools.cache
def _arch(device: int) -> str:
    cap = torch.cuda.get_device_capability(device)
    return compiler.pick_arch((cap[0], cap[1]), compiler.nvrtc_supported_archs())


def forward_kernel(
    head_dim: int, dtype: torch.dtype, arch: str, smem_limit: int
) -> tuple[str, str, FwdConfig | Sm90FwdConfig]:
    """(source, kernel name, tiles) of the forward for this call: the wgmma kernel on sm_90 (when it covers the
    head dim and ``ATTNKIT_CUPY_WGMMA`` is not 0), the mma.sync kernel everywhere else."""
    if arch == "sm_90" and env.cupy_wgmma():
        cfg = sm90_fwd_config(head_dim, dtype, smem_limit)
        if cfg is not None:
            return "fwd_sm90.cu", "attnkit_fwd_sm90", cfg
    return "fwd.cu", "attnkit_fwd", fwd_config(head_dim, dtype, smem_limit)


def backward_kernel(
    head_dim: int, dtype: torch.dtype, arch: str, smem_limit: int
) -> tuple[str, str, BwdConfig | Sm90BwdConfig]:
    """(source, kernel name, tiles) of the main backward kernel, chosen like :func:`forward_kernel`."""
    if arch == "sm_90" and env.cupy_wgmma():
        cfg = sm90_bwd_config(head_dim, dtype, smem_limit)
        if cfg is not None:
            return "bwd_sm90.cu", "attnkit_bwd_sm90", cfg
    return "bwd.cu", "attnkit_bwd", bwd_config(head_dim, dtype, smem_limit)


WS_SOURCE = "fwd_sm90_ws.cu"
WS_KERNEL = "attnkit_fwd_sm90_ws"


def ws_forward_config(head_dim: int, dtype: torch.dtype, arch: str, smem_limit: int) -> Sm90WsFwdConfig | None:
    """The warp-specialised TMA forward's configuration when it may serve this call: sm_90 machine code, wgmma
    and TMA allowed (``ATTNKIT_CUPY_WGMMA``, ``ATTNKIT_CUPY_TMA``), a head dim it covers, and the tiles fit.
    The tensors' own eligibility (dense, TMA strides) is decided by :func:`tma_ready`."""
    if arch != "sm_90" or not env.cupy_wgmma() or not env.cupy_tma():
        return None
    return sm90_ws_fwd_config(head_dim, dtype, smem_limit)


def tma_ready(t: torch.Tensor) -> bool:
    """A dense (batch, seqlen, heads, dim) tensor the TMA unit can read as it is: contiguous last dim, 16-byte
    aligned base, and every other dim of size > 1 with a positive stride of a multiple of 16 bytes."""
    if t.dim() != 4 or t.stride(-1) != 1 or t.data_ptr() % 16:
        return False
    elem = t.element_size()
    return all(n == 1 or (s > 0 and (s * elem) % 16 == 0) for n, s in zip(t.shape[:-1], t.stride()[:-1]))


def tma_map(t: torch.Tensor, rows: int) -> Any:
    """Tensor map of a (batch, seqlen, heads, dim) tensor with a box of 64 columns x ``rows`` positions (one
    128-byte-swizzled slab of the kernel's layout). Dims of size 1 get the contiguous stride, which TMA accepts
    whatever their real stride is (a size-1 dim is only ever indexed at 0)."""
    b, n, h, d = t.shape
    strides = list(t.stride()[:-1])  # batch, seqlen, heads
    natural = (n * h * d, h * d, d)
    strides = [st if size > 1 else nat for st, size, nat in zip(strides, (b, n, h), natural)]
    return tma.encode_tiled(t, (d, n, h, b), (strides[1], strides[2], strides[0]), (64, rows, 1, 1))


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
) -> list[Any]:
    """The argument list of ``attnkit_fwd_sm90_ws``, in the kernel's parameter order (the one place it is built)."""
    scale_log2, cap_pre, cap_post, use_cap, use_alibi = score_args(params, alibi)
    hq, hk = q.shape[2], k.shape[2]
    return [
        tma_map(q, cfg.block_m),
        tma_map(k, cfg.block_n),
        tma_map(v, cfg.block_n),
        _ptr(out),
        _ptr(lse),
        _ptr(alibi),
        *_i64(out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1)),
        *_i32(q.shape[1], k.shape[1], hq // hk, q.shape[3], alibi_sb),
        *_f32(scale_log2, cap_pre, cap_post),
        *_i32(use_cap, use_alibi, params.window_left, params.window_right),
    ]


def _launch_ws(
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
) -> None:
    args = ws_forward_args(q, k, v, out, lse, alibi, alibi_sb, params, cfg)
    spec = compiler.ModuleSpec.make(WS_SOURCE, cfg.defines(), "sm_90a")
    launch(spec, WS_KERNEL, cfg.grid(q.shape[1], q.shape[2], q.shape[0]), cfg.threads, cfg.smem_bytes, args)


def ws_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    params: AttentionParams,
    cfg: Sm90WsFwdConfig,
    alibi_slopes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The warp-specialised forward with an explicit configuration (ablations, benchmarks), dense inputs only.

    Unlike :meth:`CupyCudaBackend.forward` it does not choose: it raises when ``cfg`` cannot serve the call."""
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
    _launch_ws(_Launcher(q.device), qp, kp, vp, out, lse, alibi, alibi_sb, params, cfg)
    return (out if dp == d else out[..., :d].contiguous()), lse


def _module_arch(source: str, arch: str) -> str:
    # The wgmma kernels need the arch-specific target: wgmma does not exist in plain sm_90 code.
    return "sm_90a" if source in compiler.SM90A_SOURCES else arch


def _ptr(t: torch.Tensor | None) -> Any:
    import numpy as np

    return np.uint64(0 if t is None else t.data_ptr())


def _i64(*values: int) -> list[Any]:
    import numpy as np

    return [np.int64(v) for v in values]


def _i32(*values: int) -> list[Any]:
    import numpy as np

    for v in values:
        if not -(2**31) <= v < 2**31:
            raise InvalidArgumentError(f"value {v} does not fit the CuPy kernels' 32-bit argument")
    return [np.int32(v) for v in values]


def _f32(*values: float) -> list[Any]:
    import numpy as np

    return [np.float32(v) for v in values]


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


class _StreamHandle:
    """A raw CUDA stream handle exposed through the CUDA stream protocol (what ``Stream.from_external`` reads)."""

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.ptr)


@functools.lru_cache(maxsize=64)
def _cupy_stream(ptr: int, device: int) -> Any:
    """CuPy's view of a PyTorch stream, cached so a launch costs no wrapper construction."""
    import cupy

    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None:  # CuPy >= 14; ExternalStream is deprecated there
        with cupy.cuda.Device(device):
            return from_external(_StreamHandle(ptr))
    return cupy.cuda.ExternalStream(ptr, device)


# Kernel launches per kernel name since import: lets tests check which kernel actually served a call.
LAUNCH_COUNTS: Counter[str] = Counter()


class _Launcher:
    """Runs one kernel on PyTorch's current stream of ``device``."""

    def __init__(self, device: torch.device):
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.stream = torch.cuda.current_stream(self.index).cuda_stream

    def smem_limit(self) -> int:
        return _max_smem_optin(self.index)

    def __call__(
        self, spec: compiler.ModuleSpec, name: str, grid: tuple[int, int, int], threads: int, smem: int, args: list[Any]
    ) -> None:
        import cupy

        kern = compiler.MODULES.kernel(self.index, spec, name, smem)
        with cupy.cuda.Device(self.index), _cupy_stream(self.stream, self.index):
            kern(grid, (threads, 1, 1), tuple(args), shared_mem=smem)
        LAUNCH_COUNTS[name] += 1


class CupyCudaBackend(Backend):
    name = "cupy_cuda"
    priority = 20
    description = (
        "FlashAttention-2 style CUDA C++ kernels (mma.sync, ldmatrix, cp.async; wgmma on Hopper) "
        "compiled by NVRTC via CuPy"
    )
    capabilities = BackendCapabilities(
        device_types=frozenset({"cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16}),
        ops=frozenset({"attention", "varlen"}),
        # No "dropout": the kernels draw no mask. No "deterministic": dQ is accumulated with float atomics.
        # No "dv_ne_d": one head dim serves q, k and v.
        features=frozenset({"causal", "window", "alibi", "softcap", "gqa"}),
        vendors=frozenset({"nvidia"}),
        min_compute_capability=(8, 0),
        min_head_dim=1,
        max_head_dim=256,
        backward=True,
        backward_ops=frozenset({"attention", "varlen"}),
    )

    # ---- availability -------------------------------------------------------------------------------------
    def unavailable_reason(self) -> str | None:
        problem = _cupy_problem()
        if problem:
            return problem
        if not torch.cuda.is_available():
            return "no CUDA device is visible to PyTorch"
        if getattr(torch.version, "hip", None) is not None:
            return "PyTorch is a ROCm build; the CuPy kernels are CUDA-only"
        return None

    def extra_why_not(self, spec: AttentionSpec) -> list[str]:
        reasons: list[str] = []
        if spec.head_dim != spec.head_dim_v:
            reasons.append(f"head_dim_v={spec.head_dim_v} differs from head_dim={spec.head_dim}")
        if spec.num_heads_q > MAX_GRID_YZ or spec.batch > MAX_GRID_YZ:
            reasons.append(f"batch and heads must be <= {MAX_GRID_YZ} (CUDA grid limit)")
        if spec.device_type == "cuda" and not spec.is_hip and spec.head_dim <= 256 and torch.cuda.is_available():
            limit = _max_smem_optin(torch.cuda.current_device())
            need = fwd_config(spec.head_dim, torch.float16, limit).smem_bytes
            if spec.requires_grad:
                need = max(need, bwd_config(spec.head_dim, torch.float16, limit).smem_bytes)
            if need > limit:
                reasons.append(f"head_dim={spec.head_dim} needs {need} bytes of shared memory; this GPU allows {limit}")
        return reasons

    def info(self) -> dict[str, str]:
        problem = _cupy_problem()
        if problem:
            return {"status": problem}
        import cupy

        try:
            nvrtc = ".".join(map(str, compiler.nvrtc_version()))
        except Exception as exc:
            nvrtc = f"unavailable ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        out = {
            "cupy": cupy.__version__,
            "nvrtc": nvrtc,
            "compile options": " ".join(compiler.BASE_OPTIONS) + " --gpu-architecture=<arch> -D<tile macros>",
            "cache dir": env.cupy_cache_dir(),
        }
        if torch.cuda.is_available():
            dev = torch.cuda.current_device()
            arch = _arch(dev)
            out["arch"] = f"{arch} ({torch.cuda.get_device_name(dev)})"
            if arch == "sm_90" and env.cupy_wgmma():
                out["kernels"] = (
                    "wgmma (fwd_sm90.cu, bwd_sm90.cu; sm_90a) for kernel head dims 64/128, mma.sync otherwise"
                )
                if env.cupy_tma():
                    out["kernels"] += "; dense forward for head dims 33-128 on the warp-specialised TMA kernel "
                    out["kernels"] += "(fwd_sm90_ws.cu)"
                if env.cupy_tma_bwd():
                    out["kernels"] += "; dense backward: TMA warp-specialized bwd_sm90_ws.cu"
            else:
                out["kernels"] = "mma.sync (fwd.cu, bwd.cu)"
        return out

    # ---- kernels ----------------------------------------------------------------------------------------------
    @staticmethod
    def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: AttentionParams) -> None:
        if params.dropout_p > 0.0:
            raise BackendUnsupportedError("cupy_cuda", ["feature(s) dropout not supported"])
        if v.shape[-1] != q.shape[-1] or k.shape[-1] != q.shape[-1]:
            raise BackendUnsupportedError("cupy_cuda", ["q, k and v must share one head dim"])
        if q.shape[-2] % k.shape[-2]:
            raise InvalidArgumentError(f"query heads {q.shape[-2]} are not a multiple of key heads {k.shape[-2]}")

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        alibi_slopes: torch.Tensor | None,
        params: AttentionParams,
        varlen: VarlenInfo | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(q, k, v, params)
        d = q.shape[-1]
        launch = _Launcher(q.device)
        arch = _arch(launch.index)
        source, kernel_name, cfg = forward_kernel(d, q.dtype, arch, launch.smem_limit())
        dp = padded_head_dim(d)
        is_var = varlen is not None
        hq, hk = q.shape[-2], k.shape[-2]
        if is_var:
            batch, max_sq, max_sk = varlen.batch, varlen.max_seqlen_q, varlen.max_seqlen_k
            total_q = q.shape[0]
            out = torch.zeros(total_q, hq, dp, dtype=q.dtype, device=q.device)
            lse = torch.full((hq, total_q), -math.inf, dtype=torch.float32, device=q.device)
            lse_strides = (0, total_q)
            cu_q, cu_k = varlen.cu_seqlens_q.to(torch.int32), varlen.cu_seqlens_k.to(torch.int32)
        else:
            batch, max_sq, hq = q.shape[0], q.shape[1], q.shape[2]
            max_sk = k.shape[1]
            out = torch.empty(batch, max_sq, hq, dp, dtype=q.dtype, device=q.device)
            lse = torch.empty(batch, hq, max_sq, dtype=torch.float32, device=q.device)
            lse_strides = (hq * max_sq, max_sq)
            cu_q = cu_k = None
        if batch == 0 or max_sq == 0 or out.numel() == 0:
            return out[..., :d], lse
        qp, kp, vp = (kernel_ready(t, dp) for t in (q, k, v))
        alibi, alibi_sb = alibi_ready(alibi_slopes)
        # Dense batches on Hopper take the warp-specialised TMA kernel; varlen keeps fwd_sm90.cu (its sequences
        # start at arbitrary rows, which a 4-D tensor map per batch entry cannot address).
        ws_cfg = None if is_var else ws_forward_config(d, q.dtype, arch, launch.smem_limit())
        if ws_cfg is not None and all(tma_ready(t) for t in (qp, kp, vp)):
            _launch_ws(launch, qp, kp, vp, out, lse, alibi, alibi_sb, params, ws_cfg)
            return (out if dp == d else out[..., :d].contiguous()), lse
        scale_log2, cap_pre, cap_post, use_cap, use_alibi = score_args(params, alibi)
        args = [
            _ptr(qp),
            _ptr(kp),
            _ptr(vp),
            _ptr(out),
            _ptr(lse),
            _ptr(cu_q),
            _ptr(cu_k),
            _ptr(alibi),
            *_i64(
                *seq_strides(qp, is_var),
                *seq_strides(kp, is_var),
                *seq_strides(vp, is_var),
                *seq_strides(out, is_var),
                *lse_strides,
            ),
            *_i32(max_sq, max_sk, hq // hk, dp, alibi_sb),
            *_f32(scale_log2, cap_pre, cap_post),
            *_i32(use_cap, use_alibi, params.window_left, params.window_right),
        ]
        spec = compiler.ModuleSpec.make(source, cfg.defines(), _module_arch(source, arch))
        launch(spec, kernel_name, cfg.grid(max_sq, hq, batch), cfg.threads, cfg.smem_bytes, args)
        return (out if dp == d else out[..., :d].contiguous()), lse

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        alibi_slopes: torch.Tensor | None,
        params: AttentionParams,
        varlen: VarlenInfo | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._check(q, k, v, params)
        d = q.shape[-1]
        launch = _Launcher(q.device)
        arch = _arch(launch.index)
        grads = self._ws_backward(launch, arch, dout, q, k, v, out, lse, alibi_slopes, params, varlen)
        if grads is not None:
            return grads
        source, kernel_name, cfg = backward_kernel(d, q.dtype, arch, launch.smem_limit())
        dp = padded_head_dim(d)
        is_var = varlen is not None
        hq, hk = q.shape[-2], k.shape[-2]
        zeros_kv = is_var  # varlen keys past cu_seqlens_k[-1] belong to no sequence and get no kernel write
        if is_var:
            batch, max_sq, max_sk = varlen.batch, varlen.max_seqlen_q, varlen.max_seqlen_k
            total_q = q.shape[0]
            lse_strides = (0, total_q)
            cu_q, cu_k = varlen.cu_seqlens_q.to(torch.int32), varlen.cu_seqlens_k.to(torch.int32)
            pre_seqlen, pre_batch = total_q, 1
        else:
            batch, max_sq, max_sk = q.shape[0], q.shape[1], k.shape[1]
            lse_strides = (hq * max_sq, max_sq)
            cu_q = cu_k = None
            pre_seqlen, pre_batch = max_sq, batch
        alloc = torch.zeros if zeros_kv else torch.empty
        dk = alloc(*k.shape[:-1], dp, dtype=q.dtype, device=q.device)
        dv = alloc(*k.shape[:-1], dp, dtype=q.dtype, device=q.device)
        dq_acc = torch.zeros(*q.shape[:-1], dp, dtype=torch.float32, device=q.device)
        if batch == 0 or q.numel() == 0 or k.numel() == 0:
            return dq_acc[..., :d].to(q.dtype), dk[..., :d].zero_(), dv[..., :d].zero_()

        qp, kp, vp, op, dop = (kernel_ready(t, dp) for t in (q, k, v, out, dout))
        lse_c = lse.to(torch.float32).contiguous()
        delta = torch.zeros_like(lse_c) if is_var else torch.empty_like(lse_c)
        spec = compiler.ModuleSpec.make(source, cfg.defines(), _module_arch(source, arch))
        # delta = rowsum(dO * O) comes from bwd.cu's pre-pass whichever main kernel runs.
        pre_spec = (
            spec
            if source == "bwd.cu"
            else compiler.ModuleSpec.make("bwd.cu", bwd_config(d, q.dtype, launch.smem_limit()).defines(), arch)
        )

        pre_args = [
            _ptr(op),
            _ptr(dop),
            _ptr(delta),
            *_i64(*seq_strides(op, is_var), *seq_strides(dop, is_var), *lse_strides),
            *_i32(pre_seqlen, hq, dp),
        ]
        launch(pre_spec, "attnkit_bwd_pre", pre_grid(pre_seqlen, hq, pre_batch), PRE_THREADS, 0, pre_args)

        alibi, alibi_sb = alibi_ready(alibi_slopes)
        scale_log2, cap_pre, cap_post, use_cap, use_alibi = score_args(params, alibi)
        args = [
            _ptr(qp),
            _ptr(kp),
            _ptr(vp),
            _ptr(dop),
            _ptr(lse_c),
            _ptr(delta),
            _ptr(dq_acc),
            _ptr(dk),
            _ptr(dv),
            _ptr(cu_q),
            _ptr(cu_k),
            _ptr(alibi),
            *_i64(
                *seq_strides(qp, is_var),
                *seq_strides(kp, is_var),
                *seq_strides(vp, is_var),
                *seq_strides(dop, is_var),
                *lse_strides,
                *seq_strides(dq_acc, is_var),
                *seq_strides(dk, is_var),
            ),
            *_i32(max_sq, max_sk, hq // hk, dp, alibi_sb),
            *_f32(params.softmax_scale, scale_log2, cap_pre, cap_post),
            *_i32(use_cap, use_alibi, params.window_left, params.window_right),
        ]
        launch(spec, kernel_name, cfg.grid(max_sk, hk, batch), cfg.threads, cfg.smem_bytes, args)
        dq = dq_acc[..., :d].to(q.dtype)
        if dp != d:
            dk, dv = dk[..., :d].contiguous(), dv[..., :d].contiguous()
        return dq, dk, dv

    # ---- warp-specialized Hopper backward (bwd_sm90_ws.cu) ---------------------------------------------------
    @staticmethod
    def _ws_backward(
        launch: _Launcher,
        arch: str,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        alibi_slopes: torch.Tensor | None,
        params: AttentionParams,
        varlen: VarlenInfo | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Gradients from the TMA warp-specialized kernel, or None when it does not apply to this call (the
        caller then runs bwd_sm90.cu / bwd.cu); nothing is written before that decision."""
        d = q.shape[-1]
        cfg = ws_bwd.ws_backward_config(d, q.dtype, arch, launch.smem_limit(), varlen is not None)
        if cfg is None or q.numel() == 0 or k.numel() == 0:
            return None
        dp = padded_head_dim(d)
        batch, sq, hq = q.shape[0], q.shape[1], q.shape[2]
        sk, hk = k.shape[1], k.shape[2]
        qp, kp, vp, op, dop = (kernel_ready(t, dp) for t in (q, k, v, out, dout))
        dq_acc = torch.zeros(*q.shape[:-1], dp, dtype=torch.float32, device=q.device)
        try:
            maps = ws_bwd.tensor_maps(cfg, qp, kp, vp, dop, dq_acc)
        except InvalidArgumentError:
            return None  # a stride or address TMA cannot describe: the cp.async kernels take any layout
        dk = torch.empty(*k.shape[:-1], dp, dtype=q.dtype, device=q.device)
        dv = torch.empty_like(dk)
        lse_p, delta_p = ws_bwd.padded_rows(cfg, lse.to(torch.float32))
        n = lse_p.shape[-1]
        pre_spec = compiler.ModuleSpec.make("bwd.cu", bwd_config(d, q.dtype, launch.smem_limit()).defines(), arch)
        pre_args = [
            _ptr(op),
            _ptr(dop),
            _ptr(delta_p),
            *_i64(*seq_strides(op, False), *seq_strides(dop, False), hq * n, n),
            *_i32(sq, hq, dp),
        ]
        launch(pre_spec, "attnkit_bwd_pre", pre_grid(sq, hq, batch), PRE_THREADS, 0, pre_args)
        alibi, alibi_sb = alibi_ready(alibi_slopes)
        args = ws_bwd.kernel_arguments(
            ws_bwd.encode_maps(maps),
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
        spec = compiler.ModuleSpec.make(ws_bwd.SOURCE, cfg.defines(), "sm_90a")
        launch(spec, ws_bwd.KERNEL, cfg.grid(sk, hk, batch), cfg.threads, cfg.smem_bytes, args)
        dq = dq_acc[..., :d].to(q.dtype)
        if dp != d:
            dk, dv = dk[..., :d].contiguous(), dv[..., :d].contiguous()
        return dq, dk, dv
