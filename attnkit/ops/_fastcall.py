"""Repeated eager calls of ``attnkit.attention``: what validation and dispatch decided, per static key.

Everything the frontend checks and decides for a call without ALiBi, sinks, dropout or fp8 is a function of the
tensors' shapes, dtypes, devices and grad flags, of the scalar options (of their exact types too: ``causal=1``
is refused where ``True`` is not), of the ``backend=`` request and its context (``use_backend``, the
``ATTNKIT_*`` variables dispatch reads, the registry's generation). A repeated call with the same key reuses the
checked parameters and the chosen backend, so its cost is a dictionary look-up plus the launch.

A call that autograd will not record, made in plain eager mode (no torch.compile, no tracing, no torch function
or dispatch mode, no functorch transform, plain ``torch.Tensor`` inputs), goes straight to the chosen backend: the
dispatcher would only route it to the same implementation, at ~9 us of Python-C++ round trips per call. Every
other call still goes through the ``torch.ops.attnkit`` operator.

``attention_with_kvcache`` has the same cache for decode steps without rotary, ALiBi, left padding, row indices
or fp8: the key adds the caches' layouts and addresses (so their aliasing check is reused), whether the lengths
are an int or a tensor, and the block table's layout; the lengths and pages are checked on every call, since
their values change every step.

``ENABLED = False`` (or ``ATTNKIT_HOST_FASTPATH=0``) turns the cache and the direct call off, for A/B timing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import env
from ..dispatch import current_context
from ..params import AttentionParams
from ..registry import REGISTRY, Backend

ENABLED = True
LIMIT = 1024  # entries; the table is emptied when full


@dataclass(frozen=True)
class Resolved:
    """A checked call: its parameters (``softmax_scale >= 0``), the backend's registry name and the backend."""

    params: AttentionParams
    backend_name: str
    backend: Backend
    requires_grad: bool


@dataclass(frozen=True)
class ResolvedKVCache:
    """A checked decode call: its parameters, the backend's registry name, the cache capacity per row."""

    params: AttentionParams
    backend_name: str
    capacity: int
    num_splits: int


_ATTENTION: dict[tuple, Resolved] = {}
_KVCACHE: dict[tuple, ResolvedKVCache] = {}


def enabled() -> bool:
    # is_compiling first: a traced call must read no environment variable (Dynamo would guard on it).
    return not torch.compiler.is_compiling() and ENABLED and env.host_fastpath()


def attention_key(q, k, v, causal, softmax_scale, window_size, softcap, dropout_p, deterministic, return_lse,
                  backend, others_absent: bool) -> tuple | None:  # fmt: skip
    """The static key of an ``attention`` call, or None when the call must take the full path (optional
    tensors given, dropout, scalars of other types than the defaults', a strided last dimension...)."""
    if not (others_absent and enabled()):
        return None
    if not (type(q) is torch.Tensor and type(k) is torch.Tensor and type(v) is torch.Tensor):
        return None
    if type(causal) is not bool or type(deterministic) is not bool or type(return_lse) is not bool:
        return None
    if type(backend) is not str or type(softcap) is not float or type(dropout_p) is not float or dropout_p != 0.0:
        return None
    if softmax_scale is not None and (type(softmax_scale) is not float or not softmax_scale >= 0.0):
        return None  # negative scales move into q inside the op; NaN never matches itself
    if type(window_size) is not tuple or len(window_size) != 2:
        return None
    left, right = window_size
    if type(left) is not int or type(right) is not int:
        return None
    if q.dim() != 4 or q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return None
    if env.debug():  # dispatch logs every decision then
        return None
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return (
        q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, grad,
        causal, softmax_scale, left, right, softcap, deterministic, backend,
        current_context(), *env.dispatch_variables(), env.speed_table_setting(), REGISTRY.generation,
    )  # fmt: skip


def lookup(key: tuple | None) -> Resolved | None:
    return None if key is None else _ATTENTION.get(key)


def remember(key: tuple | None, params: AttentionParams, backend_name: str, requires_grad: bool) -> None:
    """Called by the full path once every check has passed and the backend is chosen (never for tokens)."""
    if key is None or params.softmax_scale < 0 or params.dropout_p:
        return
    if len(_ATTENTION) >= LIMIT:
        _ATTENTION.clear()
    _ATTENTION[key] = Resolved(params, backend_name, REGISTRY.get(backend_name), requires_grad)


def clear() -> None:
    _ATTENTION.clear()
    _KVCACHE.clear()


def _layout(t: object) -> tuple | None:
    if t is None:
        return None
    if type(t) is not torch.Tensor:
        raise TypeError  # not a plain tensor: the full path checks (and explains) it
    return (t.shape, t.stride(), t.dtype, t.device)


def kvcache_key(q, k_cache, v_cache, k, v, cache_seqlens, block_table, causal, softmax_scale, window_size,
                softcap, return_lse, num_splits, backend, others_absent: bool) -> tuple | None:  # fmt: skip
    """The static key of an ``attention_with_kvcache`` call, or None when it must take the full path."""
    if not (others_absent and enabled()):
        return None
    if type(causal) is not bool or type(return_lse) is not bool or type(backend) is not str:
        return None
    if type(softcap) is not float or type(num_splits) is not int:
        return None
    if softmax_scale is not None and (type(softmax_scale) is not float or not softmax_scale >= 0.0):
        return None
    if type(window_size) is not tuple or len(window_size) != 2:
        return None
    left, right = window_size
    if type(left) is not int or type(right) is not int:
        return None
    lengths = type(cache_seqlens)
    if lengths is not int and lengths is not torch.Tensor:
        return None
    try:
        tensors = tuple(_layout(t) for t in (q, k_cache, v_cache, k, v, block_table))
    except TypeError:
        return None
    if q.dim() != 4 or q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        return None
    if env.debug():
        return None
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k_cache, v_cache, k, v))
    if grad:
        return None  # refused by the full path (forward only), with its message
    return (
        *tensors, k_cache.data_ptr(), v_cache.data_ptr(), lengths, causal, softmax_scale, left, right, softcap,
        return_lse, num_splits, backend, current_context(), *env.dispatch_variables(), env.speed_table_setting(),
        REGISTRY.generation,
    )  # fmt: skip


def lookup_kvcache(key: tuple | None) -> ResolvedKVCache | None:
    return None if key is None else _KVCACHE.get(key)


def remember_kvcache(key: tuple | None, params: AttentionParams, backend_name: str, capacity: int,
                     num_splits: int) -> None:  # fmt: skip
    if key is None or params.softmax_scale < 0:
        return
    if len(_KVCACHE) >= LIMIT:
        _KVCACHE.clear()
    _KVCACHE[key] = ResolvedKVCache(params, backend_name, capacity, num_splits)


def plain_eager(*tensors: torch.Tensor) -> bool:
    """Whether calling the implementation directly does what the dispatcher would: no torch function or dispatch
    mode, no functorch transform, no JIT tracing, plain tensors (a subclass or fake tensor goes the full way)."""
    return (
        not torch._C._is_torch_function_mode_enabled()
        and torch._C._len_torch_dispatch_stack() == 0
        and torch._C._functorch.peek_interpreter_stack() is None
        and not torch._C._get_tracing_state()
        and all(type(t) is torch.Tensor for t in tensors)
    )
