"""Choosing a backend for a call.

Precedence: the explicit ``backend=`` argument, then the innermost ``use_backend(...)`` context, then
``ATTNKIT_BACKEND``, then the automatic choice. A request is one name (forced: it runs or raises
:class:`BackendUnsupportedError` with its reasons) or an ordered list (the first eligible one runs, else
:class:`NoBackendError`). The automatic choice tries every registered backend not listed in ``ATTNKIT_DISABLE``
by descending priority, reordered for the call's class by the measured speed table (:mod:`attnkit.speed`);
eligibility (``why_not``) is separate from that ordering.

A call is decided in two cached steps, so that a repeated call costs two dictionary look-ups:

1. :func:`request_token` turns the ``backend=`` argument, the ``use_backend`` context and the environment into a
   *request token*, a string such as ``"@auto||cupy_cuda"`` (origin, names, disabled names), cached per raw value;
2. :func:`decide` picks the backend for a token and the static properties of the call (operator, device, dtype,
   head dims and counts, batch, sequence lengths, features, grad): ``why_not`` runs once per such key.

In eager mode the frontend does both and hands the custom op the chosen backend's name. Under ``torch.compile``
neither is traced: the frontend resolves the request once, when Dynamo traces it (a constant of the graph, like
other configuration), and hands the op the token; the op's implementation makes step 2 at run time with the real
shapes, so dynamic shapes need no recompilation per length and no dispatch code is ever traced.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from . import env, speed
from .errors import (
    BackendUnsupportedError,
    EnvironmentVariableError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
    NoBackendError,
)
from .registry import ALIASES, REGISTRY, Backend, resolve_alias
from .spec import AttentionSpec, device_capability, features_from_bits, is_hip

logger = logging.getLogger("attnkit.dispatch")

_CONTEXT: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar("attnkit_backend", default=None)

# Every cache is emptied when full and by clear_cache. Each key holds the registry's generation, so entries made
# before a backend was (un)registered are never found again.
CACHE_LIMIT = 4096
TOKEN_PREFIX = "@"
_SEP = "|"


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
    token = _CONTEXT.set(None if names == ("auto",) else names)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def current_context() -> tuple[str, ...] | None:
    """The innermost ``use_backend`` names (None outside any): part of every cache key of a request."""
    return _CONTEXT.get()


# ---- step 1: the request ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """What a call asks for: ``names`` in order (None: the automatic choice), where that came from, and the
    backends ``ATTNKIT_DISABLE`` removes from the automatic choice."""

    names: tuple[str, ...] | None
    origin: str
    disabled: frozenset[str] = frozenset()

    def token(self) -> str:
        fields = (self.origin, ",".join(self.names or ()), ",".join(sorted(self.disabled)))
        return TOKEN_PREFIX + _SEP.join(fields)


def _resolve(backend: str | Sequence[str]) -> Request:
    if backend != "auto":
        names = _normalise(backend, "backend")
        if names != ("auto",):
            return Request(names, "backend= argument")
    ctx = _CONTEXT.get()
    if ctx is not None:
        return Request(ctx, "use_backend()")
    forced = env.backend_override(REGISTRY.names(), ALIASES)
    if forced is not None:
        return Request(tuple(resolve_alias(n) for n in forced), env.BACKEND)
    disabled = env.disabled_backends(REGISTRY.names(), ALIASES)
    return Request(None, "auto", frozenset(resolve_alias(n) for n in disabled))


# (backend argument, context, raw ATTNKIT_BACKEND, raw ATTNKIT_DISABLE, registry generation) -> token
_TOKENS: dict[tuple, str] = {}
# (token, registry generation) -> (request, grad flags of a traced call)
_PARSED: dict[tuple[str, int], tuple[Request, tuple[bool, bool] | None]] = {}


def request_token(backend: str | Sequence[str] = "auto") -> str:
    """The request of a call made now (argument, ``use_backend`` context, environment) as a token string.

    Raises for an unknown name or a malformed variable, like a call would."""
    arg = backend if isinstance(backend, str) else tuple(backend) if isinstance(backend, (list, tuple)) else None
    if arg is None:
        return _resolve(backend).token()  # raises the type error
    generation = REGISTRY.generation
    key = (arg, _CONTEXT.get(), *env.dispatch_variables(), generation)
    token = _TOKENS.get(key)
    if token is None:
        request = _resolve(backend)
        token = request.token()
        if len(_TOKENS) >= CACHE_LIMIT:
            _TOKENS.clear()
        _TOKENS[key] = token
        _PARSED[token, generation] = (request, None)
    return token


ERROR_PREFIX = "!"
_REQUEST_ERRORS = {e.__name__: e for e in (InvalidArgumentError, InvalidArgumentTypeError, EnvironmentVariableError)}


def traced_token(backend: str | Sequence[str], requires_grad: bool, merged_backward: bool = False) -> str:
    """:func:`request_token` for a call being traced by ``torch.compile``, with the call's grad flag appended.

    Dynamo runs this once while tracing and puts the string into the graph as a constant, so nothing of the
    registry, the context variable or the environment is traced; the custom op decides at run time. A bad request
    comes back as ``"!<error class>|<message>"`` for :func:`raise_for_token` to raise in traced code (an exception
    escaping this function would surface as an internal Dynamo error)."""
    try:
        grad = "merged" if merged_backward else "grad" if requires_grad else "nograd"
        return request_token(backend) + _SEP + grad
    except (InvalidArgumentError, InvalidArgumentTypeError, EnvironmentVariableError) as exc:
        return ERROR_PREFIX + type(exc).__name__ + _SEP + str(exc)


# What torch.compiler.assume_constant_result(traced_token) does, without importing torch._dynamo (seconds) at
# ``import attnkit``; tests/test_compile.py fails if Dynamo ever stops honouring the mark (it would trace into
# the registry and the context variable, and break the graph).
traced_token._dynamo_marked_constant = True  # type: ignore[attr-defined]


def raise_for_token(token: str) -> None:
    """Raises the error a :func:`traced_token` result carries, if any."""
    if token.startswith(ERROR_PREFIX):
        name, _, message = token[len(ERROR_PREFIX) :].partition(_SEP)
        raise _REQUEST_ERRORS[name](message)


_GRAD_FLAGS = {"nograd": (False, False), "grad": (True, False), "merged": (True, True)}


def parse_token(token: str) -> tuple[Request, tuple[bool, bool] | None]:
    """The request of a token and, for tokens made by :func:`traced_token`, the call's ``(requires_grad,
    merged_backward)``."""
    key = (token, REGISTRY.generation)
    parsed = _PARSED.get(key)
    if parsed is None:
        # Not made in this process with the current registry (e.g. baked into a graph that inductor cached).
        fields = token[len(TOKEN_PREFIX) :].split(_SEP)
        grad = None
        if len(fields) == 4 and fields[3] in _GRAD_FLAGS:
            grad = _GRAD_FLAGS[fields.pop()]
        if not token.startswith(TOKEN_PREFIX) or len(fields) != 3:
            raise InvalidArgumentError(f"backend={token!r} is neither a backend name nor an attnkit request token")
        origin, names, disabled = fields
        known = set(REGISTRY.names())
        unknown = [n for n in (*names.split(","), *disabled.split(",")) if n and n not in known]
        if unknown:
            raise InvalidArgumentError(f"request token {token!r} names unregistered backend(s) {unknown}")
        request = Request(
            tuple(names.split(",")) if names else None, origin, frozenset(filter(None, disabled.split(",")))
        )
        parsed = (request, grad)
        if len(_PARSED) >= CACHE_LIMIT:
            _PARSED.clear()
        _PARSED[key] = parsed
    return parsed


# ---- step 2: the decision --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Decision:
    name: str
    spec: AttentionSpec
    rejected: tuple[tuple[str, tuple[str, ...]], ...]
    origin: str


_DECISIONS: dict[tuple, _Decision] = {}  # (token, static properties, speed table, registry generation) -> decision
# (spec, token, speed table, registry generation) -> decision
_BY_SPEC: dict[tuple[AttentionSpec, str, str | None, int], _Decision] = {}


def decide(
    token: str,
    op: str,
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    head_dim_v: int,
    num_heads_q: int,
    num_heads_k: int,
    batch: int,
    seqlen_q: int,
    seqlen_k: int,
    feature_bits: int,
    requires_grad: bool,
    merged_backward: bool = False,
) -> str:
    """Registry name of the backend for a call with these static properties (``feature_bits``: see
    :func:`attnkit.spec.feature_bits`); ``why_not`` runs once per distinct key."""
    key = (token, op, device, dtype, head_dim, head_dim_v, num_heads_q, num_heads_k, batch, seqlen_q, seqlen_k,
           feature_bits, requires_grad, merged_backward, env.speed_table_setting(), REGISTRY.generation)  # fmt: skip
    decision = _DECISIONS.get(key)
    if decision is None:
        spec = AttentionSpec(
            op=op,
            device_type=device.type,
            compute_capability=device_capability(device),
            is_hip=is_hip() and device.type == "cuda",
            dtype=dtype,
            head_dim=head_dim,
            head_dim_v=head_dim_v,
            num_heads_q=num_heads_q,
            num_heads_k=num_heads_k,
            batch=batch,
            seqlen_q=seqlen_q,
            seqlen_k=seqlen_k,
            features=features_from_bits(feature_bits),
            requires_grad=requires_grad,
            merged_backward=merged_backward,
        )
        decision = _decide_cached(spec, token)
        if len(_DECISIONS) >= CACHE_LIMIT:
            _DECISIONS.clear()
        _DECISIONS[key] = decision
    if env.debug():
        _log(decision)
    return decision.name


def select_backend(spec: AttentionSpec, backend: str | Sequence[str] = "auto") -> Backend:
    """The backend that will run ``spec``, honouring the precedence rules; raises when none can."""
    return REGISTRY.get(select_backend_name(spec, backend))


def select_backend_name(spec: AttentionSpec, backend: str | Sequence[str] = "auto") -> str:
    """Registry name of the backend :func:`select_backend` picks for ``spec`` (what the custom ops are given)."""
    decision = _decide_cached(spec, request_token(backend))
    if env.debug():
        _log(decision)
    return decision.name


def _decide_cached(spec: AttentionSpec, token: str) -> _Decision:
    setting = env.speed_table_setting()
    key = (spec, token, setting, REGISTRY.generation)
    decision = _BY_SPEC.get(key)
    if decision is None:
        decision = _decide(spec, parse_token(token)[0], setting)
        if len(_BY_SPEC) >= CACHE_LIMIT:
            _BY_SPEC.clear()
        _BY_SPEC[key] = decision
    return decision


def _decide(spec: AttentionSpec, request: Request, speed_setting: str | None = None) -> _Decision:
    rejected: dict[str, list[str]] = {}
    # Registry names, not Backend.name: a backend may be registered under another name than its class declares.
    auto = request.names is None
    if auto:
        names = sorted(REGISTRY.names(), key=lambda n: -REGISTRY.get(n).priority)
        names = speed.rank(spec, names, speed.active_table(speed_setting))
    else:
        names = list(request.names)
    for name in names:
        b = REGISTRY.get(name)
        if auto and name in request.disabled:
            rejected[name] = [f"disabled by {env.DISABLE}"]
            continue
        reasons = b.why_not(spec)
        if auto and not reasons:
            reasons = b.why_not_auto(spec)
        if reasons:
            rejected[name] = reasons
            continue
        return _Decision(name, spec, tuple((n, tuple(r)) for n, r in rejected.items()), request.origin)
    if not auto and len(names) == 1:
        raise BackendUnsupportedError(names[0], rejected[names[0]])
    raise NoBackendError(rejected, summary=f"{spec.describe()} (requested by {request.origin})")


def _log(decision: _Decision) -> None:
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[attnkit] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    lines = [f"{decision.spec.describe()} -> {decision.name} (by {decision.origin})"]
    lines += [f"  rejected {name}: {'; '.join(reasons)}" for name, reasons in decision.rejected]
    logger.warning("\n".join(lines))


def explain(spec: AttentionSpec) -> dict[str, list[str]]:
    """Every registered backend's reasons for ``spec`` (empty list = eligible)."""
    return {b.name: b.why_not(spec) for b in REGISTRY.backends()}


def clear_cache() -> None:
    _TOKENS.clear()
    _PARSED.clear()
    _DECISIONS.clear()
    _BY_SPEC.clear()
