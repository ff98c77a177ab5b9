"""Host side of the Triton kernels: strides, grids, tile choice (fixed or autotuned) and output allocation.

Imported only when a Triton backend actually runs, after ``TRITON_INTERPRET`` has been decided, because triton
reads that variable when the kernels are decorated.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import triton

from attnkit import env
from attnkit.errors import AttnkitError, BackendCompileError
from attnkit.params import AttentionParams, VarlenInfo

from . import configs, probes
from .bwd_kernel import attn_bwd_dkdv, attn_bwd_dq, attn_bwd_preprocess
from .fwd_kernel import attn_fwd

_INT32_LIMIT = 2**31 - 1
FP32_DOT_PRECISION = "tf32x3"  # see dot_precision()

# Tuned tile per (kernel, vendor, dtype, TMA, sequence-length bucket, kernel flags incl. head dims).
_tuned: dict[tuple, configs.Tile] = {}


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
        return max(16, triton.next_power_of_2(self.head_dim))

    @property
    def block_dv(self) -> int:
        return max(16, triton.next_power_of_2(self.head_dim_v))


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


_SM_COUNT: dict[int, int] = {}
INTERPRETER_SM_COUNT = 2  # persistent grids under the interpreter: few programs, each walking many tiles


def _sm_count(device: torch.device) -> int:
    """Multiprocessors of ``device`` (persistent grids); a small fixed number for the interpreter."""
    if device.type != "cuda":
        return INTERPRETER_SM_COUNT
    index = device.index if device.index is not None else torch.cuda.current_device()
    count = _SM_COUNT.get(index)
    if count is None:
        count = _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return count


def _needs_idx64(prob: Problem, tensors: list[torch.Tensor]) -> bool:
    """Whether offsets inside one (sequence, head) slice can pass int32.

    Batch, head and varlen sequence-start offsets are always computed in int64; what remains is
    ``row * row_stride + col * col_stride`` within one sequence (dense row stride is dim 1, varlen dim 0).
    """
    longest = max(prob.seqlen_q, prob.seqlen_k, 1)
    row_dim = 1 if prob.varlen is None else 0
    return any(longest * abs(t.stride(row_dim)) + t.shape[-1] * abs(t.stride(-1)) > _INT32_LIMIT for t in tensors)


@contextlib.contextmanager
def _on_device(t: torch.Tensor) -> Iterator[None]:
    if t.device.type == "cuda":
        with torch.cuda.device(t.device):
            yield
    else:
        yield


def _interpreted() -> bool:
    interpreted = probes.kernels_interpreted()
    if interpreted != probes.interpreter_enabled():
        raise AttnkitError(
            "the Triton kernels were imported with TRITON_INTERPRET="
            f"{'1' if interpreted else 'unset'} but it is now {'1' if probes.interpreter_enabled() else 'unset'}; "
            "triton reads it once, when the kernels are decorated: set it before the first Triton attention call"
        )
    return interpreted


# Tiles forced by forced_tiles(): kind -> Tile. Consulted before everything else, the interpreter included.
_forced: dict[str, configs.Tile] = {}


@contextlib.contextmanager
def forced_tiles(**tiles: configs.Tile) -> Iterator[None]:
    """Run the kernels named by keyword (``fwd``, ``dkdv``, ``dq``) with the given tiles inside the block, for
    tests, sweeps and fuzzing. The forward fast path is off meanwhile, so every call goes through triton's JIT and
    compiles the forced tile; the tiles chosen outside the block (autotuned or remembered) are left as they were.
    """
    unknown = sorted(set(tiles) - set(configs.KINDS))
    if unknown:
        raise ValueError(f"forced_tiles: unknown kernel kind(s) {unknown}; expected some of {configs.KINDS}")
    saved = dict(_forced)
    _forced.update(tiles)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(saved)


def _tile(
    kind: str,
    vendor: str,
    prob: Problem,
    dtype: torch.dtype,
    tma: bool,
    flags: dict[str, object],
    launch_with: Callable[[configs.Tile], object],
) -> configs.Tile:
    """The tile for one kernel launch: fixed under the interpreter or with ATTNKIT_TRITON_AUTOTUNE=0, otherwise
    the fastest candidate, timed once per key and remembered.

    triton.autotune is not used: its per-call key building scans ~70 arguments in Python, which cost more than
    the kernel itself on short sequences (benchmarks/NOTES-triton.md).
    """
    autotune = env.triton_autotune()  # read first: a malformed value raises under the interpreter too
    forced = _forced.get(kind)
    if forced is not None:
        if forced.use_tma and not tma:
            raise ValueError(f"forced_tiles: {kind} tile {forced} streams through TMA, which this call cannot use")
        return forced
    if _interpreted():
        return configs.INTERPRETER_TILES[kind]
    block_d = max(prob.block_d, prob.block_dv)
    elem_bytes = dtype.itemsize
    if not autotune:
        return configs.default(kind, vendor, block_d, elem_bytes, tma)
    key = (kind, vendor, str(dtype), tma, configs.seq_bucket(max(prob.seqlen_q, prob.seqlen_k)), *flags.values())
    tile = _tuned.get(key)
    if tile is None:
        tile = _autotune(configs.candidates(kind, vendor, block_d, elem_bytes, tma), launch_with)
        _tuned[key] = tile
    return tile


# Candidates within this fraction of the fastest first-round time are timed again, interleaved, before choosing.
_RETIME_WITHIN = 0.08


def _autotune(tiles: list[configs.Tile], launch_with: Callable[[configs.Tile], object]) -> configs.Tile:
    """Fastest tile: one timing per candidate, then the close ones again in alternation.

    One 20 ms round per tile picked tiles up to 8% off the best in a benchmark run (d=64 non-causal 4k: 395 vs
    426 TFLOP/s for the sweep's best, benchmarks/NOTES-triton.md); the second round keeps one slow sample (clock
    ramp, a neighbour's launch) from deciding.
    """
    from triton.runtime import errors

    skip = tuple(getattr(errors, name) for name in ("OutOfResources", "PTXASError") if hasattr(errors, name))

    def timed(i: int, rep: int) -> float:
        return triton.testing.do_bench(lambda: launch_with(tiles[i]), warmup=5, rep=rep, return_mode="median")

    timings: list[tuple[float, int]] = []
    failures: list[str] = []
    for i, tile in enumerate(tiles):
        try:
            timings.append((timed(i, 20), i))
        except skip as exc:  # a tile this GPU or compiler cannot build is just not a candidate
            failures.append(f"{tile}: {type(exc).__name__}: {exc}")
    if not timings:
        raise BackendCompileError("no Triton tile compiled for this call:\n" + "\n".join(failures))
    best = min(timings)[0]
    close = [i for ms, i in sorted(timings) if ms <= best * (1 + _RETIME_WITHIN)]
    if len(close) == 1:
        return tiles[close[0]]
    samples: dict[int, list[float]] = {i: [] for i in close}
    for _ in range(2):
        for i in close:
            samples[i].append(timed(i, 20))
    return tiles[min(close, key=lambda i: min(samples[i]))]


def _tma_eligible(prob: Problem, tensors: list[torch.Tensor]) -> bool:
    """TMA descriptors need 16-byte aligned bases and strides and a contiguous head dim."""
    if not tensors[0].is_cuda or not probes.use_tma(tensors[0].device):
        return False
    # ptxas (triton 3.6) crashes on TMA kernels with 256-wide head tiles; 16-byte rows need D % 8 == 0.
    if max(prob.block_d, prob.block_dv) > 128 or prob.head_dim % 8 or prob.head_dim_v % 8:
        return False
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any((st * size) % 16 for st in t.stride()[:-1]):
            return False
    return True


@contextlib.contextmanager
def _tma_scratch(enabled: bool) -> Iterator[None]:
    """Device-side descriptors live in a small global scratch that triton asks its allocator for."""
    if not enabled:
        yield
        return
    from triton.runtime import _allocation

    def alloc(size: int, alignment: int, stream: int | None) -> torch.Tensor:
        return torch.empty(size, dtype=torch.int8, device="cuda")

    token = _allocation._allocator.set(alloc)
    try:
        yield
    finally:
        _allocation._allocator.reset(token)


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
        "UPCAST": _interpreted(),
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
    return "ieee" if _interpreted() or probes.hip_build() else FP32_DOT_PRECISION


def _scalars(prob: Problem, params: AttentionParams, dist_threshold: int) -> list[object]:
    return [
        prob.heads_q,
        prob.heads_q // prob.heads_k,
        prob.seqlen_q,
        prob.seqlen_k,
        float(params.softmax_scale),
        float(params.softcap),
        int(params.window_left),
        int(params.window_right),
        float(params.dropout_p),
        int(params.dropout_seed),
        int(dist_threshold),
    ]


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output the kernels fill completely comes from here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _cu(varlen: VarlenInfo | None, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if varlen is None:
        return q, q  # never read: VARLEN is off
    return varlen.cu_seqlens_q, varlen.cu_seqlens_k


def _slopes(alibi: torch.Tensor | None, q: torch.Tensor) -> tuple[torch.Tensor, int]:
    if alibi is None:
        return q, 0
    return alibi, (alibi.stride(0) if alibi.dim() == 2 else 0)


# Host-side fast path of the forward (dense, no dropout, compiled kernels): per call the slow path builds ~80
# arguments, checks index widths and TMA eligibility, picks the tile and goes through triton's JIT dispatch
# (binding, specialisation key, cache lookup): ~200 us of Python per call on the H200 host, more than the GPU
# time of a 2k causal forward (benchmarks/NOTES-triton.md, run 3). Everything but the tensor addresses is a
# function of shapes, strides, dtypes, devices, parameters and the 16-byte alignment of each input, so one plan
# per such key holds the compiled kernel (from a normal first launch, so triton specialised it for exactly these
# arguments), its grid and the argument tail; a repeated call allocates the outputs and launches that kernel.
# A plan keeps the tile chosen on its first call: forced_tiles() bypasses the plans, and clearing _tuned does not
# clear _fwd_plans.
FAST_LAUNCH = True
_PLAN_LIMIT = 1024
# Since triton 3.3 the JIT hands the launcher every bound argument, constexprs included (``*bound_args.values()``),
# and so does ``CompiledKernel[grid](...)``; 3.2 and older pass only the non-constexpr ones.
_FAST_LAUNCH_MIN_TRITON = (3, 3)
_fwd_plans: dict[tuple, _FwdPlan] = {}


@dataclass(frozen=True)
class _FwdPlan:
    kernel: object  # triton CompiledKernel
    grid: tuple[int, int, int]
    tail: tuple  # arguments after the ten tensors, in signature order, constexprs included
    tma: bool
    out_shape: tuple[int, ...]
    lse_shape: tuple[int, ...]


def _triton_at_least(version: str, minimum: tuple[int, int]) -> bool:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        if not digits:
            return False
        parts.append(int(digits))
    return tuple(parts) >= minimum


_FAST_LAUNCH_SUPPORTED = _triton_at_least(triton.__version__, _FAST_LAUNCH_MIN_TRITON)


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


def _fwd_plan_key(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alibi: torch.Tensor | None, params: AttentionParams, vendor: str
) -> tuple:
    """Everything the launch depends on besides the tensor addresses (triton specialises pointers on 16-byte
    alignment, integers on divisibility by 16 and on being 1; all those integers follow from this key)."""
    slopes = None if alibi is None else (alibi.shape, alibi.stride(), alibi.dtype, _aligned(alibi))
    return (
        q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, k.dtype, v.dtype, q.device,
        k.device, v.device, _aligned(q), _aligned(k), _aligned(v), slopes, params, vendor, env.triton_autotune(),
    )  # fmt: skip


@functools.cache
def _parameters(fn: Callable) -> tuple[tuple[str, object], ...]:
    """(name, default) of every parameter of a kernel's Python function, in order (inspect is slow: cached)."""
    return tuple((name, param.default) for name, param in inspect.signature(fn).parameters.items())


def _signature_tail(kernel_fn: object, n_leading: int, kwargs: dict[str, object]) -> tuple | None:
    """Values of the kernel's parameters after the first ``n_leading`` (keyword or default), in order; None when
    one has neither (then the fast path is not used)."""
    fn = getattr(kernel_fn, "fn", None)
    if fn is None:
        return None
    values = []
    for name, default in _parameters(fn)[n_leading:]:
        if name in kwargs:
            values.append(kwargs[name])
        elif default is not inspect.Parameter.empty:
            values.append(default)
        else:
            return None
    return tuple(values)


def _remember_fwd_plan(key: tuple, kernel: object, grid: tuple[int, ...], positional: tuple, kwargs: dict,
                       tma: bool, out: torch.Tensor, lse: torch.Tensor) -> None:  # fmt: skip
    if not callable(getattr(kernel, "__getitem__", None)):
        return
    tail = _signature_tail(attn_fwd, len(positional), kwargs)
    if tail is None:
        return
    if len(_fwd_plans) >= _PLAN_LIMIT:
        _fwd_plans.clear()
    grid3 = (grid[0], 1, 1)
    _fwd_plans[key] = _FwdPlan(kernel, grid3, (*positional[10:], *tail), tma, tuple(out.shape), tuple(lse.shape))


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
    interpreted = _interpreted()
    plan_key = None
    # Dropout draws a new seed (an integer argument) per call; varlen, piecewise and sinks (a tensor argument past
    # the ten a plan takes per call) are rare: slow path.
    fast = FAST_LAUNCH and _FAST_LAUNCH_SUPPORTED and not interpreted and not _forced
    if fast and varlen is None and q2 is None and sink is None and params.dropout_p == 0.0:
        plan_key = _fwd_plan_key(q, k, v, alibi, params, vendor)
        plan = _fwd_plans.get(plan_key)
        if plan is not None:
            out = _empty(plan.out_shape, q.dtype, q.device)
            lse = _empty(plan.lse_shape, torch.float32, q.device)
            if _aligned(out) and _aligned(lse):
                with _on_device(q), _tma_scratch(plan.tma):
                    plan.kernel[plan.grid](q, k, v, q, k, out, lse, q if alibi is None else alibi, q, q, *plan.tail)
                return out, lse
            plan_key = None
    prob = problem_of(q, k, v, varlen)
    piecewise = q2 is not None
    q2_, k2_ = (q2, k2) if piecewise else (q, k)
    if varlen is None:
        out = _empty((prob.batch, prob.seqlen_q, prob.heads_q, prob.head_dim_v), q.dtype, q.device)
        lse = _empty((prob.batch, prob.heads_q, prob.seqlen_q), torch.float32, q.device)
    else:
        # Rows past cu_seqlens_q[-1] belong to no sequence and are never written: define them (no key: 0, -inf).
        out = torch.zeros((q.shape[0], prob.heads_q, prob.head_dim_v), dtype=q.dtype, device=q.device)
        lse = torch.full((prob.heads_q, q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    idx64 = _needs_idx64(prob, [q, k, v, q2_, k2_, out])
    tma = vendor == "nvidia" and not piecewise and not idx64 and _tma_eligible(prob, [k, v])
    slopes, ssb = _slopes(alibi, q)
    cu_q, cu_k = _cu(varlen, q)
    args = (
        q,
        k,
        v,
        q2_,
        k2_,
        out,
        lse,
        slopes,
        cu_q,
        cu_k,
        *strides(q, varlen),
        *strides(k, varlen),
        *strides(v, varlen),
        *strides(q2_, varlen),
        *strides(k2_, varlen),
        *strides(out, varlen),
        *lse_strides(lse, varlen),
        ssb,
        *_scalars(prob, params, dist_threshold),
        prob.batch,
        sink,  # None (a constexpr to triton) without a sink
    )
    flags = {**_flags(prob, params, alibi, piecewise, idx64, q.dtype), "SINK": sink is not None}

    def grid_of(tile: configs.Tile) -> tuple[int]:
        tiles = triton.cdiv(prob.seqlen_q, tile.block_m) * prob.batch * prob.heads_q
        if tile.persistent:
            tiles = min(tiles, tile.persistent * _sm_count(q.device))
        return (tiles,)

    def launch_with(tile: configs.Tile) -> object:
        return attn_fwd[grid_of(tile)](*args, **flags, **tile.launch_kwargs())

    with _on_device(q), _tma_scratch(tma):
        tile = _tile("fwd", vendor, prob, q.dtype, tma, flags, launch_with)
        kernel = launch_with(tile)
    if plan_key is not None and _aligned(out) and _aligned(lse):
        _remember_fwd_plan(plan_key, kernel, grid_of(tile), args, {**flags, **tile.meta()}, tma, out, lse)
    return out, lse


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
    prob = problem_of(q, k, v, varlen)
    piecewise = q2 is not None
    q2_, k2_ = (q2, k2) if piecewise else (q, k)
    # Varlen padding rows (past cu_seqlens[-1]) get no program, so their gradients start at zero.
    alloc = _empty if varlen is None else (lambda shape, dtype, device: torch.zeros(shape, dtype=dtype, device=device))
    dq = alloc(q.shape, q.dtype, q.device)
    dk = alloc(k.shape, k.dtype, k.device)
    dv = alloc(v.shape, v.dtype, v.device)
    dq2 = alloc(q.shape, q.dtype, q.device) if piecewise else dq
    dk2 = alloc(k.shape, k.dtype, k.device) if piecewise else dk
    grads = (dq, dk, dq2, dk2, dv) if piecewise else (dq, dk, dv)
    if q.numel() == 0 or k.numel() == 0:
        for g in grads:
            g.zero_()
        return grads
    # Delta shares lse's strides inside the kernels; lse is tiny, so a dense copy of an odd view costs nothing.
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    idx64 = _needs_idx64(prob, [q, k, v, q2_, k2_, out, dout, dq, dk, dv])
    slopes, ssb = _slopes(alibi, q)
    cu_q, cu_k = _cu(varlen, q)
    flags = _flags(prob, params, alibi, piecewise, idx64, q.dtype)
    scalars = _scalars(prob, params, dist_threshold)
    tma = vendor == "nvidia" and not piecewise and not idx64 and _tma_eligible(prob, [q, k, v, dout])
    pre_m = configs.INTERPRETER_TILES["dq"].block_m if _interpreted() else configs.PREPROCESS_BLOCK_M
    with _on_device(q), _tma_scratch(tma):
        attn_bwd_preprocess[(triton.cdiv(prob.seqlen_q, pre_m) * prob.batch * prob.heads_q,)](
            out,
            dout,
            delta,
            cu_q,
            *strides(out, varlen),
            *strides(dout, varlen),
            *lse_strides(delta, varlen),
            prob.heads_q,
            prob.seqlen_q,
            BLOCK_M=pre_m,
            HEAD_DIM_V=prob.head_dim_v,
            BLOCK_DV=prob.block_dv,
            VARLEN=varlen is not None,
        )
        common = (
            *strides(q, varlen),
            *strides(k, varlen),
            *strides(v, varlen),
            *strides(q2_, varlen),
            *strides(k2_, varlen),
            *strides(dout, varlen),
        )
        tail = (*lse_strides(lse, varlen), ssb, *scalars)
        dkdv_args = (
            q,
            k,
            v,
            q2_,
            k2_,
            dout,
            lse,
            delta,
            dk,
            dv,
            dk2,
            slopes,
            cu_q,
            cu_k,
            *common,
            *strides(dk, varlen),
            *strides(dv, varlen),
            *strides(dk2, varlen),
            *tail,
        )
        dq_args = (
            q,
            k,
            v,
            q2_,
            k2_,
            dout,
            lse,
            delta,
            dq,
            dq2,
            slopes,
            cu_q,
            cu_k,
            *common,
            *strides(dq, varlen),
            *strides(dq2, varlen),
            *tail,
        )

        def dkdv_with(tile: configs.Tile) -> None:
            grid = (triton.cdiv(prob.seqlen_k, tile.block_n) * prob.batch * prob.heads_k,)
            attn_bwd_dkdv[grid](*dkdv_args, **flags, **tile.launch_kwargs())

        def dq_with(tile: configs.Tile) -> None:
            grid = (triton.cdiv(prob.seqlen_q, tile.block_m) * prob.batch * prob.heads_q,)
            attn_bwd_dq[grid](*dq_args, **flags, **tile.launch_kwargs())

        dkdv_with(_tile("dkdv", vendor, prob, q.dtype, tma, flags, dkdv_with))
        dq_with(_tile("dq", vendor, prob, q.dtype, tma, flags, dq_with))
    return grads
