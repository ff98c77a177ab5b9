"""The ``torch.ops.attnkit`` operators that run the backends, with fake kernels and autograd for ``torch.compile``.

The frontend validates input; these ops carry only tensors and plain scalars, and the backend travels as a string:
a registry name (eager calls, chosen by the frontend), or a request token from :mod:`attnkit.dispatch` (calls
traced by ``torch.compile``), which the implementation turns into a backend when it runs, from the real shapes.

Layouts: every output is a new contiguous tensor (``out (B, Sq, Hq, Dv)``, ``lse (B, Hq, Sq)``; varlen
``(Tq, Hq, Dv)`` and ``(Hq, Tq)``; gradients contiguous in the shapes of their inputs, whatever the inputs'
strides). The fake kernels give exactly these shapes and strides; a backend that returns another layout is
copied into this one.

The ops are declared with ``torch.library.Library`` and a hand-written autograd kernel rather than
``torch.library.custom_op``: the same schema, fake and autograd registration, at about half the dispatch cost
per call (``attnkit bench --mode overhead``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import dispatch
from .. import sink as sink_rule
from ..fp8 import Fp8Scales
from ..params import AttentionParams, KVCacheInfo, VarlenInfo, lse_dtype
from ..registry import REGISTRY, Backend
from ..spec import feature_bits
from . import _kvcache_checks

_LIB = torch.library.Library("attnkit", "DEF")

_SCALARS = (
    "float softmax_scale, bool causal, SymInt window_left, SymInt window_right, float softcap, float dropout_p, "
    "SymInt dropout_seed, bool deterministic, str backend"
)
# Trailing optional tensors have defaults, so callers that pass neither (attnkit.distributed) need not know them;
# the dispatcher then leaves them out of the arguments it hands the Python kernels, hence their defaults below.
_LIB.define(
    "attention_forward(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
    f"SymInt max_seqlen_q, SymInt max_seqlen_k, Tensor? alibi_slopes, {_SCALARS}, Tensor? learnable_sink=None, "
    "Tensor? dropout_seed_tensor=None) -> (Tensor, Tensor)"
)
_LIB.define(
    "attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? cu_seqlens_q, "
    f"Tensor? cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, Tensor? alibi_slopes, {_SCALARS}, "
    "Tensor? dropout_seed_tensor=None) -> (Tensor, Tensor, Tensor)"
)
_LIB.define(
    "piecewise_forward(Tensor q1, Tensor k1, Tensor q2, Tensor k2, Tensor v, SymInt dist_threshold, "
    "float softmax_scale, bool causal, str backend) -> (Tensor, Tensor)"
)
_LIB.define(
    "piecewise_backward(Tensor dout, Tensor q1, Tensor k1, Tensor q2, Tensor k2, Tensor v, Tensor out, Tensor lse, "
    "SymInt dist_threshold, float softmax_scale, bool causal, str backend) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
# The append writes k_cache and v_cache in place: declared (a!)/(b!) so that torch.compile keeps the write.
_LIB.define(
    "kvcache_forward(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v, Tensor cache_seqlens, "
    "Tensor? cache_batch_idx, Tensor? block_table, Tensor? cache_leftpad, Tensor? alibi_slopes, float softmax_scale, "
    "bool causal, SymInt window_left, SymInt window_right, float softcap, SymInt num_splits, str backend) "
    "-> (Tensor, Tensor)"
)

_attention_forward = torch.ops.attnkit.attention_forward.default
_attention_backward = torch.ops.attnkit.attention_backward.default
_piecewise_forward = torch.ops.attnkit.piecewise_forward.default
_piecewise_backward = torch.ops.attnkit.piecewise_backward.default
_kvcache_forward = torch.ops.attnkit.kvcache_forward.default
_below_autograd = torch._C._AutoDispatchBelowAutograd
# attention_forward's arguments as the schema declares them: the autograd kernel returns one gradient per argument
# (q, k, v and the learnable sink are the differentiable ones).
_FORWARD_ARGS = tuple(a.name for a in _attention_forward._schema.arguments)
_FORWARD_ARITY = len(_FORWARD_ARGS)
_SINK_ARG = _FORWARD_ARGS.index("learnable_sink")
# The backward op as is (attnkit.distributed calls it for its blocks; it has no derivative of its own).
attention_backward = _attention_backward


# What the frontends call. A call that autograd will not record goes below the autograd key at once: the op's
# autograd kernel would only do the same, and each trip through the dispatcher into Python costs microseconds.
def _records_grad(q, k, v, sink) -> bool:
    return q.requires_grad or k.requires_grad or v.requires_grad or (sink is not None and sink.requires_grad)


def attention_forward(*args):
    # the learnable sink, when given: a differentiable input like q, k and v
    sink = args[_SINK_ARG] if len(args) > _SINK_ARG else None
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and _records_grad(args[0], args[1], args[2], sink)):
        return _attention_forward(*args)
    with _below_autograd():
        return _attention_forward(*args)


def piecewise_forward(*args):
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in args[:5])):
        return _piecewise_forward(*args)
    with _below_autograd():
        return _piecewise_forward(*args)


def kvcache_forward(*args):
    if torch.compiler.is_compiling():
        return _kvcache_forward(*args)
    with _below_autograd():  # no derivative: the op's autograd kernel does the same
        return _kvcache_forward(*args)


# Frozen records per scalar tuple: building one costs more than looking it up (not cached with dropout, whose seed
# is new every call).
_PARAMS: dict[tuple, AttentionParams] = {}


def params_of(softmax_scale, causal, window_left, window_right, softcap, dropout_p, dropout_seed, deterministic,
            dropout_seed_tensor=None):  # fmt: skip
    if dropout_seed_tensor is not None:  # drawn in a compiled graph
        dropout_seed = int(dropout_seed_tensor)
    key = (softmax_scale, causal, window_left, window_right, softcap, dropout_p, dropout_seed, deterministic)
    params = _PARAMS.get(key)
    if params is None:
        params = AttentionParams(*key)
        if not dropout_p:
            if len(_PARAMS) >= 1024:
                _PARAMS.clear()
            _PARAMS[key] = params
    return params


def _positive_scale(softmax_scale: float, *queries: Tensor) -> tuple[float, list[Tensor], bool]:
    """Backends get ``softmax_scale >= 0``: a negative scale moves into the queries (and back out of dq).

    ``s * (q . k) == (-s) * ((-q) . k)`` bit for bit: negation is exact and rounding is symmetric. Kernels that take
    the row maximum of the raw dot product before scaling (the Triton forward's unmasked fast path) are right only
    for scales >= 0, and keep their hot loop. Done here, in the ops, so every caller of them is covered.
    """
    if softmax_scale < 0:
        return -softmax_scale, [-x for x in queries], True
    return softmax_scale, list(queries), False


def varlen_of(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    if cu_seqlens_q is None:
        return None
    return VarlenInfo(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


def _backend(backend: str, op: str, q: Tensor, k: Tensor, v: Tensor, batch: int, seqlen_q: int, seqlen_k: int,
             params: AttentionParams, alibi: bool, requires_grad: bool, sink: bool = False,
             fp8: bool = False) -> Backend:  # fmt: skip
    """The backend to run: named by the frontend, or decided now from a request token (a traced call)."""
    if not backend.startswith(dispatch.TOKEN_PREFIX):
        return REGISTRY.get(backend)
    _, traced = dispatch.parse_token(backend)
    merged = False
    if traced is not None:
        requires_grad, merged = traced[0] or requires_grad, traced[1]
    hq, d, hk, dv = q.shape[-2], q.shape[-1], k.shape[-2], v.shape[-1]
    bits = feature_bits(
        params.causal, params.has_window, alibi, params.softcap > 0, params.dropout_p > 0, hq != hk, dv != d,
        params.deterministic and requires_grad, sink, fp8,
    )  # fmt: skip
    name = dispatch.decide(
        backend, op, q.device, q.dtype, d, dv, hq, hk, batch, seqlen_q, seqlen_k, bits, requires_grad, merged
    )
    return REGISTRY.get(name)


def attention_backend(backend, q, k, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k, alibi, params, requires_grad,
                      sink=False, fp8=False):  # fmt: skip
    if cu_seqlens_q is None:
        return _backend(backend, "attention", q, k, v, q.shape[0], q.shape[1], k.shape[1], params, alibi is not None,
                        requires_grad, sink, fp8)  # fmt: skip
    return _backend(backend, "varlen", q, k, v, cu_seqlens_q.shape[0] - 1, max_seqlen_q, max_seqlen_k, params,
                    alibi is not None, requires_grad, sink, fp8)  # fmt: skip


# ---- attention / attention_varlen ----------------------------------------------------------------------------


def _attention_forward_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes,
                            softmax_scale, causal, window_left, window_right, softcap, dropout_p, dropout_seed,
                            deterministic, backend, learnable_sink=None, dropout_seed_tensor=None):  # fmt: skip
    softmax_scale, (q,), _ = _positive_scale(softmax_scale, q)
    params = params_of(softmax_scale, causal, window_left, window_right, softcap, dropout_p, dropout_seed,
                       deterministic, dropout_seed_tensor)  # fmt: skip
    chosen = attention_backend(backend, q, k, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k, alibi_slopes, params,
                                False, learnable_sink is not None)  # fmt: skip
    varlen = varlen_of(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if learnable_sink is None:  # backends without the "sink" feature never see the keyword
        out, lse = chosen.forward(q, k, v, alibi_slopes, params, varlen)
    else:
        out, lse = chosen.forward(q, k, v, alibi_slopes, params, varlen, learnable_sink=learnable_sink)
    return out.contiguous(), lse.contiguous()


def _attention_forward_fake(q, k, v, cu_seqlens_q, *rest):
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    if cu_seqlens_q is None:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=lse_dtype(q.dtype))
    else:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=lse_dtype(q.dtype))
    return out, lse


def _attention_backward_impl(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             alibi_slopes, softmax_scale, causal, window_left, window_right, softcap, dropout_p,
                             dropout_seed, deterministic, backend, dropout_seed_tensor=None):  # fmt: skip
    softmax_scale, (q,), flipped = _positive_scale(softmax_scale, q)
    params = params_of(softmax_scale, causal, window_left, window_right, softcap, dropout_p, dropout_seed,
                       deterministic, dropout_seed_tensor)  # fmt: skip
    chosen = attention_backend(backend, q, k, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k, alibi_slopes, params,
                                True)  # fmt: skip
    varlen = varlen_of(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    dq, dk, dv = chosen.backward(dout, q, k, v, out, lse, alibi_slopes, params, varlen)
    return (-dq if flipped else dq).contiguous(), dk.contiguous(), dv.contiguous()


def _backward_fake(dout, *inputs_and_rest, count: int):
    return tuple(x.new_empty(x.shape) for x in inputs_and_rest[:count])


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, alibi, *rest):  # type: ignore[override]
        *scalars, sink, seed_tensor = rest  # the nine scalars, learnable_sink, dropout_seed_tensor
        with _below_autograd():
            out, lse = _attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, alibi, *scalars, sink, seed_tensor)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi, sink, seed_tensor)
        ctx.scalars = (max_q, max_k, *scalars)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, _dlse):  # type: ignore[override]
        q, k, v, out, lse, cu_q, cu_k, alibi, sink, seed_tensor = ctx.saved_tensors
        max_q, max_k, *scalars = ctx.scalars
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        # The saved lse includes the sink, so the backends' backward needs no sink of its own.
        dq, dk, dv = _attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, alibi, *scalars,
                                         seed_tensor)  # fmt: skip
        dsink = None
        if sink is not None and ctx.needs_input_grad[_SINK_ARG]:
            dsink = sink_rule.grad(sink, dout, out, lse, varlen=cu_q is not None).to(sink.dtype)
        grads: list[Tensor | None] = [None] * _FORWARD_ARITY
        grads[0], grads[1], grads[2], grads[_SINK_ARG] = dq, dk, dv, dsink
        return tuple(grads)


def _attention_forward_autograd(q, k, v, cu_q, cu_k, max_q, max_k, alibi, softmax_scale, causal, window_left,
                                window_right, softcap, dropout_p, dropout_seed, deterministic, backend,
                                learnable_sink=None, dropout_seed_tensor=None):  # fmt: skip
    args = (q, k, v, cu_q, cu_k, max_q, max_k, alibi, softmax_scale, causal, window_left, window_right, softcap,
            dropout_p, dropout_seed, deterministic, backend, learnable_sink, dropout_seed_tensor)  # fmt: skip
    if torch.is_grad_enabled() and _records_grad(q, k, v, learnable_sink):
        return _Attention.apply(*args)
    with _below_autograd():
        return _attention_forward(*args)


# ---- piecewise -----------------------------------------------------------------------------------------------


def _piecewise_params(softmax_scale, causal):
    return AttentionParams(softmax_scale=softmax_scale, causal=causal, window_right=0 if causal else -1)


def _piecewise_backend(backend, q1, k1, v, params, requires_grad):
    return _backend(backend, "piecewise", q1, k1, v, q1.shape[0], q1.shape[1], k1.shape[1], params, False,
                    requires_grad)  # fmt: skip


def _piecewise_forward_impl(q1, k1, q2, k2, v, dist_threshold, softmax_scale, causal, backend):
    softmax_scale, (q1, q2), _ = _positive_scale(softmax_scale, q1, q2)
    params = _piecewise_params(softmax_scale, causal)
    chosen = _piecewise_backend(backend, q1, k1, v, params, False)
    out, lse = chosen.piecewise_forward(q1, k1, q2, k2, v, dist_threshold, params)
    return out.contiguous(), lse.contiguous()


def _piecewise_forward_fake(q1, k1, q2, k2, v, *rest):
    out = q1.new_empty((*q1.shape[:-1], v.shape[-1]))
    return out, q1.new_empty((q1.shape[0], q1.shape[2], q1.shape[1]), dtype=lse_dtype(q1.dtype))


def _piecewise_backward_impl(dout, q1, k1, q2, k2, v, out, lse, dist_threshold, softmax_scale, causal, backend):
    softmax_scale, (q1, q2), flipped = _positive_scale(softmax_scale, q1, q2)
    params = _piecewise_params(softmax_scale, causal)
    chosen = _piecewise_backend(backend, q1, k1, v, params, True)
    dq1, dk1, dq2, dk2, dv = chosen.piecewise_backward(dout, q1, k1, q2, k2, v, out, lse, dist_threshold, params)
    if flipped:
        dq1, dq2 = -dq1, -dq2
    return tuple(g.contiguous() for g in (dq1, dk1, dq2, dk2, dv))


class _Piecewise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q1, k1, q2, k2, v, *scalars):  # type: ignore[override]
        with _below_autograd():
            out, lse = _piecewise_forward(q1, k1, q2, k2, v, *scalars)
        ctx.save_for_backward(q1, k1, q2, k2, v, out, lse)
        ctx.scalars = scalars
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, _dlse):  # type: ignore[override]
        q1, k1, q2, k2, v, out, lse = ctx.saved_tensors
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        grads = _piecewise_backward(dout, q1, k1, q2, k2, v, out, lse, *ctx.scalars)
        return (*grads, None, None, None, None)


def _piecewise_forward_autograd(q1, k1, q2, k2, v, *rest):
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q1, k1, q2, k2, v)):
        return _Piecewise.apply(q1, k1, q2, k2, v, *rest)
    with _below_autograd():
        return _piecewise_forward(q1, k1, q2, k2, v, *rest)


# ---- kv cache (forward only, like flash-attn) -----------------------------------------------------------------


def _kvcache_forward_impl(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, cache_leftpad,
                          alibi_slopes, softmax_scale, causal, window_left, window_right, softcap, num_splits,
                          backend):  # fmt: skip
    params = params_of(softmax_scale, causal, window_left, window_right, softcap, 0.0, 0, False)
    return run_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, cache_leftpad,
                       alibi_slopes, params, num_splits, backend)  # fmt: skip


def run_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, cache_leftpad, alibi_slopes,
                params: AttentionParams, num_splits, backend, scales: Fp8Scales | None = None):  # fmt: skip
    """Appends ``k``/``v`` (when given) at ``cache_seqlens`` and attends over each row's keys up to
    ``cache_seqlens + S_new`` (from ``cache_leftpad``); ``scales``: a float8_e4m3fn call (``fp8_kvcache_forward``).
    The frontend has checked the lengths and pages; the backend is resolved before the write."""
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    op = "paged_kvcache" if paged else "kvcache"
    batch = q.shape[0]
    chosen = _backend(backend, op, q, k_cache, v_cache, batch, q.shape[1], capacity if batch else 0, params,
                      alibi_slopes is not None, False, fp8=scales is not None)  # fmt: skip
    total = cache_seqlens
    if k is not None and k.shape[1]:
        if backend.startswith(dispatch.TOKEN_PREFIX):
            # A traced call: the frontend could not look at the caches' memory (Dynamo traces no data_ptr).
            _kvcache_checks.caches_writable(k_cache, v_cache)
        # The backend's fused append (one kernel, lengths included) where it has one, else torch indexing.
        total = chosen.append_kv(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table)
        if total is None:
            append_kv(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table)
            total = (cache_seqlens + k.shape[1]).to(torch.int32)
    info = KVCacheInfo(total, cache_batch_idx, block_table, cache_leftpad, num_splits)
    if scales is None:
        out, lse = chosen.forward_kvcache(q, k_cache, v_cache, info, alibi_slopes, params)
    else:
        out, lse = chosen.forward_kvcache_fp8(q, k_cache, v_cache, info, alibi_slopes, params, scales)
    return out.contiguous(), lse.contiguous()


def _kvcache_forward_fake(q, k_cache, v_cache, *rest):
    out = q.new_empty((*q.shape[:-1], v_cache.shape[-1]))
    return out, q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=lse_dtype(q.dtype))


def append_kv(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table) -> None:
    """Writes ``k``/``v`` (B, S_new, Hk, D) at positions ``cache_seqlens[b] ...`` of each row (or its pages)."""
    batch, seqlen_new = k.shape[:2]
    device = k.device
    pos = cache_seqlens.long()[:, None] + torch.arange(seqlen_new, device=device)[None, :]  # (B, S_new)
    with torch.no_grad():
        if block_table is not None:
            page_size = k_cache.shape[1]
            pages = torch.gather(block_table.long(), 1, pos // page_size)
            k_cache[pages, pos % page_size] = k.to(k_cache.dtype)
            v_cache[pages, pos % page_size] = v.to(v_cache.dtype)
        else:
            rows = cache_batch_idx.long() if cache_batch_idx is not None else torch.arange(batch, device=device)
            rows = rows[:, None].expand(batch, seqlen_new)
            k_cache[rows, pos] = k.to(k_cache.dtype)
            v_cache[rows, pos] = v.to(v_cache.dtype)


# ---- registration ---------------------------------------------------------------------------------------------


def _no_autograd(op):
    """Autograd kernel of an op without a derivative: run it below autograd (its outputs do not require grad)."""

    def kernel(*args):
        with _below_autograd():
            return op(*args)

    return kernel


def _register() -> None:
    impls = {
        "attention_forward": (_attention_forward_impl, _attention_forward_fake, _attention_forward_autograd),
        "attention_backward": (
            _attention_backward_impl,
            lambda *a: _backward_fake(*a, count=3),
            _no_autograd(_attention_backward),
        ),
        "piecewise_forward": (_piecewise_forward_impl, _piecewise_forward_fake, _piecewise_forward_autograd),
        "piecewise_backward": (
            _piecewise_backward_impl,
            lambda *a: _backward_fake(*a, count=5),
            _no_autograd(_piecewise_backward),
        ),
        "kvcache_forward": (_kvcache_forward_impl, _kvcache_forward_fake, _no_autograd(_kvcache_forward)),
    }
    for name, (impl, fake, autograd) in impls.items():
        _LIB.impl(name, impl, "CompositeExplicitAutograd")
        _LIB.impl(name, autograd, "Autograd")
        torch.library.register_fake(f"attnkit::{name}", fake, lib=_LIB)


_register()
