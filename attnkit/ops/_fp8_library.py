"""``torch.library`` custom ops for float8_e4m3fn inputs (forward only), with fake implementations.

As in :mod:`._library`, the ops carry only tensors and plain scalars (the backend by name, the output dtype as
a ``ScalarType``); nothing registers autograd, since the frontend refuses fp8 calls that need gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..fp8 import Fp8Scales
from ..params import AttentionParams, KVCacheInfo, VarlenInfo
from ..registry import REGISTRY


@torch.library.custom_op("attnkit::fp8_attention_forward", mutates_args=())
def fp8_attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_descale: Tensor,
    k_descale: Tensor,
    v_descale: Tensor,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    alibi_slopes: Tensor | None,
    softmax_scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    dropout_p: float,
    dropout_seed: int,
    out_dtype: torch.dtype,
    backend: str,
) -> tuple[Tensor, Tensor]:
    params = AttentionParams(
        softmax_scale=softmax_scale, causal=causal, window_left=window_left, window_right=window_right,
        softcap=softcap, dropout_p=dropout_p, dropout_seed=dropout_seed,
    )  # fmt: skip
    varlen = None if cu_seqlens_q is None else VarlenInfo(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    scales = Fp8Scales(q_descale, k_descale, v_descale, out_dtype)
    return REGISTRY.get(backend).forward_fp8(q, k, v, alibi_slopes, params, varlen, scales)


@fp8_attention_forward.register_fake
def _(q, k, v, q_descale, k_descale, v_descale, cu_seqlens_q, *rest):
    out_dtype = rest[-2]
    out = q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=out_dtype)
    if cu_seqlens_q is None:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("attnkit::fp8_kvcache_forward", mutates_args=())
def fp8_kvcache_forward(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    q_descale: Tensor,
    k_descale: Tensor,
    v_descale: Tensor,
    cache_seqlens: Tensor,
    cache_batch_idx: Tensor | None,
    block_table: Tensor | None,
    alibi_slopes: Tensor | None,
    softmax_scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    out_dtype: torch.dtype,
    backend: str,
) -> tuple[Tensor, Tensor]:
    params = AttentionParams(
        softmax_scale=softmax_scale, causal=causal, window_left=window_left, window_right=window_right,
        softcap=softcap,
    )  # fmt: skip
    info = KVCacheInfo(cache_seqlens, cache_batch_idx, block_table)
    scales = Fp8Scales(q_descale, k_descale, v_descale, out_dtype)
    return REGISTRY.get(backend).forward_kvcache_fp8(q, k_cache, v_cache, info, alibi_slopes, params, scales)


@fp8_kvcache_forward.register_fake
def _(q, k_cache, v_cache, *rest):
    out = q.new_empty((*q.shape[:-1], v_cache.shape[-1]), dtype=rest[-2])
    return out, q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    alibi_slopes: Tensor | None,
    params: AttentionParams,
    scales: Fp8Scales,
    backend: str,
    out_shape: tuple[int, ...],
    lse_shape: tuple[int, ...],
) -> tuple[Tensor, Tensor]:
    """The fp8 op for ``attention`` / ``attention_varlen``; calls without queries or keys give zeros (lse -inf)."""
    if q.numel() == 0 or max_seqlen_q == 0 or max_seqlen_k == 0:
        out = torch.zeros(out_shape, dtype=scales.out_dtype, device=q.device)
        return out, torch.full(lse_shape, float("-inf"), dtype=torch.float32, device=q.device)
    return fp8_attention_forward(
        q, k, v, scales.q_descale, scales.k_descale, scales.v_descale, cu_seqlens_q, cu_seqlens_k,
        max_seqlen_q, max_seqlen_k, alibi_slopes, params.softmax_scale, params.causal, params.window_left,
        params.window_right, params.softcap, params.dropout_p, params.dropout_seed, scales.out_dtype, backend,
    )  # fmt: skip


def kvcache_forward(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    cache_batch_idx: Tensor | None,
    block_table: Tensor | None,
    alibi_slopes: Tensor | None,
    params: AttentionParams,
    scales: Fp8Scales,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """The fp8 op for ``attention_with_kvcache`` (after the append)."""
    return fp8_kvcache_forward(
        q, k_cache, v_cache, scales.q_descale, scales.k_descale, scales.v_descale, cache_seqlens, cache_batch_idx,
        block_table, alibi_slopes, params.softmax_scale, params.causal, params.window_left, params.window_right,
        params.softcap, scales.out_dtype, backend,
    )  # fmt: skip
