"""Choosing a backend for a call.

Precedence: the explicit ``backend=`` argument, then the innermost ``use_backend(...)`` context, then
``ATTNKIT_BACKEND``, then the automatic choice. A request is one name (forced: it runs or raises
:class:`BackendUnsupportedError` with its reasons) or an ordered list (the first eligible one runs, else
:class:`NoBackendError`). The automatic choice tries every registered backend not listed in ``ATTNKIT_DISABLE``
by descending priority; eligibility (``why_not``) is separate from that ordering. Decisions are cached per
(spec, request, disabled set) so the environment is read at call time but ``why_not`` runs once per shape.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from collections.abc import Iterator, Sequence

import torch

from . import env
from .errors import BackendUnsupportedError, InvalidArgumentError, InvalidArgumentTypeError, NoBackendError
from .registry import ALIASES, REGISTRY, Backend, resolve_alias
from .spec import AttentionSpec

logger = logging.getLogger("attnkit.dispatch")

_CONTEXT: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar("attnkit_backend", default=None)
_TRACEABLE_STACK: list[tuple[str, ...] | None] = []  # mirror of _CONTEXT for torch.compile tracing


def _normalise(request: str | Sequence[str], what: str) -> tuple[str, ...]:
    if isinstance(request, str):
        names = [n.strip() for n in request.split(",")]
    elif isinstance(request, (list, tuple)) and all(isinstance(n, str) for n in request):
        names = [n.strip() for n in request]
    else:
        raise InvalidArgumentTypeError(
            f"{what}={request!r} must be a backend name, a comma-separated string or a list of names"
        )
    if not names or any(not n for n in names):
        raise InvalidArgumentError(f"{what}={request!r} is empty; expected a backend name or a list of names")
    if "auto" in names and len(names) > 1:
        raise InvalidArgumentError(f"{what}={request!r}: 'auto' cannot be combined with other backend names")
    valid = set(REGISTRY.names()) | set(ALIASES)
    unknown = [n for n in names if n not in valid and n != "auto"]
    if unknown:
        raise InvalidArgumentError(
            f"{what}={request!r}: unknown backend(s) {', '.join(map(repr, unknown))}; "
            f"valid: 'auto', {', '.join(map(repr, sorted(valid)))}"
        )
    return tuple(resolve_alias(n) for n in names)


@contextlib.contextmanager
def use_backend(name_or_names: str | Sequence[str]) -> Iterator[None]:
    """Within the block, calls with ``backend='auto'`` use this backend (or the first eligible of this list)."""
    names = _normalise(name_or_names, "use_backend")
    value = None if names == ("auto",) else names
    token = _CONTEXT.set(value)
    _TRACEABLE_STACK.append(value)
    try:
        yield
    finally:
        _TRACEABLE_STACK.pop()
        _CONTEXT.reset(token)


def _context_request() -> tuple[str, ...] | None:
    if torch.compiler.is_compiling():
        # Dynamo cannot trace ContextVar.get, but it can read a plain list: while tracing, the innermost
        # use_backend() of the whole process applies (and is baked into the graph like every dispatch decision).
        return _TRACEABLE_STACK[-1] if _TRACEABLE_STACK else None
    return _CONTEXT.get()


def _request(backend: str | Sequence[str]) -> tuple[tuple[str, ...] | None, str]:
    """The effective request and where it came from."""
    if backend != "auto":
        names = _normalise(backend, "backend")
        if names != ("auto",):
            return names, "backend= argument"
    ctx = _context_request()
    if ctx is not None:
        return ctx, "use_backend()"
    forced = env.backend_override(REGISTRY.names(), ALIASES)
    if forced is not None:
        return tuple(resolve_alias(n) for n in forced), env.BACKEND
    return None, "auto"


def select_backend(spec: AttentionSpec, backend: str | Sequence[str] = "auto") -> Backend:
    """The backend that will run ``spec``, honouring the precedence rules; raises when none can."""
    return REGISTRY.get(select_backend_name(spec, backend))


def select_backend_name(spec: AttentionSpec, backend: str | Sequence[str] = "auto") -> str:
    """Registry name of the backend :func:`select_backend` picks (what the custom ops are given)."""
    request, origin = _request(backend)
    disabled = env.disabled_backends(REGISTRY.names(), ALIASES) if request is None else frozenset()
    name, rejected = _decide(spec, request, origin, frozenset(resolve_alias(n) for n in disabled))
    if env.debug():
        _log(spec, name, origin, rejected)
    return name


@functools.lru_cache(maxsize=4096)
def _decide(
    spec: AttentionSpec, request: tuple[str, ...] | None, origin: str, disabled: frozenset[str]
) -> tuple[str, tuple[tuple[str, tuple[str, ...]], ...]]:
    rejected: dict[str, list[str]] = {}
    # Registry names, not Backend.name: a backend may be registered under another name than its class declares.
    names = list(request) if request is not None else sorted(REGISTRY.names(), key=lambda n: -REGISTRY.get(n).priority)
    for name in names:
        b = REGISTRY.get(name)
        if request is None and name in disabled:
            rejected[name] = [f"disabled by {env.DISABLE}"]
            continue
        reasons = b.why_not(spec)
        if request is None and not reasons:
            reasons = b.why_not_auto(spec)
        if reasons:
            rejected[name] = reasons
            continue
        return name, tuple((n, tuple(r)) for n, r in rejected.items())
    if request is not None and len(request) == 1:
        raise BackendUnsupportedError(request[0], rejected[request[0]])
    raise NoBackendError(rejected, summary=f"{spec.describe()} (requested by {origin})")


def _log(spec: AttentionSpec, chosen: str, origin: str, rejected: tuple[tuple[str, tuple[str, ...]], ...]) -> None:
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[attnkit] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    lines = [f"{spec.describe()} -> {chosen} (by {origin})"]
    lines += [f"  rejected {name}: {'; '.join(reasons)}" for name, reasons in rejected]
    logger.warning("\n".join(lines))


def explain(spec: AttentionSpec) -> dict[str, list[str]]:
    """Every registered backend's reasons for ``spec`` (empty list = eligible)."""
    return {b.name: b.why_not(spec) for b in REGISTRY.backends()}


def clear_cache() -> None:
    _decide.cache_clear()
