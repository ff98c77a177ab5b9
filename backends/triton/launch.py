"""Host side of the attention kernels (forward, backward, piecewise): problem shapes, arguments, grids,
output allocation and the launches. Tile choice lives in :mod:`.tuning`, TMA checks in :mod:`.tma`, launch plans
(repeated calls without triton's JIT dispatch) in :mod:`.fastpath`, device helpers in :mod:`.device`.

Imported only when a Triton backend actually runs, after ``TRITON_INTERPRET`` has been decided, because triton
reads that variable when the kernels are decorated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton

from attnkit import env
from attnkit.params import AttentionParams, VarlenInfo

from . import configs, device, fastpath, probes, tma, tuning
from .bwd_kernel import (
    attn_bwd_dkdv,
    attn_bwd_dkdv_length_one,
    attn_bwd_dq,
    attn_bwd_dq_length_one,
    attn_bwd_preprocess,
)
from .fwd_kernel import attn_fwd, attn_fwd_length_one

_INT32_LIMIT = 2**31 - 1
FP32_DOT_PRECISION = "tf32x3"  # see dot_precision()


@dataclass(frozen=True)
class Problem:
    batch: int
    heads_q: int
    heads_k: int
    seqlen_q: int  # max over sequences for varlen
    seqlen_k: int
    head_dim: int
    head_dim_v: int
    varlen: VarlenInfo | None

    @property
    def block_d(self) -> int:
        return configs.head_block(self.head_dim)

    @property
    def block_dv(self) -> int:
        return configs.head_block(self.head_dim_v)


def problem_of(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, varlen: VarlenInfo | None) -> Problem:
    if varlen is None:
        return Problem(q.shape[0], q.shape[2], k.shape[2], q.shape[1], k.shape[1], q.shape[3], v.shape[3], None)
    return Problem(
        varlen.batch, q.shape[1], k.shape[1], varlen.max_seqlen_q, varlen.max_seqlen_k, q.shape[2], v.shape[2], varlen
    )


def strides(t: torch.Tensor, varlen: VarlenInfo | None) -> tuple[int, int, int, int]:
    """(batch, row, head, dim) strides; varlen tensors have no batch dimension (rows are global)."""
    if varlen is None:
        return t.stride(0), t.stride(1), t.stride(2), t.stride(3)
    return 0, t.stride(0), t.stride(1), t.stride(2)


def lse_strides(lse: torch.Tensor, varlen: VarlenInfo | None) -> tuple[int, int, int]:
    if varlen is None:
        return lse.stride(0), lse.stride(1), lse.stride(2)
    return 0, lse.stride(0), lse.stride(1)


def needs_idx64(prob: Problem, tensors: list[torch.Tensor]) -> bool:
    """Whether offsets inside one (sequence, head) slice can pass int32.

    Batch, head and varlen sequence-start offsets are always computed in int64; what remains is
    ``row * row_stride + col * col_stride`` within one sequence (dense row stride is dim 1, varlen dim 0).
    """
    longest = max(prob.seqlen_q, prob.seqlen_k, 1)
    row_dim = 1 if prob.varlen is None else 0
    return any(longest * abs(t.stride(row_dim)) + t.shape[-1] * abs(t.stride(-1)) > _INT32_LIMIT for t in tensors)


def tma_eligible(prob: Problem, tensors: list[torch.Tensor]) -> bool:
    return tma.eligible(max(prob.block_d, prob.block_dv), prob.head_dim, prob.head_dim_v, tensors)


def _flags(
    prob: Problem, params: AttentionParams, alibi: torch.Tensor | None, piecewise: bool, idx64: bool, dtype: torch.dtype
) -> dict[str, object]:
    return {
        "HEAD_DIM": prob.head_dim,
        "HEAD_DIM_V": prob.head_dim_v,
        "BLOCK_D": prob.block_d,
        "BLOCK_DV": prob.block_dv,
        "VARLEN": prob.varlen is not None,
        "HAS_WL": params.window_left >= 0,
        "HAS_WR": params.window_right >= 0,
        "SOFTCAP": params.softcap > 0,
        "ALIBI": alibi is not None,
        "DROPOUT": params.dropout_p > 0,
        "PIECEWISE": piecewise,
        "UPCAST": device.interpreted(),
        "DOT_PREC": dot_precision(dtype),
        "IDX64": idx64,
    }


def dot_precision(dtype: torch.dtype) -> str:
    """float32 products close to full precision; 16-bit inputs ignore the setting.

    On NVIDIA tensor cores "tf32x3" splits each operand into two tf32 parts (error ~2^-22, like fp32 rounding);
    plain "ieee" dots run on CUDA cores and spill registers at useful tile sizes. The interpreter and ROCm use
    "ieee".
    """
    if dtype != torch.float32:
        return "tf32"
    return "ieee" if device.interpreted() or probes.hip_build() else FP32_DOT_PRECISION


def scalars(prob: Problem, params: AttentionParams, dist_threshold: int) -> dict[str, object]:
    """The scalar arguments every attention kernel takes, by parameter name."""
    return {
        "num_heads_q": prob.heads_q,
        "group": prob.heads_q // prob.heads_k,
        "seqlen_q": prob.seqlen_q,
        "seqlen_k": prob.seqlen_k,
        "sm_scale": float(params.softmax_scale),
        "softcap": float(params.softcap),
        "window_left": int(params.window_left),
        "window_right": int(params.window_right),
        "dropout_p": float(params.dropout_p),
        "seed": int(params.dropout_seed),
        "dist_threshold": int(dist_threshold),
    }


def named_strides(prefix: str, rows: str, t: torch.Tensor, varlen: VarlenInfo | None) -> dict[str, int]:
    """``{prefix}b``, ``{prefix}{rows}``, ``{prefix}h``, ``{prefix}d``: the kernels' names of a tensor's strides."""
    sb, sr, sh, sd = strides(t, varlen)
    return {f"{prefix}b": sb, f"{prefix}{rows}": sr, f"{prefix}h": sh, f"{prefix}d": sd}


def named_lse_strides(lse: torch.Tensor, varlen: VarlenInfo | None) -> dict[str, int]:
    slb, slh, slm = lse_strides(lse, varlen)
    return {"slb": slb, "slh": slh, "slm": slm}


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output the kernels fill completely comes from here (tests poison it with NaN). The sizes go unpacked:
    torch parses them ~1.5 us faster per call than a tuple (benchmarks/results/h200_2026-12-02_s4/alloc_costs.txt)."""
    return torch.empty(*shape, dtype=dtype, device=device) if shape else torch.empty(shape, dtype=dtype, device=device)


def cu_seqlens(varlen: VarlenInfo | None, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if varlen is None:
        return q, q  # never read: VARLEN is off
    return varlen.cu_seqlens_q, varlen.cu_seqlens_k


def slopes_of(alibi: torch.Tensor | None, q: torch.Tensor) -> tuple[torch.Tensor, int]:
    if alibi is None:
        return q, 0
    return alibi, (alibi.stride(0) if alibi.dim() == 2 else 0)


# Forward launch plans (see :mod:`.fastpath`): dense and varlen calls without dropout (whose seed, an integer
# argument, changes every call), piecewise or sink (rare; a tensor past the plan's per-call ones). A plan keeps the tile
# chosen on its first call: forced_tiles() bypasses the plans, and clearing tuning.tuned does not clear them.
_FWD_LEAD = ("Q", "K", "V", "Q2", "K2", "Out", "Lse", "Slopes", "CuQ", "CuK")  # per-call tensors of a plan


@dataclass(frozen=True)
class FwdPlan:
    launch: fastpath.Launcher
    out_shape: tuple[int, ...]
    lse_shape: tuple[int, ...]
    varlen: bool  # outputs start defined (0, -inf): rows past cu_seqlens_q[-1] are never written


fwd_plans: fastpath.Plans[FwdPlan] = fastpath.Plans()


def fwd_plan_key(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alibi: torch.Tensor | None,
    params: AttentionParams,
    vendor: str,
    varlen: VarlenInfo | None = None,
) -> tuple:
    """Everything a forward launch depends on besides the tensor addresses (see fastpath)."""
    meta = fastpath.meta
    lengths = None
    if varlen is not None:
        lengths = (meta(varlen.cu_seqlens_q), meta(varlen.cu_seqlens_k), varlen.max_seqlen_q, varlen.max_seqlen_k)
    return (meta(q), meta(k), meta(v), meta(alibi), lengths, params, vendor, env.triton_autotune())


def _fwd_outputs(q: torch.Tensor, out_shape: tuple[int, ...], lse_shape: tuple[int, ...], varlen: bool):
    if not varlen:
        return empty(out_shape, q.dtype, q.device), empty(lse_shape, torch.float32, q.device)
    # Rows past cu_seqlens_q[-1] belong to no sequence and are never written: define them (no key: 0, -inf).
    out = torch.zeros(out_shape, dtype=q.dtype, device=q.device)
    return out, torch.full(lse_shape, float("-inf"), dtype=torch.float32, device=q.device)


def fwd_arguments(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q2: torch.Tensor,
    k2: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    alibi: torch.Tensor | None,
    varlen: VarlenInfo | None,
    prob: Problem,
    params: AttentionParams,
    dist_threshold: int,
    sink: torch.Tensor | None,
    flags: dict[str, object],
) -> dict[str, object]:
    """attn_fwd's arguments by name, but for the tile's (see fwd_launch)."""
    slopes, ssb = slopes_of(alibi, q)
    cu_q, cu_k = cu_seqlens(varlen, q)
    return {
        "Q": q, "K": k, "V": v, "Q2": q2, "K2": k2, "Out": out, "Lse": lse, "Slopes": slopes, "CuQ": cu_q,
        "CuK": cu_k,
        **named_strides("sq", "m", q, varlen), **named_strides("sk", "n", k, varlen),
        **named_strides("sv", "n", v, varlen), **named_strides("sq2", "m", q2, varlen),
        **named_strides("sk2", "n", k2, varlen), **named_strides("so", "m", out, varlen),
        **named_lse_strides(lse, varlen), "ssb": ssb,
        **scalars(prob, params, dist_threshold), "batch": prob.batch,
        "Sink": sink,  # None (a constexpr to triton) without a sink
        **flags,
    }  # fmt: skip


def launch_args(kernel: object, values: dict[str, object], tile: configs.Tile) -> tuple[tuple, dict[str, object]]:
    """The full positional arguments of ``kernel`` (checked against its signature) and its launch options."""
    meta, options = fastpath.split_options(kernel, tile.launch_kwargs())
    return fastpath.arguments(kernel, {**values, **meta}), options


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alibi: torch.Tensor | None,
    params: AttentionParams,
    varlen: VarlenInfo | None,
    vendor: str,
    q2: torch.Tensor | None = None,
    k2: torch.Tensor | None = None,
    dist_threshold: int = 0,
    sink: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    plan_key = None
    if q2 is None and sink is None and params.dropout_p == 0.0 and fastpath.enabled():
        plan_key = fwd_plan_key(q, k, v, alibi, params, vendor, varlen)
        plan = fwd_plans.get(plan_key)
        if plan is not None:
            out, lse = _fwd_outputs(q, plan.out_shape, plan.lse_shape, plan.varlen)
            if out.data_ptr() % 16 == 0 and lse.data_ptr() % 16 == 0:
                cu_q, cu_k = (q, q) if varlen is None else (varlen.cu_seqlens_q, varlen.cu_seqlens_k)
                plan.launch(q, k, v, q, k, out, lse, q if alibi is None else alibi, cu_q, cu_k)
                return out, lse
            plan_key = None
    prob = problem_of(q, k, v, varlen)
    piecewise = q2 is not None
    q2_, k2_ = (q2, k2) if piecewise else (q, k)
    if varlen is None:
        out_shape, lse_shape = (prob.batch, prob.seqlen_q, prob.heads_q, prob.head_dim_v), (prob.batch, prob.heads_q,
                                                                                             prob.seqlen_q)  # fmt: skip
    else:
        out_shape, lse_shape = (q.shape[0], prob.heads_q, prob.head_dim_v), (prob.heads_q, q.shape[0])
    out, lse = _fwd_outputs(q, out_shape, lse_shape, varlen is not None)
    if out.numel() == 0:
        return out, lse
    idx64 = needs_idx64(prob, [q, k, v, q2_, k2_, out])
    use_tma = vendor == "nvidia" and not piecewise and not idx64 and tma_eligible(prob, [k, v])
    flags = {**_flags(prob, params, alibi, piecewise, idx64, q.dtype), "SINK": sink is not None}
    values = fwd_arguments(q, k, v, q2_, k2_, out, lse, alibi, varlen, prob, params, dist_threshold, sink, flags)

    def grid_of(tile: configs.Tile) -> tuple[int]:
        tiles = triton.cdiv(prob.seqlen_q, tile.block_m) * prob.batch * prob.heads_q
        if tile.persistent:
            tiles = min(tiles, tile.persistent * device.sm_count(q.device))
        return (tiles,)

    kernel = attn_fwd_length_one if 1 in (prob.seqlen_q, prob.seqlen_k) else attn_fwd

    def launch_with(tile: configs.Tile) -> object:
        args, options = launch_args(kernel, values, tile)
        return kernel[grid_of(tile)](*args, **options)

    with device.on_device(q), tma.scratch(use_tma):
        tile = tuning.tile_for("fwd", vendor, prob, q.dtype, use_tma, flags, launch_with)
        compiled = launch_with(tile)
    if plan_key is not None and fastpath.aligned(out) and fastpath.aligned(lse):
        _remember_fwd(kernel, plan_key, compiled, grid_of(tile), launch_args(kernel, values, tile)[0], q, use_tma,
                      out, lse, varlen is not None)  # fmt: skip
    return out, lse


def forward_runner(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: AttentionParams, vendor: str,
                   keep_lse: bool) -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:  # fmt: skip
    """The forward plan of this dense call (just made by :func:`forward`) bound for the frontend's repeated calls
    (Backend.forward_runner): ``run(q, k, v)`` allocates ``out`` and launches. When the caller drops the lse
    (``keep_lse`` False), every call writes it into one buffer kept with the runner (fastpath.lse_scratch).
    Forced tiles send calls back to :func:`forward`."""
    if params.dropout_p or not fastpath.enabled():
        return None
    plan = fwd_plans.get(fwd_plan_key(q, k, v, None, params, vendor, None))
    if plan is None or plan.varlen:
        return None
    launch, out_shape, lse_shape = plan.launch, plan.out_shape, plan.lse_shape
    dtype, where = q.dtype, q.device
    scratch = None if keep_lse else fastpath.lse_scratch(lse_shape, where)

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tuning.any_forced():
            return forward(q, k, v, None, params, None, vendor)
        out = empty(out_shape, dtype, where)
        lse = empty(lse_shape, torch.float32, where) if scratch is None else scratch
        if out.data_ptr() & 15 or lse.data_ptr() & 15:
            return forward(q, k, v, None, params, None, vendor)
        launch(q, k, v, q, k, out, lse, q, q, q)
        return out, lse

    return run


def _remember_fwd(kernel: object, key: tuple, compiled: object, grid: tuple[int, ...], args: tuple, q: torch.Tensor,
                  use_tma: bool, out: torch.Tensor, lse: torch.Tensor, varlen: bool) -> None:  # fmt: skip
    if fastpath.leading(kernel, len(_FWD_LEAD)) != _FWD_LEAD:
        return  # a kernel whose leading parameters changed: no plan rather than a wrong one
    launcher = fastpath.bind(kernel, compiled, grid, args[len(_FWD_LEAD) :], q.device, use_tma)
    if launcher is not None:
        fwd_plans.put(key, FwdPlan(launcher, tuple(out.shape), tuple(lse.shape), varlen))


# Backward launch plans: the three kernels of a dense or varlen backward without dropout or piecewise inputs, bound
# once (the preprocess, dK/dV and dQ launchers). Their leading parameters are the per-call tensors.
_PRE_LEAD = ("Out", "DO", "Delta", "CuQ")
_DKDV_LEAD = ("Q", "K", "V", "Q2", "K2", "DO", "Lse", "Delta", "DK", "DV", "DK2", "Slopes", "CuQ", "CuK")
_DQ_LEAD = ("Q", "K", "V", "Q2", "K2", "DO", "Lse", "Delta", "DQ", "DQ2", "Slopes", "CuQ", "CuK")


@dataclass(frozen=True)
class BwdPlan:
    preprocess: fastpath.Launcher
    dkdv: fastpath.Launcher
    dq: fastpath.Launcher


bwd_plans: fastpath.Plans[BwdPlan] = fastpath.Plans()


def bwd_plan_key(tensors: tuple[torch.Tensor | None, ...], params: AttentionParams, vendor: str,
                 varlen: VarlenInfo | None) -> tuple:  # fmt: skip
    """Everything a backward launch depends on besides the addresses of ``tensors`` (dout, q, k, v, out, lse,
    alibi; see fastpath)."""
    meta = fastpath.meta
    lengths = None
    if varlen is not None:
        lengths = (meta(varlen.cu_seqlens_q), meta(varlen.cu_seqlens_k), varlen.max_seqlen_q, varlen.max_seqlen_k)
    return (*map(meta, tensors), lengths, params, vendor, env.triton_autotune())


def _grad_buffers(*like: torch.Tensor, varlen: bool) -> tuple[torch.Tensor, ...]:
    """One gradient buffer per tensor. Varlen padding rows (past cu_seqlens[-1]) get no program, so their
    gradients start at zero."""
    if varlen:
        return tuple(torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in like)
    return tuple(empty(t.shape, t.dtype, t.device) for t in like)


def _planned_backward(plan: BwdPlan, dout, q, k, v, out, lse, alibi, varlen) -> tuple[torch.Tensor, ...] | None:
    """A repeated backward through its plan, or None when a fresh buffer is not 16-byte aligned (the plan's
    kernels were specialised on aligned pointers)."""
    dq, dk, dv = _grad_buffers(q, k, v, varlen=varlen is not None)
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    if not all(fastpath.aligned(t) for t in (dq, dk, dv, lse, delta)):
        return None
    slopes = q if alibi is None else alibi
    cu_q, cu_k = cu_seqlens(varlen, q)
    plan.preprocess(out, dout, delta, cu_q)
    plan.dkdv(q, k, v, q, k, dout, lse, delta, dk, dv, dk, slopes, cu_q, cu_k)
    plan.dq(q, k, v, q, k, dout, lse, delta, dq, dq, slopes, cu_q, cu_k)
    return dq, dk, dv


def backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    alibi: torch.Tensor | None,
    params: AttentionParams,
    varlen: VarlenInfo | None,
    vendor: str,
    q2: torch.Tensor | None = None,
    k2: torch.Tensor | None = None,
    dist_threshold: int = 0,
) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv), or (dq1, dk1, dq2, dk2, dv) for piecewise attention."""
    plan_key = None
    if q2 is None and params.dropout_p == 0.0 and q.numel() and k.numel() and fastpath.enabled():
        plan_key = bwd_plan_key((dout, q, k, v, out, lse, alibi), params, vendor, varlen)
        plan = bwd_plans.get(plan_key)
        if plan is not None:
            grads = _planned_backward(plan, dout, q, k, v, out, lse, alibi, varlen)
            if grads is not None:
                return grads
            plan_key = None
    prob = problem_of(q, k, v, varlen)
    piecewise = q2 is not None
    q2_, k2_ = (q2, k2) if piecewise else (q, k)
    dq, dk, dv = _grad_buffers(q, k, v, varlen=varlen is not None)
    dq2, dk2 = _grad_buffers(q, k, varlen=varlen is not None) if piecewise else (dq, dk)
    grads = (dq, dk, dq2, dk2, dv) if piecewise else (dq, dk, dv)
    if q.numel() == 0 or k.numel() == 0:
        for g in grads:
            g.zero_()
        return grads
    # Delta shares lse's strides inside the kernels; lse is tiny, so a dense copy of an odd view costs nothing.
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    idx64 = needs_idx64(prob, [q, k, v, q2_, k2_, out, dout, dq, dk, dv])
    slopes, ssb = slopes_of(alibi, q)
    cu_q, cu_k = cu_seqlens(varlen, q)
    flags = _flags(prob, params, alibi, piecewise, idx64, q.dtype)
    use_tma = vendor == "nvidia" and not piecewise and not idx64 and tma_eligible(prob, [q, k, v, dout])
    pre_m = configs.INTERPRETER_TILES["dq"].block_m if device.interpreted() else configs.PREPROCESS_BLOCK_M
    common = {
        "Q": q, "K": k, "V": v, "Q2": q2_, "K2": k2_, "DO": dout, "Lse": lse, "Delta": delta, "Slopes": slopes,
        "CuQ": cu_q, "CuK": cu_k,
        **named_strides("sq", "m", q, varlen), **named_strides("sk", "n", k, varlen),
        **named_strides("sv", "n", v, varlen), **named_strides("sq2", "m", q2_, varlen),
        **named_strides("sk2", "n", k2_, varlen), **named_strides("sdo", "m", dout, varlen),
        **named_lse_strides(lse, varlen), "ssb": ssb, **scalars(prob, params, dist_threshold), **flags,
    }  # fmt: skip
    dkdv_values = {
        **common, "DK": dk, "DV": dv, "DK2": dk2, **named_strides("sdk", "n", dk, varlen),
        **named_strides("sdv", "n", dv, varlen), **named_strides("sdk2", "n", dk2, varlen),
    }  # fmt: skip
    dq_values = {**common, "DQ": dq, "DQ2": dq2, **named_strides("sdq", "m", dq, varlen),
                 **named_strides("sdq2", "m", dq2, varlen)}  # fmt: skip
    pre_values = {
        "Out": out, "DO": dout, "Delta": delta, "CuQ": cu_q, **named_strides("so", "m", out, varlen),
        **named_strides("sd", "m", dout, varlen), **named_lse_strides(delta, varlen), "num_heads_q": prob.heads_q,
        "seqlen_q": prob.seqlen_q, "BLOCK_M": pre_m, "HEAD_DIM_V": prob.head_dim_v, "BLOCK_DV": prob.block_dv,
        "VARLEN": varlen is not None,
    }  # fmt: skip
    pre_grid = (triton.cdiv(prob.seqlen_q, pre_m) * prob.batch * prob.heads_q,)
    pre_args = fastpath.arguments(attn_bwd_preprocess, pre_values)

    def dkdv_grid(tile: configs.Tile) -> tuple[int]:
        return (triton.cdiv(prob.seqlen_k, tile.block_n) * prob.batch * prob.heads_k,)

    def dq_grid(tile: configs.Tile) -> tuple[int]:
        return (triton.cdiv(prob.seqlen_q, tile.block_m) * prob.batch * prob.heads_q,)

    length_one = 1 in (prob.seqlen_q, prob.seqlen_k)  # see bwd_kernel.attn_bwd_dkdv_length_one
    dkdv_kernel = attn_bwd_dkdv_length_one if length_one else attn_bwd_dkdv
    dq_kernel = attn_bwd_dq_length_one if length_one else attn_bwd_dq

    def dkdv_with(tile: configs.Tile) -> object:
        args, options = launch_args(dkdv_kernel, dkdv_values, tile)
        return dkdv_kernel[dkdv_grid(tile)](*args, **options)

    def dq_with(tile: configs.Tile) -> object:
        args, options = launch_args(dq_kernel, dq_values, tile)
        return dq_kernel[dq_grid(tile)](*args, **options)

    with device.on_device(q), tma.scratch(use_tma):
        pre_compiled = attn_bwd_preprocess[pre_grid](*pre_args)
        dkdv_tile = tuning.tile_for("dkdv", vendor, prob, q.dtype, use_tma, flags, dkdv_with)
        dkdv_compiled = dkdv_with(dkdv_tile)
        dq_tile = tuning.tile_for("dq", vendor, prob, q.dtype, use_tma, flags, dq_with)
        dq_compiled = dq_with(dq_tile)
    if plan_key is not None and all(fastpath.aligned(t) for t in (dq, dk, dv, lse, delta)):
        launches = (
            (attn_bwd_preprocess, pre_compiled, pre_grid, pre_args, _PRE_LEAD, False),
            (dkdv_kernel, dkdv_compiled, dkdv_grid(dkdv_tile), launch_args(dkdv_kernel, dkdv_values, dkdv_tile)[0],
             _DKDV_LEAD, use_tma),
            (dq_kernel, dq_compiled, dq_grid(dq_tile), launch_args(dq_kernel, dq_values, dq_tile)[0], _DQ_LEAD,
             use_tma),
        )  # fmt: skip
        _remember_bwd(plan_key, launches, q.device)
    return grads


def _remember_bwd(key: tuple, launches: tuple[tuple, ...], dev: torch.device) -> None:
    launchers = []
    for kernel, compiled, grid, args, lead, uses_tma in launches:
        if fastpath.leading(kernel, len(lead)) != lead:
            return  # a kernel whose leading parameters changed: no plan rather than a wrong one
        launcher = fastpath.bind(kernel, compiled, grid, args[len(lead) :], dev, uses_tma)
        if launcher is None:
            return
        launchers.append(launcher)
    bwd_plans.put(key, BwdPlan(*launchers))


# The public way to force tiles (tests, sweeps, fuzzing): see tuning.forced_tiles.
forced_tiles = tuning.forced_tiles
