"""The ``torch.ops.attnkit`` operators of float8_e4m3fn calls (forward only; see :mod:`attnkit.fp8`).

They are declared on the same ``torch.library.Library`` as the other operators (:mod:`._library`) and follow its
rules: only tensors and plain scalars cross the op (the descales as float32 ``(batch, nheads_k)`` tensors, the
output dtype as a ``ScalarType``, the backend as a registry name or a request token, decided inside the op from
the real shapes with the ``fp8`` feature set), exact fake kernels (``out`` contiguous in ``out_dtype``, lse
float32), and an autograd kernel. There is no derivative: the frontends refuse fp8 calls that need one, and the
autograd kernel raises the same error for a direct call of the op with an input that requires grad.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InvalidArgumentError
from ..fp8 import Fp8Scales
from ..params import AttentionParams
from . import _library

_LIB = _library._LIB
_below_autograd = _library._below_autograd

_LIB.define(
    "fp8_attention_forward(Tensor q, Tensor k, Tensor v, Tensor q_descale, Tensor k_descale, Tensor v_descale, "
    "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, Tensor? alibi_slopes, "
    f"ScalarType out_dtype, {_library._SCALARS}, Tensor? dropout_seed_tensor=None) -> (Tensor, Tensor)"
)
# As kvcache_forward: the append writes k_cache and v_cache in place, declared so that torch.compile keeps it.
_LIB.define(
    "fp8_kvcache_forward(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v, Tensor q_descale, "
    "Tensor k_descale, Tensor v_descale, Tensor cache_seqlens, Tensor? cache_batch_idx, Tensor? block_table, "
    "Tensor? cache_leftpad, Tensor? alibi_slopes, ScalarType out_dtype, float softmax_scale, bool causal, "
    "SymInt window_left, SymInt window_right, float softcap, SymInt num_splits, str backend) -> (Tensor, Tensor)"
)

_fp8_attention_forward = torch.ops.attnkit.fp8_attention_forward.default
_fp8_kvcache_forward = torch.ops.attnkit.fp8_kvcache_forward.default


def _call(op, args):
    # The frontends have refused inputs that require grad, so eager calls go below the autograd key at once.
    if torch.compiler.is_compiling():
        return op(*args)
    with _below_autograd():
        return op(*args)


# ---- implementations and fakes ---------------------------------------------------------------------------------


def _attention_impl(q, k, v, q_descale, k_descale, v_descale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                    max_seqlen_k, alibi_slopes, out_dtype, softmax_scale, causal, window_left, window_right, softcap,
                    dropout_p, dropout_seed, deterministic, backend, dropout_seed_tensor=None):  # fmt: skip
    # No sign flip of a negative softmax_scale here (the other ops move it into q): the fp8 kernels take the row
    # maximum after scaling, since q_descale * k_descale may be negative anyway.
    params = _library.params_of(softmax_scale, causal, window_left, window_right, softcap, dropout_p, dropout_seed,
                                deterministic, dropout_seed_tensor)  # fmt: skip
    chosen = _library.attention_backend(backend, q, k, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k, alibi_slopes,
                                        params, False, fp8=True)  # fmt: skip
    varlen = _library.varlen_of(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    scales = Fp8Scales(q_descale, k_descale, v_descale, out_dtype)
    out, lse = chosen.forward_fp8(q, k, v, alibi_slopes, params, varlen, scales)
    return out.contiguous(), lse.contiguous()


def _attention_fake(q, k, v, q_descale, k_descale, v_descale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                    max_seqlen_k, alibi_slopes, out_dtype, *rest):  # fmt: skip
    out = q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=out_dtype)
    if cu_seqlens_q is None:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return out, lse


def _kvcache_impl(q, k_cache, v_cache, k, v, q_descale, k_descale, v_descale, cache_seqlens, cache_batch_idx,
                  block_table, cache_leftpad, alibi_slopes, out_dtype, softmax_scale, causal, window_left,
                  window_right, softcap, num_splits, backend):  # fmt: skip
    params = _library.params_of(softmax_scale, causal, window_left, window_right, softcap, 0.0, 0, False)
    scales = Fp8Scales(q_descale, k_descale, v_descale, out_dtype)
    return _library.run_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table,
                                cache_leftpad, alibi_slopes, params, num_splits, backend, scales)  # fmt: skip


def _kvcache_fake(q, k_cache, v_cache, k, v, q_descale, k_descale, v_descale, cache_seqlens, cache_batch_idx,
                  block_table, cache_leftpad, alibi_slopes, out_dtype, *rest):  # fmt: skip
    out = q.new_empty((*q.shape[:-1], v_cache.shape[-1]), dtype=out_dtype)
    return out, q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


def _forward_only(op, tensor_names: tuple[str, ...]):
    """Autograd kernel: the op has no derivative. An input that would need one raises (naming it), rather than
    produce outputs that silently drop the gradient."""

    def kernel(*args):
        if torch.is_grad_enabled():
            for name, x in zip(tensor_names, args):
                if isinstance(x, Tensor) and x.requires_grad:
                    raise InvalidArgumentError(
                        f"{name} requires grad, but fp8 attention is forward only (no backward, like "
                        "FlashAttention-3's); call it under torch.no_grad() or pass detached tensors"
                    )
        with _below_autograd():
            return op(*args)

    return kernel


_ATTENTION_TENSORS = ("q", "k", "v", "q_descale", "k_descale", "v_descale", "cu_seqlens_q", "cu_seqlens_k",
                      "max_seqlen_q", "max_seqlen_k", "alibi_slopes")  # fmt: skip
_KVCACHE_TENSORS = ("q", "k_cache", "v_cache", "k", "v", "q_descale", "k_descale", "v_descale", "cache_seqlens",
                    "cache_batch_idx", "block_table", "cache_leftpad", "alibi_slopes")  # fmt: skip


def _register() -> None:
    impls = {
        "fp8_attention_forward": (_attention_impl, _attention_fake, _forward_only(_fp8_attention_forward,
                                                                                  _ATTENTION_TENSORS)),
        "fp8_kvcache_forward": (_kvcache_impl, _kvcache_fake, _forward_only(_fp8_kvcache_forward, _KVCACHE_TENSORS)),
    }  # fmt: skip
    for name, (impl, fake, autograd) in impls.items():
        _LIB.impl(name, impl, "CompositeExplicitAutograd")
        _LIB.impl(name, autograd, "Autograd")
        torch.library.register_fake(f"attnkit::{name}", fake, lib=_LIB)


_register()


# ---- what the frontends call -----------------------------------------------------------------------------------


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
    dropout_seed_tensor: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``fp8_attention_forward`` for ``attention`` / ``attention_varlen``; calls without queries or keys give zeros
    in ``out_dtype`` (lse -inf) without the op."""
    if q.numel() == 0 or max_seqlen_q == 0 or max_seqlen_k == 0:
        out = torch.zeros(out_shape, dtype=scales.out_dtype, device=q.device)
        return out, torch.full(lse_shape, float("-inf"), dtype=torch.float32, device=q.device)
    return _call(_fp8_attention_forward, (
        q, k, v, scales.q_descale, scales.k_descale, scales.v_descale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, alibi_slopes, scales.out_dtype, params.softmax_scale, params.causal, params.window_left,
        params.window_right, params.softcap, params.dropout_p, params.dropout_seed, params.deterministic, backend,
        dropout_seed_tensor,
    ))  # fmt: skip


def kvcache_forward(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None,
    v: Tensor | None,
    cache_seqlens: Tensor,
    cache_batch_idx: Tensor | None,
    block_table: Tensor | None,
    cache_leftpad: Tensor | None,
    alibi_slopes: Tensor | None,
    params: AttentionParams,
    num_splits: int,
    scales: Fp8Scales,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """``fp8_kvcache_forward`` for ``attention_with_kvcache``: appends ``k``/``v`` (when given), then attends."""
    return _call(_fp8_kvcache_forward, (
        q, k_cache, v_cache, k, v, scales.q_descale, scales.k_descale, scales.v_descale, cache_seqlens,
        cache_batch_idx, block_table, cache_leftpad, alibi_slopes, scales.out_dtype, params.softmax_scale,
        params.causal, params.window_left, params.window_right, params.softcap, num_splits, backend,
    ))  # fmt: skip
