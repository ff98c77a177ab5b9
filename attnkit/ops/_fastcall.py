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

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import env
from ..dispatch import current_context
from ..params import AttentionParams
from ..registry import REGISTRY, Backend

ENABLED = True
LIMIT = 1024  # entries; the table is emptied when full


Runner = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Resolved:
    """A checked call: its parameters (``softmax_scale >= 0``), the backend's registry name and the backend, and,
    for calls autograd does not record, the backend's bound forward where it has one (Backend.forward_runner)."""

    params: AttentionParams
    backend_name: str
    backend: Backend
    requires_grad: bool
    runner: Runner | None = None


@dataclass(frozen=True)
class ResolvedKVCache:
    """A checked decode call: its parameters, the backend's registry name and the backend, the cache capacity per
    row, the split count asked for and the backend's bound step where it has one."""

    params: AttentionParams
    backend_name: str
    backend: Backend
    capacity: int
    num_splits: int
    runner: Callable[..., tuple[torch.Tensor, torch.Tensor] | None] | None = None  # Backend.kvcache_runner
    # cache_seqlens=None (every row full, no append): the checked lengths, one tensor kept for every step (no
    # kernel writes it: the lengths after an append are a new tensor).
    full_lengths: torch.Tensor | None = None


_ATTENTION: dict[tuple, Resolved] = {}
_KVCACHE: dict[tuple, ResolvedKVCache] = {}


_SWITCHES: dict[tuple, bool] = {}  # raw ATTNKIT_* values -> whether they allow the fast path


def _allowed(raw: tuple) -> bool:
    """Whether the variables' raw values (env.raw_values) allow the fast path: ATTNKIT_HOST_FASTPATH on and
    ATTNKIT_DEBUG off (dispatch logs every decision then). Parsed once per distinct tuple; a malformed value
    raises on every call, since nothing is stored for it."""
    allowed = _SWITCHES.get(raw)
    if allowed is None:
        allowed = env.host_fastpath() and not env.debug()
        if len(_SWITCHES) >= 64:
            _SWITCHES.clear()
        _SWITCHES[raw] = allowed
    return allowed


def attention_key(q, k, v, causal, softmax_scale, window_size, softcap, dropout_p, deterministic, return_lse,
                  backend, others_absent: bool) -> tuple | None:  # fmt: skip
    """The static key of an ``attention`` call, or None when the call must take the full path (optional
    tensors given, dropout, scalars of other types than the defaults', a strided last dimension...)."""
    # is_compiling before any environment read: a traced call must read none (Dynamo would guard on it).
    if not others_absent or not ENABLED or torch.compiler.is_compiling():
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
    q_strides, k_strides, v_strides = q.stride(), k.stride(), v.stride()
    if len(q_strides) != 4 or q_strides[-1] != 1 or k_strides[-1] != 1 or v_strides[-1] != 1:
        return None
    raw = env.raw_values()
    if not _allowed(raw):
        return None
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    # Strides and 16-byte alignment too: a bound forward (Resolved.runner) is valid for exactly these.
    return (
        q.shape, k.shape, v.shape, q_strides, k_strides, v_strides, q.dtype, k.dtype, v.dtype, q.device, k.device,
        v.device, q.data_ptr() & 15, k.data_ptr() & 15, v.data_ptr() & 15, grad, causal, softmax_scale, left, right,
        softcap, deterministic, return_lse, backend, current_context(), raw, REGISTRY.generation,
    )  # fmt: skip


def lookup(key: tuple | None) -> Resolved | None:
    return None if key is None else _ATTENTION.get(key)


def remember(key: tuple | None, params: AttentionParams, backend_name: str, requires_grad: bool, q: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor, return_lse: bool) -> None:  # fmt: skip
    """Called by the full path once every check has passed, the backend is chosen and has run (never for
    tokens), with the call's tensors: a backend's bound forward is made from what that first run set up."""
    if key is None or params.softmax_scale < 0 or params.dropout_p:
        return
    if len(_ATTENTION) >= LIMIT:
        _ATTENTION.clear()
    backend = REGISTRY.get(backend_name)
    runner = None if requires_grad else backend.forward_runner(q, k, v, params, return_lse)
    _ATTENTION[key] = Resolved(params, backend_name, backend, requires_grad, runner)


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
    if not others_absent or not ENABLED or torch.compiler.is_compiling():
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
    if lengths is not int and lengths is not torch.Tensor and cache_seqlens is not None:  # None: a full cache
        return None
    try:
        tensors = tuple(_layout(t) for t in (q, k_cache, v_cache, k, v, block_table))
    except TypeError:
        return None
    if q.dim() != 4 or q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        return None
    raw = env.raw_values()
    if not _allowed(raw):
        return None
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k_cache, v_cache, k, v))
    if grad:
        return None  # refused by the full path (forward only), with its message
    return (
        *tensors, k_cache.data_ptr(), v_cache.data_ptr(), lengths, causal, softmax_scale, left, right, softcap,
        return_lse, num_splits, backend, current_context(), raw, REGISTRY.generation,
    )  # fmt: skip


def lookup_kvcache(key: tuple | None) -> ResolvedKVCache | None:
    return None if key is None else _KVCACHE.get(key)


def remember_kvcache(key: tuple | None, params: AttentionParams, backend_name: str, capacity: int, num_splits: int,
                     step: tuple, return_lse: bool, full_lengths: torch.Tensor | None = None) -> None:  # fmt: skip
    """After a first decode step has run; ``step``: its (q, k_cache, v_cache, k, v, checked cache_seqlens,
    block_table), from which a backend's bound step is made."""
    if key is None or params.softmax_scale < 0:
        return
    if len(_KVCACHE) >= LIMIT:
        _KVCACHE.clear()
    backend = REGISTRY.get(backend_name)
    runner = backend.kvcache_runner(*step, params, num_splits, return_lse)
    _KVCACHE[key] = ResolvedKVCache(params, backend_name, backend, capacity, num_splits, runner, full_lengths)


def no_modes() -> bool:
    """:func:`plain_eager` for tensors already known to be plain ``torch.Tensor`` (a hit of attention_key)."""
    return (
        not torch._C._is_torch_function_mode_enabled()
        and torch._C._len_torch_dispatch_stack() == 0
        and torch._C._functorch.peek_interpreter_stack() is None
        and not torch._C._get_tracing_state()
    )


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
