"""``torch.library`` custom ops wrapping the backends, with fake implementations for ``torch.compile``.

The frontend validates input and picks a backend; these ops only carry tensors and plain scalars (the backend by
name), so they trace cleanly. Autograd is registered on the forward ops; the backward ops are custom ops too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import sink as sink_rule
from ..params import AttentionParams, KVCacheInfo, VarlenInfo, lse_dtype
from ..registry import REGISTRY


def _params(softmax_scale, causal, window_left, window_right, softcap, dropout_p, dropout_seed, deterministic):
    return AttentionParams(
        softmax_scale=softmax_scale,
        causal=causal,
        window_left=window_left,
        window_right=window_right,
        softcap=softcap,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        deterministic=deterministic,
    )


def _positive_scale(softmax_scale: float, *queries: Tensor) -> tuple[float, list[Tensor], bool]:
    """Backends get ``softmax_scale >= 0``: a negative scale moves into the queries (and back out of dq).

    ``s * (q . k) == (-s) * ((-q) . k)`` bit for bit: negation is exact and rounding is symmetric. Kernels that take
    the row maximum of the raw dot product before scaling (the Triton forward's unmasked fast path) are right only
    for scales >= 0, and keep their hot loop. Done here, in the ops, so every caller of them is covered.
    """
    if softmax_scale < 0:
        return -softmax_scale, [-x for x in queries], True
    return softmax_scale, list(queries), False


def _varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    if cu_seqlens_q is None:
        return None
    return VarlenInfo(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


# ---- attention / attention_varlen ----------------------------------------------------------------------------


@torch.library.custom_op("attnkit::attention_forward", mutates_args=())
def attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
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
    deterministic: bool,
    backend: str,
    learnable_sink: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    softmax_scale, (q,), _ = _positive_scale(softmax_scale, q)
    params = _params(softmax_scale, causal, window_left, window_right, softcap, dropout_p, dropout_seed, deterministic)
    varlen = _varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if learnable_sink is None:  # backends without the "sink" feature never see the keyword
        return REGISTRY.get(backend).forward(q, k, v, alibi_slopes, params, varlen)
    return REGISTRY.get(backend).forward(q, k, v, alibi_slopes, params, varlen, learnable_sink=learnable_sink)


@attention_forward.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes, *rest):
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    if cu_seqlens_q is None:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=lse_dtype(q.dtype))
    else:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=lse_dtype(q.dtype))
    return out, lse


@torch.library.custom_op("attnkit::attention_backward", mutates_args=())
def attention_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
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
    deterministic: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    softmax_scale, (q,), flipped = _positive_scale(softmax_scale, q)
    params = _params(softmax_scale, causal, window_left, window_right, softcap, dropout_p, dropout_seed, deterministic)
    varlen = _varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    dq, dk, dv = REGISTRY.get(backend).backward(dout, q, k, v, out, lse, alibi_slopes, params, varlen)
    return (-dq if flipped else dq), dk, dv


@attention_backward.register_fake
def _(dout, q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, alibi, *scalars = inputs[:17]
    sink = inputs[17] if len(inputs) > 17 else None
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi, sink)
    ctx.scalars = (max_q, max_k, *scalars)
    ctx.mark_non_differentiable(lse)


def _attention_grad(ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k, alibi, sink = ctx.saved_tensors
    max_q, max_k, *scalars = ctx.scalars
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    # The saved lse includes the sink, so the backends' backward needs no sink of its own.
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, alibi, *scalars)
    dsink = None
    if sink is not None and ctx.needs_input_grad[17]:
        dsink = sink_rule.grad(sink, dout, out, lse, varlen=cu_q is not None).to(sink.dtype)
    return (dq, dk, dv) + (None,) * 14 + (dsink,)


attention_forward.register_autograd(_attention_grad, setup_context=_attention_setup)


# ---- piecewise -----------------------------------------------------------------------------------------------


@torch.library.custom_op("attnkit::piecewise_forward", mutates_args=())
def piecewise_forward(
    q1: Tensor,
    k1: Tensor,
    q2: Tensor,
    k2: Tensor,
    v: Tensor,
    dist_threshold: int,
    softmax_scale: float,
    causal: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    softmax_scale, (q1, q2), _ = _positive_scale(softmax_scale, q1, q2)
    params = AttentionParams(softmax_scale=softmax_scale, causal=causal, window_right=0 if causal else -1)
    return REGISTRY.get(backend).piecewise_forward(q1, k1, q2, k2, v, dist_threshold, params)


@piecewise_forward.register_fake
def _(q1, k1, q2, k2, v, *rest):
    out = q1.new_empty((*q1.shape[:-1], v.shape[-1]))
    return out, q1.new_empty((q1.shape[0], q1.shape[2], q1.shape[1]), dtype=lse_dtype(q1.dtype))


@torch.library.custom_op("attnkit::piecewise_backward", mutates_args=())
def piecewise_backward(
    dout: Tensor,
    q1: Tensor,
    k1: Tensor,
    q2: Tensor,
    k2: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dist_threshold: int,
    softmax_scale: float,
    causal: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    softmax_scale, (q1, q2), flipped = _positive_scale(softmax_scale, q1, q2)
    params = AttentionParams(softmax_scale=softmax_scale, causal=causal, window_right=0 if causal else -1)
    dq1, dk1, dq2, dk2, dv = REGISTRY.get(backend).piecewise_backward(
        dout, q1, k1, q2, k2, v, out, lse, dist_threshold, params
    )
    if flipped:
        dq1, dq2 = -dq1, -dq2
    return dq1, dk1, dq2, dk2, dv


@piecewise_backward.register_fake
def _(dout, q1, k1, q2, k2, v, *rest):
    return tuple(torch.empty_like(x) for x in (q1, k1, q2, k2, v))


def _piecewise_setup(ctx, inputs, output):
    q1, k1, q2, k2, v, *scalars = inputs
    out, lse = output
    ctx.save_for_backward(q1, k1, q2, k2, v, out, lse)
    ctx.scalars = scalars
    ctx.mark_non_differentiable(lse)


def _piecewise_grad(ctx, dout, _dlse):
    q1, k1, q2, k2, v, out, lse = ctx.saved_tensors
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    grads = piecewise_backward(dout, q1, k1, q2, k2, v, out, lse, *ctx.scalars)
    return (*grads, None, None, None, None)


piecewise_forward.register_autograd(_piecewise_grad, setup_context=_piecewise_setup)


# ---- kv cache (forward only, like flash-attn) -----------------------------------------------------------------


@torch.library.custom_op("attnkit::kvcache_forward", mutates_args=())
def kvcache_forward(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    cache_batch_idx: Tensor | None,
    block_table: Tensor | None,
    cache_leftpad: Tensor | None,
    alibi_slopes: Tensor | None,
    softmax_scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    num_splits: int,
    backend: str,
) -> tuple[Tensor, Tensor]:
    params = _params(softmax_scale, causal, window_left, window_right, softcap, 0.0, 0, False)
    info = KVCacheInfo(cache_seqlens, cache_batch_idx, block_table, cache_leftpad, num_splits)
    return REGISTRY.get(backend).forward_kvcache(q, k_cache, v_cache, info, alibi_slopes, params)


@kvcache_forward.register_fake
def _(q, k_cache, v_cache, *rest):
    out = q.new_empty((*q.shape[:-1], v_cache.shape[-1]))
    return out, q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=lse_dtype(q.dtype))
