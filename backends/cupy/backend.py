"""The ``cupy_cuda`` backend: FlashAttention-2 style CUDA C++ kernels compiled at run time by NVRTC via CuPy.

Importing this module needs neither CuPy nor a GPU; both are looked up when the backend is first asked
whether it can run. Tensors reach the kernels zero-copy as raw pointers plus strides in elements, and every
launch goes onto PyTorch's current stream of the tensors' device.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import torch

from attnkit import env
from attnkit.errors import BackendUnsupportedError, InvalidArgumentError
from attnkit.fp8 import FEATURE as FP8_FEATURE
from attnkit.fp8 import FP8_DTYPE, Fp8Scales
from attnkit.params import AttentionParams, VarlenInfo
from attnkit.registry import Backend, BackendCapabilities
from attnkit.spec import AttentionSpec

from . import compiler, config, ws_bwd, ws_fwd
from .args import alibi_ready, backward_args, forward_args, kernel_ready
from .config import (
    MAX_GRID_YZ,
    BwdConfig,
    FwdConfig,
    Sm90BwdConfig,
    Sm90FwdConfig,
    bwd_config,
    fwd_config,
    padded_head_dim,
    sm90_bwd_config,
    sm90_fwd_config,
)
from .launcher import Launcher, max_smem_optin
from .pre_pass import launch_backward_pre

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


def _module_arch(source: str, arch: str) -> str:
    # The wgmma kernels need the arch-specific target: wgmma does not exist in plain sm_90 code.
    return "sm_90a" if source in compiler.SM90A_SOURCES else arch


class CupyCudaBackend(Backend):
    name = "cupy_cuda"
    priority = 20
    description = (
        "FlashAttention-2 style CUDA C++ kernels (mma.sync, ldmatrix, cp.async; wgmma on Hopper) "
        "compiled by NVRTC via CuPy"
    )
    capabilities = BackendCapabilities(
        device_types=frozenset({"cuda"}),
        # float8_e4m3fn: the fp8 forward of dense calls on Hopper (extra_why_not says where it runs).
        dtypes=frozenset({torch.float16, torch.bfloat16, FP8_DTYPE}),
        ops=frozenset({"attention", "varlen"}),
        # No "dropout": the kernels draw no mask. No "deterministic": dQ is accumulated with float atomics.
        # No "dv_ne_d": one head dim serves q, k and v.
        features=frozenset({"causal", "window", "alibi", "softcap", "gqa", FP8_FEATURE}),
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
        if FP8_FEATURE in spec.features:
            reasons.extend(self._fp8_why_not(spec))
        if spec.device_type == "cuda" and not spec.is_hip and spec.head_dim <= 256 and torch.cuda.is_available():
            limit = max_smem_optin(torch.cuda.current_device())
            need = fwd_config(spec.head_dim, torch.float16, limit).smem_bytes
            if spec.requires_grad:
                need = max(need, bwd_config(spec.head_dim, torch.float16, limit).smem_bytes)
            if need > limit:
                reasons.append(f"head_dim={spec.head_dim} needs {need} bytes of shared memory; this GPU allows {limit}")
        return reasons

    @staticmethod
    def _fp8_why_not(spec: AttentionSpec) -> list[str]:
        """Where the fp8 forward (fwd_sm90_ws.cu on e4m3 wgmma) runs: dense calls on Hopper, head dims that are
        multiples of 16 up to 128, with wgmma and TMA allowed."""
        reasons = []
        if spec.op != "attention":
            reasons.append(f"fp8 runs dense attention calls only (got {spec.op}; triton_cuda serves fp8 varlen)")
        cc = spec.compute_capability
        if spec.device_type == "cuda" and cc is not None and cc[0] != 9:
            reasons.append(f"fp8 needs a Hopper GPU (sm_90a wgmma), this GPU is {cc[0]}.{cc[1]}")
        mult, top = config.FP8_WS_HEAD_DIM_MULTIPLE, config.FP8_WS_HEAD_DIM
        if spec.head_dim % mult or spec.head_dim > top:
            reasons.append(f"fp8 head_dim={spec.head_dim}; allowed: multiples of {mult} up to {top}")
        if not env.cupy_wgmma() or not env.cupy_tma():
            reasons.append("fp8 needs the wgmma and TMA kernels (ATTNKIT_CUPY_WGMMA / ATTNKIT_CUPY_TMA are off)")
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
                if env.cupy_tma():
                    out["kernels"] += "; fp8 forward (dense, head dims 16-128) on fwd_sm90_ws.cu with e4m3 wgmma"
            else:
                out["kernels"] = "mma.sync (fwd.cu, bwd.cu)"
        return out

    # ---- kernels ----------------------------------------------------------------------------------------------
    @staticmethod
    def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: AttentionParams) -> None:
        """The kernels' own preconditions, for direct calls of :meth:`forward` / :meth:`backward`.

        Through ``attnkit.attention`` none of these can fail (the capabilities refuse dropout and
        head_dim_v != head_dim, validation refuses a GQA group that does not divide): past them a kernel would
        silently drop the dropout or read outside v or the key heads."""
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
        launch = Launcher(q.device)
        arch = _arch(launch.index)
        source, kernel_name, cfg = forward_kernel(d, q.dtype, arch, launch.smem_limit())
        dp = padded_head_dim(d)
        is_var = varlen is not None
        hq = q.shape[-2]
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
        ws_cfg = None if is_var else ws_fwd.ws_forward_config(d, q.dtype, arch, launch.smem_limit(), max_sk)
        if ws_cfg is not None and all(ws_fwd.tma_ready(t) for t in (qp, kp, vp)):
            ws_fwd.launch_ws(launch, qp, kp, vp, out, lse, alibi, alibi_sb, params, ws_cfg)
            return (out if dp == d else out[..., :d].contiguous()), lse
        args = forward_args(qp, kp, vp, out, lse, lse_strides, cu_q, cu_k, alibi, alibi_sb, max_sq, max_sk, dp, params)
        spec = compiler.ModuleSpec.make(source, cfg.defines(), _module_arch(source, arch))
        launch(spec, kernel_name, cfg.grid(max_sq, hq, batch), cfg.threads, cfg.smem_bytes, args)
        return (out if dp == d else out[..., :d].contiguous()), lse

    def forward_fp8(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        alibi_slopes: torch.Tensor | None,
        params: AttentionParams,
        varlen: VarlenInfo | None,
        scales: Fp8Scales,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(q, k, v, params)
        launch = Launcher(q.device)
        arch = _arch(launch.index)
        cfg = ws_fwd.fp8_forward_config(q.shape[-1], scales.out_dtype, arch, launch.smem_limit())
        if varlen is not None or cfg is None:
            raise BackendUnsupportedError(
                "cupy_cuda",
                [f"the fp8 forward runs dense calls on sm_90 with head dims that are multiples of 16 up to 128 "
                 f"(got {'varlen' if varlen is not None else 'dense'}, {arch}, head_dim={q.shape[-1]})"],
            )  # fmt: skip
        return ws_fwd.fp8_forward(launch, arch, q, k, v, alibi_slopes, params, scales, cfg)

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
        launch = Launcher(q.device)
        arch = _arch(launch.index)
        grads = ws_bwd.ws_backward(launch, arch, dout, q, k, v, out, lse, alibi_slopes, params, varlen is not None)
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
        if batch == 0 or q.numel() == 0 or k.numel() == 0:
            return torch.zeros(q.shape, dtype=q.dtype, device=q.device), dk[..., :d].zero_(), dv[..., :d].zero_()
        dq_acc = torch.empty(*q.shape[:-1], dp, dtype=torch.float32, device=q.device)  # zeroed by the pre-pass

        qp, kp, vp, op, dop = (kernel_ready(t, dp) for t in (q, k, v, out, dout))
        lse_c = lse.to(torch.float32).contiguous()
        delta = torch.zeros_like(lse_c) if is_var else torch.empty_like(lse_c)
        spec = compiler.ModuleSpec.make(source, cfg.defines(), _module_arch(source, arch))
        # delta = rowsum(dO * O) comes from bwd.cu's pre-pass whichever main kernel runs.
        launch_backward_pre(launch, arch, op, dop, delta, dq_acc, is_var, lse_strides, pre_seqlen, hq, pre_batch, dp)

        alibi, alibi_sb = alibi_ready(alibi_slopes)
        args = backward_args(
            qp, kp, vp, dop, lse_c, delta, lse_strides, dq_acc, dk, dv, cu_q, cu_k, alibi, alibi_sb, max_sq, max_sk,
            dp, params,
        )  # fmt: skip
        launch(spec, kernel_name, cfg.grid(max_sk, hk, batch), cfg.threads, cfg.smem_bytes, args)
        dq = dq_acc[..., :d].to(q.dtype)
        if dp != d:
            dk, dv = dk[..., :d].contiguous(), dv[..., :d].contiguous()
        return dq, dk, dv
