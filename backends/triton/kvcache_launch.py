"""Host side of the split-KV decoding kernel: tile sizes, split count, workspace and the launches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton

from attnkit.fp8 import Fp8Scales
from attnkit.params import AttentionParams, KVCacheInfo

from . import configs, device, fastpath, probes, tma
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
# Whether K/V stream through TMA where tma_eligible allows it (Hopper), and the pipeline depth of that loop.
_TMA = True
_TMA_STAGES = 3
INTERPRETER_SM_COUNT = 4  # the split heuristic's multiprocessors for CPU tensors (the interpreter)
# Per-call tensors of a plan: the leading parameters of each kernel.
_SPLIT_LEAD = ("Q", "K", "V", "SLOPES", "SEQLENS", "BATCH_IDX", "BLOCK_TABLE", "LEFTPAD", "OUT_PART", "LSE_PART",
               "Q_DESCALE", "K_DESCALE", "V_DESCALE")  # fmt: skip
_COMBINE_LEAD = ("OUT_PART", "LSE_PART", "OUT", "LSE")


# Decode steps are short (a 1k-64k cache is read in ~0.1 ms on an H200), so triton's JIT dispatch of the two
# kernels (~100 us each) is most of a call: a plan per key of everything the launches depend on besides tensor
# addresses keeps both kernels bound (see fastpath); a repeated call allocates its buffers and launches them.
@dataclass(frozen=True)
class DecodePlan:
    split: fastpath.Launcher
    splits: int
    combine: fastpath.Launcher | None  # None with one split: the split kernel writes the outputs
    part_shape: tuple[int, ...]


plans: fastpath.Plans[DecodePlan] = fastpath.Plans()


def plan_key(q, k_cache, v_cache, info: KVCacheInfo, alibi, params: AttentionParams, scales) -> tuple:
    """Shapes, strides, dtypes, devices and 16-byte alignment of every tensor argument, and the parameters
    (triton specialises pointers on alignment and integers on divisibility by 16 and on being 1)."""
    meta = fastpath.meta
    return (
        meta(q), meta(k_cache), meta(v_cache), meta(info.cache_seqlens), meta(info.cache_batch_idx),
        meta(info.block_table), meta(info.cache_leftpad), info.num_splits, meta(alibi), params, _WAVES, _BLOCK_N,
        _NUM_WARPS, _NUM_STAGES, _TMA, _TMA_STAGES,
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


def tma_eligible(k_cache: torch.Tensor, v_cache: torch.Tensor, info: KVCacheInfo, block_n: int) -> bool:
    """K/V blocks may stream through TMA: Hopper, 16-byte aligned caches, no left padding (the padding's keys
    would need masking in every first block), pages that hold whole key blocks of one pool (pages x page rows,
    32-bit rows), and the shapes the H200 runs validated: bf16/fp16 caches of head dim 128 for K and V. (Head dims
    112/16 with a 256-key page faulted there, fuzz seed 1091767499; NOTES-triton.md, "Decoding through TMA".)"""
    if not _TMA or info.cache_leftpad is not None or k_cache.dtype not in (torch.bfloat16, torch.float16):
        return False
    if k_cache.shape[3] != 128 or v_cache.shape[3] != 128:
        return False
    if not tma.eligible(128, 128, 128, [k_cache, v_cache]):
        return False
    if info.block_table is None:
        return True
    page = k_cache.shape[1]
    pooled = all(t.stride(0) == page * t.stride(1) for t in (k_cache, v_cache))
    return page % block_n == 0 and pooled and k_cache.shape[0] * page < 2**31


def splits_for(info: KVCacheInfo, work: int, key_blocks: int, block_n: int, where: torch.device) -> int:
    """The split count: ``info.num_splits`` when given (at most one split per key block), else the heuristic."""
    if info.num_splits > 0:
        return max(1, min(info.num_splits, key_blocks, _MAX_SPLITS))
    slots = _WAVES * device.sm_count(where, interpreter=INTERPRETER_SM_COUNT)
    return split_count(work, key_blocks, block_n, slots, _MAX_SPLITS)


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
    out_dtype = q.dtype if scales is None else scales.out_dtype
    key = None
    if fastpath.enabled():
        key = plan_key(q, k_cache, v_cache, info, alibi, params, scales)
        plan = plans.get(key)
        if plan is not None:
            out, lse, out_part, lse_part = _buffers(q, v_cache.shape[3], plan.splits, plan.part_shape, out_dtype)
            if all(t.data_ptr() % 16 == 0 for t in (out_part, lse_part, out, lse)):
                plan.split(q, k_cache, v_cache, *_pointer_args(info, alibi), out_part, lse_part,
                           *_descales(info, scales))  # fmt: skip
                if plan.combine is not None:
                    plan.combine(out_part, lse_part, out, lse)
                return out, lse
            key = None
    interpreted = probes.interpreter_enabled()
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

    use_tma = tma_eligible(k_cache, v_cache, info, block_n)
    part_shape = (splits, batch, heads_q, seqlen_q, head_dim_v)
    out, lse, out_part, lse_part = _buffers(q, head_dim_v, splits, part_shape, out_dtype)
    split_values = {
        **dict(zip(_SPLIT_LEAD, (q, k_cache, v_cache, *_pointer_args(info, alibi), out_part, lse_part,
                                 *_descales(info, scales)))),
        "stride_qb": q.stride(0), "stride_qs": q.stride(1), "stride_qh": q.stride(2),
        "stride_kb": k_cache.stride(0), "stride_ks": k_cache.stride(1), "stride_kh": k_cache.stride(2),
        "stride_vb": v_cache.stride(0), "stride_vs": v_cache.stride(1), "stride_vh": v_cache.stride(2),
        "stride_slope_b": alibi.stride(0) if alibi is not None and alibi.dim() == 2 else 0,
        "stride_bt_b": info.block_table.stride(0) if paged else 0,
        **dict(zip(("stride_os", "stride_ob", "stride_oh", "stride_om"), out_part.stride()[:4])),
        **dict(zip(("stride_ls", "stride_lb", "stride_lh"), lse_part.stride()[:3])),
        "seqlen_q": seqlen_q, "group": group, "num_kv_heads": heads_k, "keys_per_split": keys_per_split,
        "pool_rows": k_cache.shape[0] * page_size if paged else 0,
        "scale_log2": params.softmax_scale * 1.4426950408889634, "softcap": params.softcap,
        "window_left": params.window_left, "window_right": params.window_right,
        "HEAD_DIM": head_dim, "HEAD_DIM_V": head_dim_v,
        "BLOCK_D": configs.head_block(head_dim), "BLOCK_DV": configs.head_block(head_dim_v),
        "BLOCK_M": block_m, "BLOCK_N": block_n, "PAGE_SIZE": max(page_size, 1),
        "PAGED": paged, "ONE_PAGE_PER_BLOCK": paged and page_size % block_n == 0,
        "HAS_BATCH_IDX": info.cache_batch_idx is not None, "HAS_LEFTPAD": info.cache_leftpad is not None,
        "HAS_ALIBI": alibi is not None, "HAS_SOFTCAP": params.softcap > 0, "HAS_WINDOW_LEFT": params.window_left >= 0,
        "HAS_WINDOW_RIGHT": params.window_right >= 0,
        "UPCAST": interpreted, "DOT_PRECISION": "ieee" if q.dtype == torch.float32 and not interpreted else "tf32",
        "FP8": scales is not None, "TMA": use_tma,
    }  # fmt: skip
    split_args = fastpath.arguments(kvcache_split_fwd, split_values)
    split_grid = (splits, batch * heads_k, m_blocks)
    combine_args: tuple = ()
    combine_grid = (batch * heads_q * seqlen_q, 1, 1)
    with device.on_device(q), tma.scratch(use_tma):
        split_kernel = kvcache_split_fwd[split_grid](
            *split_args, num_warps=_NUM_WARPS, num_stages=_TMA_STAGES if use_tma else _NUM_STAGES
        )
        combine_kernel = None
        if splits > 1:
            combine_values = {
                **dict(zip(_COMBINE_LEAD, (out_part, lse_part, out, lse))),
                "num_splits": splits, "num_heads_q": heads_q, "seqlen_q": seqlen_q,
                **dict(zip(("stride_os", "stride_ob", "stride_oh", "stride_om"), out_part.stride()[:4])),
                **dict(zip(("stride_ls", "stride_lb", "stride_lh"), lse_part.stride()[:3])),
                "stride_out_b": out.stride(0), "stride_out_s": out.stride(1), "stride_out_h": out.stride(2),
                "HEAD_DIM_V": head_dim_v, "BLOCK_DV": configs.head_block(head_dim_v),
                "BLOCK_SPLITS": max(2, triton.next_power_of_2(splits)),
            }  # fmt: skip
            combine_args = fastpath.arguments(combine_splits, combine_values)
            combine_kernel = combine_splits[combine_grid[:1]](*combine_args, num_warps=1 if head_dim_v <= 64 else 2)
    if key is not None and all(fastpath.aligned(t) for t in (out_part, lse_part, out, lse)):
        _remember(key, q, split_kernel, split_grid, split_args, splits, combine_kernel, combine_grid, combine_args,
                  part_shape, use_tma)  # fmt: skip
    return out, lse


def decode_runner(q, k_cache, v_cache, k, v, cache_seqlens, block_table, params: AttentionParams, num_splits: int,
                  keep_lse: bool) -> Callable[..., tuple[torch.Tensor, torch.Tensor] | None] | None:  # fmt: skip
    """The plans of this decode step (the fused append's and the split/combine's, just made by a first call
    through ``append_kv`` and :func:`forward_kvcache`) bound for the frontend's repeated steps
    (Backend.kvcache_runner): ``run(q, k_cache, v_cache, k, v, cache_seqlens, block_table)`` appends, attends and
    returns ``(out, lse)``, or None (nothing done) when a tensor is not 16-byte aligned, as the plans need.
    No ALiBi, cache_batch_idx, left padding or fp8 (the frontend's fast path has none). When the caller drops the
    lse, every step writes it into one buffer kept with the runner (fastpath.lse_scratch)."""
    from . import append_launch

    appending = k is not None and k.shape[1] > 0
    lead = [q, k_cache, v_cache, cache_seqlens, *([k, v] if appending else []),
            *([] if block_table is None else [block_table])]  # fmt: skip
    if not fastpath.enabled() or not all(fastpath.aligned(t) for t in lead):
        return None
    append = None
    if appending:
        if not append_launch.fusable(k_cache, v_cache, k, v):
            return None
        append = append_launch.plans.get(append_launch.plan_key(k_cache, v_cache, k, v, cache_seqlens, None,
                                                                block_table))  # fmt: skip
        if append is None:
            return None
    # The lengths after the append are a fresh (B,) int32 vector: the plan key sees them as it sees cache_seqlens.
    info = KVCacheInfo(cache_seqlens, None, block_table, None, num_splits)
    plan = plans.get(plan_key(q, k_cache, v_cache, info, None, params, None))
    if plan is None:
        return None
    batch, head_dim_v, dtype, where = q.shape[0], v_cache.shape[3], q.dtype, q.device
    splits, part_shape, split, combine = plan.splits, plan.part_shape, plan.split, plan.combine
    lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    # With one split the split kernel writes the outputs themselves: lse is a view of the call's own buffer.
    scratch = None if keep_lse or splits == 1 else fastpath.lse_scratch(lse_shape, where)

    # Append plans a later step makes: "int" (an int length, passed as a number), "checked" (tensor lengths whose
    # range the append kernel asserts, so the frontend launches no check kernel).
    made: dict[str, append_launch.AppendPlan] = {}
    capacity = k_cache.shape[1] * (1 if block_table is None else block_table.shape[1])
    high = capacity - (k.shape[1] if appending else 0)

    def run(q, k_cache, v_cache, k, v, cache_seqlens, block_table,
            check: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:  # fmt: skip
        """``check``: the caller left the range of tensor lengths to this step (no step without an append can)."""
        scalar = type(cache_seqlens) is int  # every row's length, checked by the frontend; needs the append
        if (scalar or check) and append is None:
            return None
        pointers = q.data_ptr() | k_cache.data_ptr() | v_cache.data_ptr()
        total = cache_seqlens
        if append is not None:
            total = torch.empty(batch, dtype=torch.int32, device=where)
            pointers |= k.data_ptr() | v.data_ptr() | total.data_ptr()
        seqlens = total if scalar else cache_seqlens
        table = seqlens if block_table is None else block_table
        pointers |= seqlens.data_ptr() | table.data_ptr()
        out = torch.empty(q.shape[0], q.shape[1], q.shape[2], head_dim_v, dtype=dtype, device=where)
        if splits == 1:
            lse = torch.empty(lse_shape, dtype=torch.float32, device=where)
            out_part, lse_part = out.permute(0, 2, 1, 3).unsqueeze(0), lse.unsqueeze(0)
        else:
            lse = torch.empty(lse_shape, dtype=torch.float32, device=where) if scratch is None else scratch
            out_part = torch.empty(part_shape, dtype=torch.float32, device=where)
            lse_part = torch.empty(part_shape[:-1], dtype=torch.float32, device=where)
        if (pointers | out.data_ptr() | lse.data_ptr() | out_part.data_ptr() | lse_part.data_ptr()) & 15:
            return None  # before any write: the caller takes the general path
        if append is not None:
            variant = "int" if scalar else "checked" if check else None
            plan = append if variant is None else made.get(variant)
            if plan is not None:
                plan.launch(k_cache, v_cache, k, v, seqlens, seqlens, table, total, cache_seqlens if scalar else 0)
            else:  # the first step of its kind: the general append compiles that kernel and makes its plan
                checked = high if check else None
                total = append_launch.append_kv(k_cache, v_cache, k, v, cache_seqlens, None, block_table, checked)
                new = append_launch.plans.get(append_launch.plan_key(k_cache, v_cache, k, v, cache_seqlens, None,
                                                                     block_table, checked))  # fmt: skip
                if new is not None:
                    made[variant] = new
        # SLOPES, BATCH_IDX, LEFTPAD and the descales are off: the lengths stand in (_pointer_args, _descales).
        split(q, k_cache, v_cache, total, total, total, table, total, out_part, lse_part, total, total, total)
        if combine is not None:
            combine(out_part, lse_part, out, lse)
        return out, lse

    return run


def _remember(key, q, split_kernel, split_grid, split_args, splits, combine_kernel, combine_grid, combine_args,
              part_shape, use_tma: bool) -> None:  # fmt: skip
    if fastpath.leading(kvcache_split_fwd, len(_SPLIT_LEAD)) != _SPLIT_LEAD:
        return
    if fastpath.leading(combine_splits, len(_COMBINE_LEAD)) != _COMBINE_LEAD:
        return
    split = fastpath.bind(kvcache_split_fwd, split_kernel, split_grid, split_args[len(_SPLIT_LEAD) :], q.device,
                          use_tma)  # fmt: skip
    if split is None:
        return
    combine = None
    if splits > 1:
        combine = fastpath.bind(combine_splits, combine_kernel, combine_grid, combine_args[len(_COMBINE_LEAD) :],
                                q.device, False)  # fmt: skip
        if combine is None:
            return
    plans.put(key, DecodePlan(split, splits, combine, part_shape))
