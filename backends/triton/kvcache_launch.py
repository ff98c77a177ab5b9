"""Host side of the split-KV decoding kernel: tile sizes, split count, workspace and the launches."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from attnkit.fp8 import Fp8Scales
from attnkit.params import AttentionParams, KVCacheInfo

from . import launch, probes
from .kvcache_kernel import combine_splits, kvcache_split_fwd
from .kvcache_splits import MAX_SPLITS, split_count

# Programs of the split kernel resident on one multiprocessor at a time: the split heuristic fills
# multiprocessors x _WAVES slots (4 warps and two 32 KiB stages of K/V per program let 2-3 share an SM).
_WAVES = 2
_MAX_SPLITS = MAX_SPLITS
# Key block, warps and pipeline stages of the split kernel (benchmarks/triton_dev.py decodesweep varies them).
_BLOCK_N = 64
_NUM_WARPS = 4
_NUM_STAGES = 2
_SPLIT_TENSORS = 13  # leading tensor arguments of kvcache_split_fwd (the rest is the remembered tail)


# Decode steps are short (a 1k-64k cache is read in ~0.1 ms on an H200), so triton's JIT dispatch of the two
# kernels (~100 us each) is most of a call. As in launch.forward, a plan per key of everything the launches
# depend on besides tensor addresses keeps the compiled kernels, their grids and argument tails; a repeated
# call allocates its buffers and launches them directly (launch.FAST_LAUNCH switches both paths).
_plans: dict[tuple, _DecodePlan] = {}


@dataclass(frozen=True)
class _DecodePlan:
    split_kernel: object  # triton CompiledKernel
    split_grid: tuple[int, int, int]
    split_tail: tuple  # arguments after the leading tensors, constexprs included
    combine_kernel: object | None  # None with one split: the split kernel writes the outputs
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
        meta(info.block_table), meta(info.cache_leftpad), info.num_splits, meta(alibi), params, _WAVES, _BLOCK_N,
        _NUM_WARPS, _NUM_STAGES,
        None if scales is None else (scales.out_dtype, *(meta(t) for t in _descales(info, scales))),
    )  # fmt: skip


def _pointer_args(info: KVCacheInfo, alibi: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """SLOPES, SEQLENS, BATCH_IDX, BLOCK_TABLE, LEFTPAD of the split kernel. The lengths stand in for absent
    optional tensors: never read, since their constexpr flag is off."""
    seqlens = info.cache_seqlens

    def present(t: torch.Tensor | None) -> torch.Tensor:
        return seqlens if t is None else t

    return (
        present(alibi),
        seqlens,
        present(info.cache_batch_idx),
        present(info.block_table),
        present(info.cache_leftpad),
    )


def _descales(info: KVCacheInfo, scales: Fp8Scales | None) -> tuple[torch.Tensor, ...]:
    """Q/K/V_DESCALE of the split kernel (after its outputs); the lengths stand in when FP8 is off."""
    if scales is None:
        return (info.cache_seqlens,) * 3
    return scales.q_descale, scales.k_descale, scales.v_descale


def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def splits_for(info: KVCacheInfo, work: int, key_blocks: int, block_n: int, device: torch.device) -> int:
    """The split count: ``info.num_splits`` when given (at most one split per key block), else the heuristic."""
    if info.num_splits > 0:
        return max(1, min(info.num_splits, key_blocks, _MAX_SPLITS))
    return split_count(work, key_blocks, block_n, _WAVES * _multiprocessors(device), _MAX_SPLITS)


def _buffers(q, head_dim_v: int, splits: int, part_shape: tuple[int, ...], out_dtype: torch.dtype):
    """out, lse and the split kernel's destinations: float32 partials to combine, or, with one split, the outputs
    themselves viewed with the partials' (split, batch, head, query) index order."""
    out = torch.empty(q.shape[0], q.shape[1], q.shape[2], head_dim_v, dtype=out_dtype, device=q.device)
    lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)
    if splits == 1:
        return out, lse, out.permute(0, 2, 1, 3).unsqueeze(0), lse.unsqueeze(0)
    out_part = torch.empty(part_shape, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(part_shape[:-1], dtype=torch.float32, device=q.device)
    return out, lse, out_part, lse_part


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
            out, lse, out_part, lse_part = _buffers(q, v_cache.shape[3], plan.split_grid[0], plan.part_shape, out_dtype)
            if all(launch._aligned(t) for t in (out_part, lse_part, out, lse)):
                with launch._on_device(q):
                    plan.split_kernel[plan.split_grid](
                        q, k_cache, v_cache, *_pointer_args(info, alibi), out_part, lse_part,
                        *_descales(info, scales), *plan.split_tail,
                    )  # fmt: skip
                    if plan.combine_kernel is not None:
                        plan.combine_kernel[plan.combine_grid](out_part, lse_part, out, lse, *plan.combine_tail)
                return out, lse
            plan_key = None
    batch, seqlen_q, heads_q, head_dim = q.shape
    heads_k, head_dim_v = k_cache.shape[2], v_cache.shape[3]
    if q.numel() == 0:  # no programs to launch (and the split count below divides by the batch)
        out = torch.zeros(batch, seqlen_q, heads_q, head_dim_v, dtype=out_dtype, device=q.device)
        return out, torch.full((batch, heads_q, seqlen_q), float("-inf"), dtype=torch.float32, device=q.device)
    group = heads_q // heads_k
    paged = info.block_table is not None
    page_size = k_cache.shape[1] if paged else 0
    capacity = info.block_table.shape[1] * page_size if paged else k_cache.shape[1]
    # Pages smaller than a key block (16, 32, 48 tokens...) are gathered key by key, so the block stays at its
    # best size whatever the page size.
    block_n = _BLOCK_N
    rows = group * seqlen_q
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    m_blocks = triton.cdiv(rows, block_m)
    key_blocks = max(1, triton.cdiv(capacity, block_n))
    splits = splits_for(info, batch * heads_k * m_blocks, key_blocks, block_n, q.device)
    keys_per_split = triton.cdiv(key_blocks, splits) * block_n
    splits = triton.cdiv(key_blocks * block_n, keys_per_split)

    part_shape = (splits, batch, heads_q, seqlen_q, head_dim_v)
    out, lse, out_part, lse_part = _buffers(q, head_dim_v, splits, part_shape, out_dtype)
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
        PAGED=paged, ONE_PAGE_PER_BLOCK=paged and page_size % block_n == 0,
        HAS_BATCH_IDX=info.cache_batch_idx is not None, HAS_LEFTPAD=info.cache_leftpad is not None,
        HAS_ALIBI=alibi is not None, HAS_SOFTCAP=params.softcap > 0, HAS_WINDOW_LEFT=params.window_left >= 0,
        HAS_WINDOW_RIGHT=params.window_right >= 0,
        UPCAST=interpreted, DOT_PRECISION="ieee" if q.dtype == torch.float32 and not interpreted else "tf32",
        FP8=scales is not None,
    )  # fmt: skip
    split_grid = (splits, batch * heads_k, m_blocks)
    with launch._on_device(q):
        split_kernel = kvcache_split_fwd[split_grid](
            *split_args, **split_kwargs, num_warps=_NUM_WARPS, num_stages=_NUM_STAGES
        )
        combine = None
        if splits > 1:
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
            combine_grid = (batch * heads_q * seqlen_q, 1, 1)
            combine_kernel = combine_splits[combine_grid[:1]](
                *combine_args, **combine_kwargs, num_warps=1 if head_dim_v <= 64 else 2
            )
            combine = (combine_kernel, combine_grid, combine_args, combine_kwargs)
    if plan_key is not None and all(launch._aligned(t) for t in (out_part, lse_part, out, lse)):
        _remember(plan_key, split_kernel, split_grid, split_args, split_kwargs, combine, part_shape)
    return out, lse


def _remember(key: tuple, split_kernel, split_grid, split_args, split_kwargs, combine, part_shape) -> None:
    kernels = [split_kernel] + ([combine[0]] if combine is not None else [])
    if not all(callable(getattr(k, "__getitem__", None)) for k in kernels):
        return
    split_tail = launch._signature_tail(kvcache_split_fwd, len(split_args), split_kwargs)
    if split_tail is None:
        return
    combine_kernel, combine_grid, combine_tail = None, (1, 1, 1), ()
    if combine is not None:
        combine_kernel, combine_grid, combine_args, combine_kwargs = combine
        tail = launch._signature_tail(combine_splits, len(combine_args), combine_kwargs)
        if tail is None:
            return
        combine_tail = (*combine_args[4:], *tail)
    if len(_plans) >= launch._PLAN_LIMIT:
        _plans.clear()
    _plans[key] = _DecodePlan(
        split_kernel, split_grid, (*split_args[_SPLIT_TENSORS:], *split_tail),
        combine_kernel, combine_grid, combine_tail, part_shape,
    )  # fmt: skip
