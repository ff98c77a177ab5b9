"""Host side of the split-KV decoding kernel: tile sizes, split count, workspace and the two launches."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from attnkit.fp8 import Fp8Scales
from attnkit.params import AttentionParams, KVCacheInfo

from . import launch, probes
from .kvcache_kernel import combine_splits, kvcache_split_fwd

# Enough programs for about two waves; more splits only add combine work.
_WAVES = 2
_MAX_SPLITS = 128
# Key block, warps and pipeline stages of the split kernel (benchmarks/triton_dev.py decodesweep varies them).
_BLOCK_N = 64
_NUM_WARPS = 4
_NUM_STAGES = 2


def _block_n(paged: bool, page_size: int) -> int:
    for candidate in (128, 64, 32, 16):  # must divide the page so a key block stays inside one page
        if candidate <= _BLOCK_N and (not paged or page_size % candidate == 0):
            return candidate
    return 16


# Decode steps are short (a 1k-64k cache is read in ~0.1 ms on an H200), so triton's JIT dispatch of the two
# kernels (~100 us each) is most of a call. As in launch.forward, a plan per key of everything the launches
# depend on besides tensor addresses keeps both compiled kernels, their grids and argument tails; a repeated
# call allocates its buffers and launches them directly (launch.FAST_LAUNCH switches both paths).
_plans: dict[tuple, _DecodePlan] = {}


@dataclass(frozen=True)
class _DecodePlan:
    split_kernel: object  # triton CompiledKernel
    split_grid: tuple[int, int, int]
    split_tail: tuple  # arguments after the nine tensors, constexprs included
    combine_kernel: object
    combine_grid: tuple[int, int, int]
    combine_tail: tuple  # arguments after the four tensors
    part_shape: tuple[int, ...]


def _plan_key(q, k_cache, v_cache, info: KVCacheInfo, alibi, params: AttentionParams, scales) -> tuple:
    """Shapes, strides, dtypes, devices and 16-byte alignment of every tensor argument, and the parameters
    (triton specialises pointers on alignment and integers on divisibility by 16 and on being 1)."""

    def meta(t: torch.Tensor | None) -> tuple | None:
        return None if t is None else (t.shape, t.stride(), t.dtype, t.device, launch._aligned(t))

    return (
        meta(q), meta(k_cache), meta(v_cache), meta(info.cache_seqlens), meta(info.cache_batch_idx),
        meta(info.block_table), meta(alibi), params, _WAVES, _BLOCK_N, _NUM_WARPS, _NUM_STAGES,
        None if scales is None else (scales.out_dtype, *(meta(t) for t in _descales(info, scales))),
    )  # fmt: skip


def _pointer_args(info: KVCacheInfo, alibi: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """SLOPES, SEQLENS, BATCH_IDX, BLOCK_TABLE of the split kernel. The lengths stand in for absent optional
    tensors: never read, since their constexpr flag is off."""
    seqlens = info.cache_seqlens

    def present(t: torch.Tensor | None) -> torch.Tensor:
        return seqlens if t is None else t

    return present(alibi), seqlens, present(info.cache_batch_idx), present(info.block_table)


def _descales(info: KVCacheInfo, scales: Fp8Scales | None) -> tuple[torch.Tensor, ...]:
    """Q/K/V_DESCALE of the split kernel (after its outputs); the lengths stand in when FP8 is off."""
    if scales is None:
        return (info.cache_seqlens,) * 3
    return scales.q_descale, scales.k_descale, scales.v_descale


def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def forward_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    info: KVCacheInfo,
    alibi: torch.Tensor | None,
    params: AttentionParams,
    scales: Fp8Scales | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``scales`` (float8_e4m3fn q and cache): descales and the output dtype."""
    interpreted = probes.interpreter_enabled()
    out_dtype = q.dtype if scales is None else scales.out_dtype
    plan_key = None
    if launch.FAST_LAUNCH and launch._FAST_LAUNCH_SUPPORTED and not interpreted:
        plan_key = _plan_key(q, k_cache, v_cache, info, alibi, params, scales)
        plan = _plans.get(plan_key)
        if plan is not None:
            out_part = torch.empty(plan.part_shape, dtype=torch.float32, device=q.device)
            lse_part = torch.empty(plan.part_shape[:-1], dtype=torch.float32, device=q.device)
            out = torch.empty(q.shape[:3] + v_cache.shape[3:], dtype=out_dtype, device=q.device)
            lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)
            if all(launch._aligned(t) for t in (out_part, lse_part, out, lse)):
                with launch._on_device(q):
                    plan.split_kernel[plan.split_grid](
                        q,
                        k_cache,
                        v_cache,
                        *_pointer_args(info, alibi),
                        out_part,
                        lse_part,
                        *_descales(info, scales),
                        *plan.split_tail,
                    )
                    plan.combine_kernel[plan.combine_grid](out_part, lse_part, out, lse, *plan.combine_tail)
                return out, lse
            plan_key = None
    batch, seqlen_q, heads_q, head_dim = q.shape
    heads_k, head_dim_v = k_cache.shape[2], v_cache.shape[3]
    group = heads_q // heads_k
    paged = info.block_table is not None
    page_size = k_cache.shape[1] if paged else 0
    capacity = info.block_table.shape[1] * page_size if paged else k_cache.shape[1]
    block_n = _block_n(paged, page_size)
    rows = group * seqlen_q
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    m_blocks = triton.cdiv(rows, block_m)
    key_blocks = max(1, triton.cdiv(capacity, block_n))
    wanted = triton.cdiv(_WAVES * _multiprocessors(q.device), batch * heads_k * m_blocks)
    splits = max(1, min(key_blocks, wanted, _MAX_SPLITS))
    keys_per_split = triton.cdiv(key_blocks, splits) * block_n
    splits = triton.cdiv(key_blocks * block_n, keys_per_split)

    out_part = torch.empty(splits, batch, heads_q, seqlen_q, head_dim_v, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(splits, batch, heads_q, seqlen_q, dtype=torch.float32, device=q.device)
    out = torch.empty(batch, seqlen_q, heads_q, head_dim_v, dtype=out_dtype, device=q.device)
    lse = torch.empty(batch, heads_q, seqlen_q, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))

    slope_stride_b = alibi.stride(0) if alibi is not None and alibi.dim() == 2 else 0
    split_args = (
        q, k_cache, v_cache, *_pointer_args(info, alibi), out_part, lse_part, *_descales(info, scales),
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        slope_stride_b, info.block_table.stride(0) if paged else 0,
        *out_part.stride()[:4],
        *lse_part.stride()[:3],
        seqlen_q, group, heads_k, keys_per_split,
        params.softmax_scale * 1.4426950408889634, params.softcap, params.window_left, params.window_right,
    )  # fmt: skip
    split_kwargs = dict(
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_DV=max(16, triton.next_power_of_2(head_dim_v)),
        BLOCK_M=block_m, BLOCK_N=block_n, PAGE_SIZE=max(page_size, 1),
        PAGED=paged, HAS_BATCH_IDX=info.cache_batch_idx is not None, HAS_ALIBI=alibi is not None,
        HAS_SOFTCAP=params.softcap > 0, HAS_WINDOW_LEFT=params.window_left >= 0,
        HAS_WINDOW_RIGHT=params.window_right >= 0,
        UPCAST=interpreted, DOT_PRECISION="ieee" if q.dtype == torch.float32 and not interpreted else "tf32",
        FP8=scales is not None,
    )  # fmt: skip
    split_grid = (splits, batch * heads_k, m_blocks)
    split_kernel = kvcache_split_fwd[split_grid](
        *split_args, **split_kwargs, num_warps=_NUM_WARPS, num_stages=_NUM_STAGES
    )
    combine_args = (
        out_part, lse_part, out, lse, splits, heads_q, seqlen_q,
        *out_part.stride()[:4],
        *lse_part.stride()[:3],
        out.stride(0), out.stride(1), out.stride(2),
    )  # fmt: skip
    combine_kwargs = dict(
        HEAD_DIM_V=head_dim_v, BLOCK_DV=max(16, triton.next_power_of_2(head_dim_v)),
        BLOCK_SPLITS=max(2, triton.next_power_of_2(splits)),
    )  # fmt: skip
    combine_grid = (batch * heads_q * seqlen_q,)
    combine_kernel = combine_splits[combine_grid](
        *combine_args, **combine_kwargs, num_warps=1 if head_dim_v <= 64 else 2
    )
    if plan_key is not None and all(launch._aligned(t) for t in (out_part, lse_part, out, lse)):
        _remember(plan_key, split_kernel, split_grid, split_args, split_kwargs, combine_kernel, combine_grid,
                  combine_args, combine_kwargs, tuple(out_part.shape))  # fmt: skip
    return out, lse


def _remember(key: tuple, split_kernel, split_grid, split_args, split_kwargs, combine_kernel, combine_grid,
              combine_args, combine_kwargs, part_shape) -> None:  # fmt: skip
    if not all(callable(getattr(k, "__getitem__", None)) for k in (split_kernel, combine_kernel)):
        return
    split_tail = launch._signature_tail(kvcache_split_fwd, len(split_args), split_kwargs)
    combine_tail = launch._signature_tail(combine_splits, len(combine_args), combine_kwargs)
    if split_tail is None or combine_tail is None:
        return
    if len(_plans) >= launch._PLAN_LIMIT:
        _plans.clear()
    _plans[key] = _DecodePlan(
        split_kernel, split_grid, (*split_args[12:], *split_tail),
        combine_kernel, (combine_grid[0], 1, 1), (*combine_args[4:], *combine_tail), part_shape,
    )  # fmt: skip
