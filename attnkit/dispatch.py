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

from . import env
from .errors import BackendUnsupportedError, InvalidArgumentError, NoBackendError
from .registry import ALIASES, REGISTRY, Backend, resolve_alias
from .spec import AttentionSpec

logger = logging.getLogger("attnkit.dispatch")

_CONTEXT: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar("attnkit_backend", default=None)


def _normalise(request: str | Sequence[str], what: str) -> tuple[str, ...]:
    names = [n.strip() for n in request.split(",")] if isinstance(request, str) else [str(n) for n in request]
    if not names or any(not n for n in names):
        raise InvalidArgumentError(f"{what}={request!r} is empty; expected a backend name or a list of names")
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
    token = _CONTEXT.set(None if names == ("auto",) else names)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def _request(backend: str | Sequence[str]) -> tuple[tuple[str, ...] | None, str]:
    """The effective request and where it came from."""
    if backend != "auto":
        names = _normalise(backend, "backend")
        if names != ("auto",):
            return names, "backend= argument"
    ctx = _CONTEXT.get()
    if ctx is not None:
        return ctx, "use_backend()"
    forced = env.backend_override(REGISTRY.names(), ALIASES)
    if forced is not None:
        return tuple(resolve_alias(n) for n in forced), env.BACKEND
    return None, "auto"


def select_backend(spec: AttentionSpec, backend: str | Sequence[str] = "auto") -> Backend:
    """The backend that will run ``spec``, honouring the precedence rules; raises when none can."""
    request, origin = _request(backend)
    disabled = env.disabled_backends(REGISTRY.names(), ALIASES) if request is None else frozenset()
    disabled = frozenset(resolve_alias(n) for n in disabled)
    name, rejected = _decide(spec, request, origin, disabled)
    if env.debug():
        _log(spec, name, origin, rejected)
    return REGISTRY.get(name)


@functools.lru_cache(maxsize=4096)
def _decide(
    spec: AttentionSpec, request: tuple[str, ...] | None, origin: str, disabled: frozenset[str]
) -> tuple[str, tuple[tuple[str, tuple[str, ...]], ...]]:
    rejected: dict[str, list[str]] = {}
    if request is not None:
        candidates = [REGISTRY.get(n) for n in request]
    else:
        candidates = sorted(REGISTRY.backends(), key=lambda b: -b.priority)
    for b in candidates:
        if request is None and b.name in disabled:
            rejected[b.name] = [f"disabled by {env.DISABLE}"]
            continue
        reasons = b.why_not(spec)
        if request is None and not reasons:
            reasons = b.why_not_auto(spec)
        if reasons:
            rejected[b.name] = reasons
            continue
        return b.name, tuple((n, tuple(r)) for n, r in rejected.items())
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
