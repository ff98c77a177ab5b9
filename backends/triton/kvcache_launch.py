"""Host side of the split-KV decoding kernel: tile sizes, split count, workspace and the two launches."""

from __future__ import annotations

import torch
import triton

from attnkit.params import AttentionParams, KVCacheInfo

from . import probes
from .kvcache_kernel import combine_splits, kvcache_split_fwd

# Enough programs for about two waves; more splits only add combine work.
_WAVES = 2
_MAX_SPLITS = 128


def _block_n(paged: bool, page_size: int) -> int:
    for candidate in (64, 32, 16):  # must divide the page so a key block stays inside one page
        if not paged or page_size % candidate == 0:
            return candidate
    return 16


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
) -> tuple[torch.Tensor, torch.Tensor]:
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
    out = torch.empty(batch, seqlen_q, heads_q, head_dim_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads_q, seqlen_q, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))

    seqlens = info.cache_seqlens
    dummy = seqlens  # stands in for absent optional tensors; never read (the constexpr flag is off)
    slopes = alibi if alibi is not None else dummy
    slope_stride_b = alibi.stride(0) if alibi is not None and alibi.dim() == 2 else 0
    block_table = info.block_table if paged else dummy
    batch_idx = info.cache_batch_idx if info.cache_batch_idx is not None else dummy
    interpreted = probes.interpreter_enabled()
    kvcache_split_fwd[(splits, batch * heads_k, m_blocks)](
        q, k_cache, v_cache, slopes, seqlens, batch_idx, block_table, out_part, lse_part,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        slope_stride_b, block_table.stride(0) if paged else 0,
        *out_part.stride()[:4],
        *lse_part.stride()[:3],
        seqlen_q, group, heads_k, keys_per_split,
        params.softmax_scale * 1.4426950408889634, params.softcap, params.window_left, params.window_right,
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_DV=max(16, triton.next_power_of_2(head_dim_v)),
        BLOCK_M=block_m, BLOCK_N=block_n, PAGE_SIZE=max(page_size, 1),
        PAGED=paged, HAS_BATCH_IDX=info.cache_batch_idx is not None, HAS_ALIBI=alibi is not None,
        HAS_SOFTCAP=params.softcap > 0, HAS_WINDOW_LEFT=params.window_left >= 0,
        HAS_WINDOW_RIGHT=params.window_right >= 0,
        UPCAST=interpreted, DOT_PRECISION="ieee" if q.dtype == torch.float32 and not interpreted else "tf32",
        num_warps=4, num_stages=2,
    )  # fmt: skip
    combine_splits[(batch * heads_q * seqlen_q,)](
        out_part, lse_part, out, lse, splits, heads_q, seqlen_q,
        *out_part.stride()[:4],
        *lse_part.stride()[:3],
        out.stride(0), out.stride(1), out.stride(2),
        HEAD_DIM_V=head_dim_v, BLOCK_DV=max(16, triton.next_power_of_2(head_dim_v)),
        BLOCK_SPLITS=max(2, triton.next_power_of_2(splits)),
        num_warps=1 if head_dim_v <= 64 else 2,
    )  # fmt: skip
    return out, lse
