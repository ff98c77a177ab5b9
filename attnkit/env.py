"""The one place that reads ``ATTNKIT_*`` environment variables.

Values are read at call time (never cached at import), so tests and users can change them between calls.
Malformed values raise :class:`EnvironmentVariableError` naming the variable, the value and what is allowed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from .errors import EnvironmentVariableError

BACKEND = "ATTNKIT_BACKEND"
DISABLE = "ATTNKIT_DISABLE"
DEBUG = "ATTNKIT_DEBUG"
TRITON_AUTOTUNE = "ATTNKIT_TRITON_AUTOTUNE"
CUPY_CACHE_DIR = "ATTNKIT_CUPY_CACHE_DIR"
CUPY_WGMMA = "ATTNKIT_CUPY_WGMMA"
SPEED_TABLE = "ATTNKIT_SPEED_TABLE"
CUPY_TMA_BWD = "ATTNKIT_CUPY_TMA_BWD"
CUPY_TMA = "ATTNKIT_CUPY_TMA"
HOST_FASTPATH = "ATTNKIT_HOST_FASTPATH"

ALL_VARIABLES = {
    BACKEND: "force one backend, or an ordered allow-list: name[,name...]",
    DISABLE: "remove backends from automatic choice: name[,name...]",
    DEBUG: "1 logs every dispatch decision with the reasons other backends were rejected (0/1)",
    TRITON_AUTOTUNE: "0 uses the Triton backend's fixed default tile configs instead of autotuning (0/1)",
    CUPY_CACHE_DIR: "directory for compiled CuPy kernels (default: ~/.cache/attnkit/cupy)",
    CUPY_WGMMA: "0 keeps the CuPy backend on its mma.sync kernels on Hopper instead of the wgmma ones (0/1)",
    SPEED_TABLE: "measured speed table auto ranks backends by: a JSON path (attnkit bench --speed-table), 0 for none",
    CUPY_TMA_BWD: "0 keeps the CuPy backend's dense Hopper backward on bwd_sm90.cu instead of the TMA "
    "warp-specialized bwd_sm90_ws.cu (0/1)",
    HOST_FASTPATH: "0 turns off the per-call host fast paths (cached frontend decisions, direct backend calls, "
    "bound Triton launchers), for A/B timing (0/1)",
    CUPY_TMA: "0 keeps the CuPy backend's dense Hopper forward on fwd_sm90.cu instead of the TMA warp-specialised "
    "fwd_sm90_ws.cu (0/1)",
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _get(name: str) -> str | None:
    """``os.environ.get(name)``, at a tenth of its cost for a missing variable (dispatch reads three per call).

    ``os.environ`` keeps its values in a plain dict of encoded keys (``_data``), which its ``__setitem__`` and
    ``__delitem__`` update too; the lookup goes there directly, with the key encoded once. Anything else (a
    replaced ``os.environ``) takes the ordinary path."""
    environ = os.environ
    data = getattr(environ, "_data", None)
    if data is None or type(environ) is not _ENVIRON_TYPE:
        return environ.get(name)
    key = _ENCODED.get(name)
    if key is None:
        key = _ENCODED[name] = environ.encodekey(name)
    value = data.get(key)
    return None if value is None else environ.decodevalue(value)


_ENCODED: dict[str, object] = {}
_ENVIRON_TYPE = type(os.environ)


def _raw(name: str) -> str | None:
    value = _get(name)
    return None if value is None else value.strip()


def _flag(name: str, default: bool) -> bool:
    value = _raw(name)
    if value is None:
        return default
    low = value.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise EnvironmentVariableError(f"{name}={value!r} is not a boolean; use 1 or 0 (also true/false, yes/no, on/off)")


def _name_list(name: str, valid: Iterable[str], aliases: Iterable[str] = ()) -> tuple[str, ...] | None:
    value = _raw(name)
    if value is None or value == "":
        return None
    valid_set = set(valid) | set(aliases)
    names = [part.strip() for part in value.split(",")]
    if any(not n for n in names):
        raise EnvironmentVariableError(
            f"{name}={value!r} has an empty entry; expected name[,name...] with valid names: "
            f"{', '.join(sorted(valid_set))}"
        )
    unknown = [n for n in names if n not in valid_set]
    if unknown:
        raise EnvironmentVariableError(
            f"{name}={value!r} names unknown backend(s) {', '.join(map(repr, unknown))}; "
            f"valid names: {', '.join(sorted(valid_set))}"
        )
    return tuple(names)


def backend_override(valid: Iterable[str], aliases: Iterable[str] = ()) -> tuple[str, ...] | None:
    """``ATTNKIT_BACKEND``: one forced backend or an ordered allow-list; None when unset."""
    return _name_list(BACKEND, valid, aliases)


def disabled_backends(valid: Iterable[str], aliases: Iterable[str] = ()) -> frozenset[str]:
    """``ATTNKIT_DISABLE``: backends removed from automatic choice."""
    return frozenset(_name_list(DISABLE, valid, aliases) or ())


def debug() -> bool:
    # Read on every call (dispatch logs every decision when set): the unset case stays a dictionary look-up.
    return _get(DEBUG) is not None and _flag(DEBUG, False)


def host_fastpath() -> bool:
    """Whether repeated eager calls may take the host fast paths (read per call; the unset case is one look-up)."""
    return _get(HOST_FASTPATH) is None or _flag(HOST_FASTPATH, True)


def triton_autotune() -> bool:
    return _flag(TRITON_AUTOTUNE, True)


def cupy_cache_dir() -> str:
    value = _raw(CUPY_CACHE_DIR)
    if value:
        return os.path.expanduser(value)
    return os.path.join(os.path.expanduser("~"), ".cache", "attnkit", "cupy")


def cupy_wgmma() -> bool:
    return _flag(CUPY_WGMMA, True)


def speed_table_setting() -> str | None:
    """The raw ``ATTNKIT_SPEED_TABLE`` value (a dispatch cache key; attnkit.speed parses and checks it)."""
    return _get(SPEED_TABLE)


def cupy_tma_bwd() -> bool:
    """Whether the CuPy backend's Hopper backward may use the TMA warp-specialized kernel (bwd_sm90_ws.cu)."""
    return _flag(CUPY_TMA_BWD, True)


def cupy_tma() -> bool:
    """Whether the CuPy backend's dense Hopper forward may use the TMA warp-specialised kernel (fwd_sm90_ws.cu)."""
    return _flag(CUPY_TMA, True)


def snapshot() -> dict[str, str | None]:
    """Current values of every attnkit variable, for ``attnkit info``."""
    return {name: os.environ.get(name) for name in ALL_VARIABLES}


def raw_values() -> tuple:
    """The raw value of every attnkit variable, in ``ALL_VARIABLES`` order (None where unset), as one cheap tuple:
    the per-call caches of :mod:`attnkit.ops._fastcall` key on it, so a change to any variable is seen on the next
    call, and values are parsed (and rejected) only by the readers above, when the tuple is new."""
    environ = os.environ
    data = getattr(environ, "_data", None)
    if data is None or type(environ) is not _ENVIRON_TYPE:
        return tuple(map(environ.get, _NAMES))
    keys = _ENCODED_NAMES
    if keys is None:
        keys = _encoded_names()
    return tuple(map(data.get, keys))  # encoded values: equal exactly when the decoded ones are


_NAMES = tuple(ALL_VARIABLES)
_ENCODED_NAMES: tuple | None = None


def _encoded_names() -> tuple:
    global _ENCODED_NAMES
    _ENCODED_NAMES = tuple(os.environ.encodekey(name) for name in _NAMES)
    return _ENCODED_NAMES


def dispatch_variables() -> tuple[str | None, str | None]:
    """The raw ``ATTNKIT_BACKEND`` and ``ATTNKIT_DISABLE`` values (a cache key for dispatch; parsed only when new)."""
    return _get(BACKEND), _get(DISABLE)
