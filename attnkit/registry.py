"""Backend interface and registry.

A backend is a subclass of :class:`Backend` that declares what it supports as data
(:class:`BackendCapabilities`) and implements the kernels. Built-in backends and third-party ones are found
through the same mechanism: a ``name -> "module:attribute"`` table, filled with the built-ins below and with the
``attnkit.backends`` entry-point group of installed distributions. Modules are imported on first use, so a
backend whose optional dependency is missing costs nothing until someone asks about it.

Writing a backend (see docs/architecture.md):

* set ``name``, ``priority`` (higher is tried first by ``auto``) and ``capabilities``;
* override ``unavailable_reason()`` to report a missing package or device (with an install hint);
* override ``extra_why_not(spec)`` for limits the capability table cannot express;
* implement ``forward``/``backward`` (dense and varlen, see :mod:`attnkit.params` for layouts) and, when the
  capabilities list them, ``forward_kvcache``, ``piecewise_forward`` and ``piecewise_backward`` (and, with
  float8_e4m3fn among the dtypes and the ``fp8`` feature, ``forward_fp8`` / ``forward_kvcache_fp8``).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from typing import ClassVar

import torch

from .errors import AttnkitError
from .fp8 import Fp8Scales
from .params import AttentionParams, KVCacheInfo, VarlenInfo
from .spec import OPS, AttentionSpec

ENTRY_POINT_GROUP = "attnkit.backends"

# The one table of built-in backends; pyproject.toml's entry points must equal it (tests/test_packaging.py).
BUILTIN_BACKENDS: dict[str, str] = {
    "reference": "attnkit.backends.reference:ReferenceBackend",
    "triton_cuda": "attnkit.backends.triton:TritonCudaBackend",
    "triton_rocm": "attnkit.backends.triton:TritonRocmBackend",
    "cupy_cuda": "attnkit.backends.cupy:CupyCudaBackend",
    "torch_sdpa": "attnkit.backends.torch_sdpa:TorchSdpaBackend",
}

# Names that resolve to a concrete backend depending on the device.
ALIASES = ("triton",)


@dataclass(frozen=True)
class BackendCapabilities:
    """What a backend supports, as data. ``why_not`` checks a spec against it."""

    device_types: frozenset[str]
    dtypes: frozenset[torch.dtype]
    ops: frozenset[str]
    features: frozenset[str]
    vendors: frozenset[str] = frozenset({"nvidia", "amd", "cpu"})  # device vendor: "nvidia", "amd", "cpu"
    min_compute_capability: tuple[int, int] | None = None  # NVIDIA only
    min_head_dim: int = 1
    max_head_dim: int = 256
    head_dim_multiple: int = 1
    backward: bool = True
    backward_ops: frozenset[str] = frozenset({"attention", "varlen", "piecewise"})

    def describe(self) -> dict[str, str]:
        cc = self.min_compute_capability
        return {
            "devices": ",".join(sorted(self.device_types)),
            "vendors": ",".join(sorted(self.vendors)),
            "min capability": f"{cc[0]}.{cc[1]}" if cc else "-",
            "dtypes": ",".join(str(d).removeprefix("torch.") for d in sorted(self.dtypes, key=str)),
            "head dims": f"{self.min_head_dim}..{self.max_head_dim}"
            + (f" (multiple of {self.head_dim_multiple})" if self.head_dim_multiple > 1 else ""),
            "ops": ",".join(o for o in OPS if o in self.ops),
            "features": ",".join(sorted(self.features)),
            "backward": "yes" if self.backward else "no",
        }


def _vendor(spec: AttentionSpec) -> str:
    if spec.device_type == "cuda":
        return "amd" if spec.is_hip else "nvidia"
    return spec.device_type


class Backend:
    """Base class of every backend. Instances are singletons held by the registry."""

    name: ClassVar[str] = ""
    priority: ClassVar[int] = 0
    capabilities: ClassVar[BackendCapabilities]
    description: ClassVar[str] = ""

    # ---- availability and eligibility -------------------------------------------------------------------------
    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run at all in this process (missing package, no device), or None."""
        return None

    def extra_why_not(self, spec: AttentionSpec) -> list[str]:
        """Limits beyond the capability table. Default: none."""
        return []

    def why_not_auto(self, spec: AttentionSpec) -> list[str]:
        """Extra reasons to skip this backend in automatic choice only (it may still be requested by name)."""
        return []

    def why_not(self, spec: AttentionSpec) -> list[str]:
        """Every reason this backend cannot run ``spec``; empty means it can."""
        unavailable = self.unavailable_reason()
        if unavailable:
            return [unavailable]
        caps = self.capabilities
        reasons: list[str] = []
        if spec.device_type not in caps.device_types:
            reasons.append(f"device type {spec.device_type!r} not supported (supports {sorted(caps.device_types)})")
        else:
            vendor = _vendor(spec)
            if vendor not in caps.vendors:
                reasons.append(f"{vendor} devices not supported (supports {sorted(caps.vendors)})")
            elif (
                vendor == "nvidia"
                and caps.min_compute_capability is not None
                and spec.compute_capability is not None
                and spec.compute_capability < caps.min_compute_capability
            ):
                have, need = spec.compute_capability, caps.min_compute_capability
                reasons.append(f"compute capability {have[0]}.{have[1]} < required {need[0]}.{need[1]}")
        if spec.dtype not in caps.dtypes:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in sorted(caps.dtypes, key=str))
            reasons.append(f"dtype {str(spec.dtype).removeprefix('torch.')} not supported (supports {allowed})")
        for label, dim in (("head_dim", spec.head_dim), ("head_dim_v", spec.head_dim_v)):
            if not caps.min_head_dim <= dim <= caps.max_head_dim or dim % caps.head_dim_multiple:
                allowed = f"{caps.min_head_dim}..{caps.max_head_dim}"
                if caps.head_dim_multiple > 1:
                    allowed += f", multiple of {caps.head_dim_multiple}"
                reasons.append(f"{label}={dim} not supported (supports {allowed})")
        if spec.op not in caps.ops:
            reasons.append(f"operator {spec.op!r} not implemented (implements {sorted(caps.ops)})")
        missing = sorted(spec.features - caps.features)
        if missing:
            reasons.append(f"feature(s) {', '.join(missing)} not supported")
        if spec.requires_grad and (not caps.backward or spec.op not in caps.backward_ops):
            reasons.append(f"no backward pass for {spec.op!r} (inputs require grad)")
        reasons.extend(self.extra_why_not(spec))
        return reasons

    def info(self) -> dict[str, str]:
        """Extra lines for ``attnkit info`` (versions, compiler options, ...)."""
        return {}

    # ---- kernels ---------------------------------------------------------------------------------------------
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        alibi_slopes: torch.Tensor | None,
        params: AttentionParams,
        varlen: VarlenInfo | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(out, lse)``; layouts in :mod:`attnkit.params`."""
        raise AttnkitError(f"backend {self.name!r} declares no forward kernel")

    def forward_runner(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: AttentionParams, keep_lse: bool
    ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
        """For repeated eager calls (attnkit.ops._fastcall): ``run(q, k, v) -> (out, lse)`` doing what
        ``forward(q, k, v, None, params, None)`` does for any tensors with the shapes, strides, dtypes, devices and
        16-byte alignment of these, just made by ``forward``; ``lse`` may be a scratch buffer that later calls
        overwrite when ``keep_lse`` is False. None (the default): the frontend calls ``forward``."""
        return None

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        alibi_slopes: torch.Tensor | None,
        params: AttentionParams,
        varlen: VarlenInfo | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(dq, dk, dv)`` shaped like ``q, k, v``."""
        raise AttnkitError(f"backend {self.name!r} declares no backward kernel")

    def forward_kvcache(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cache: KVCacheInfo,
        alibi_slopes: torch.Tensor | None,
        params: AttentionParams,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of q (B, Sq, Hq, D) over the (already appended) cache; returns ``(out, lse)``."""
        raise AttnkitError(f"backend {self.name!r} declares no kvcache kernel")

    def append_kv(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache_seqlens: torch.Tensor,
        cache_batch_idx: torch.Tensor | None,
        block_table: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """A kernel of the backend's own for the kv-cache append before ``forward_kvcache`` (positions already
        checked): writes ``k``/``v`` at ``cache_seqlens[b] ...`` of each row and returns the lengths after it,
        int32 (B,). None (the default): the op appends with torch indexing instead."""
        return None

    def check_lengths(self, lengths: torch.Tensor, low: int, high: int) -> bool:
        """Queue a device-side check that every entry of the contiguous int32 vector ``lengths`` (on this backend's
        device) lies in ``[low, high]``: in stream order, no host wait, and a failure stops the GPU with a
        device-side assert, like ``torch._assert_async``. False (the default): not done, the frontend checks with
        torch ops instead."""
        return False

    def kvcache_runner(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        cache_seqlens: torch.Tensor,
        block_table: torch.Tensor | None,
        params: AttentionParams,
        num_splits: int,
        keep_lse: bool,
    ) -> Callable[..., tuple[torch.Tensor, torch.Tensor] | None] | None:
        """For repeated eager decode steps (attnkit.ops._fastcall), made right after a first step with these
        tensors (checked lengths ``cache_seqlens``, no ALiBi, cache_batch_idx, left padding or fp8):
        ``run(q, k_cache, v_cache, k, v, cache_seqlens, block_table, check=False) -> (out, lse)`` appends and
        attends as the op would for tensors with the same layouts, or returns None having written nothing (then
        the op runs); ``cache_seqlens`` may be an int (every row's length, checked on the host); ``check=True``:
        tensor lengths whose range ``[0, capacity - new tokens]`` the step must check on the device itself before
        writing (None if it cannot). ``lse`` may be a scratch buffer when ``keep_lse`` is False. None (the
        default): the op runs every step."""
        return None

    def merge_states(
        self, out_parts: torch.Tensor, lse_parts: torch.Tensor, out_dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge partial attention states: ``out_parts`` (P, B, S, H, D), ``lse_parts`` (P, B, H, S), any strides;
        returns ``(out (B, S, H, D) in out_dtype, lse (B, H, S))`` (see ``attnkit.merge_attention_states``)."""
        raise AttnkitError(f"backend {self.name!r} declares no merge kernel")

    def forward_fp8(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        alibi_slopes: torch.Tensor | None,
        params: AttentionParams,
        varlen: VarlenInfo | None,
        scales: Fp8Scales,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` for float8_e4m3fn q, k, v with descales (attnkit.fp8); ``out`` in ``scales.out_dtype``,
        lse float32. Needed only when the capabilities list the ``fp8`` feature."""
        raise AttnkitError(f"backend {self.name!r} declares no fp8 kernel")

    def forward_kvcache_fp8(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cache: KVCacheInfo,
        alibi_slopes: torch.Tensor | None,
        params: AttentionParams,
        scales: Fp8Scales,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward_kvcache` for a float8_e4m3fn q and cache; descales are indexed by q's batch row."""
        raise AttnkitError(f"backend {self.name!r} declares no fp8 kvcache kernel")

    def piecewise_forward(
        self,
        q1: torch.Tensor,
        k1: torch.Tensor,
        q2: torch.Tensor,
        k2: torch.Tensor,
        v: torch.Tensor,
        dist_threshold: int,
        params: AttentionParams,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise AttnkitError(f"backend {self.name!r} declares no piecewise kernel")

    def piecewise_backward(
        self,
        dout: torch.Tensor,
        q1: torch.Tensor,
        k1: torch.Tensor,
        q2: torch.Tensor,
        k2: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        dist_threshold: int,
        params: AttentionParams,
    ) -> tuple[torch.Tensor, ...]:
        raise AttnkitError(f"backend {self.name!r} declares no piecewise backward kernel")


@dataclass
class _Entry:
    name: str
    target: str  # "module:attribute"
    source: str  # "builtin" or the distribution providing the entry point
    instance: Backend | None = None
    load_error: str | None = None


class BrokenBackend(Backend):
    """Stands in for a backend whose module failed to import, so the failure shows up as a reason."""

    def __init__(self, name: str, error: str):
        self.name = name  # type: ignore[misc]
        self._error = error

    capabilities = BackendCapabilities(frozenset(), frozenset(), frozenset(), frozenset())

    def unavailable_reason(self) -> str | None:
        return f"failed to load: {self._error}"


@dataclass
class Registry:
    _entries: dict[str, _Entry] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _discovered: bool = False
    # Bumped by every (un)registration. Whatever caches answers derived from the registry (dispatch's decisions)
    # puts it in its keys, so a registration invalidates them without the registry knowing who caches.
    generation: int = 0

    def register(self, name: str, target: str | type[Backend] | Backend, source: str = "user") -> None:
        """Register a backend by ``"module:attribute"`` string, class or instance (last registration wins)."""
        entry = _Entry(name=name, target=target if isinstance(target, str) else f"<{source}>", source=source)
        if isinstance(target, Backend):
            entry.instance = target
        elif isinstance(target, type):
            entry.instance = target()
        with self._lock:
            self._entries[name] = entry
            self.generation += 1

    def unregister(self, name: str) -> None:
        with self._lock:
            self._entries.pop(name, None)
            self.generation += 1

    def _discover(self) -> None:
        if self._discovered:
            return
        with self._lock:
            if self._discovered:
                return
            for name, target in BUILTIN_BACKENDS.items():
                self._entries.setdefault(name, _Entry(name, target, "builtin"))
            for ep in _entry_points():
                if ep.name in self._entries and self._entries[ep.name].source == "builtin":
                    continue  # our own distribution lists the built-ins too
                dist = getattr(getattr(ep, "dist", None), "name", "entry point")
                self._entries.setdefault(ep.name, _Entry(ep.name, ep.value, dist))
            self._discovered = True

    def names(self) -> list[str]:
        self._discover()
        return list(self._entries)

    def source(self, name: str) -> str:
        self._discover()
        return self._entries[name].source

    def get(self, name: str) -> Backend:
        self._discover()
        entry = self._entries[name]
        if entry.instance is None:
            try:
                module_name, _, attr = entry.target.partition(":")
                obj = getattr(importlib.import_module(module_name), attr)
                entry.instance = obj() if isinstance(obj, type) else obj
            except Exception as exc:
                entry.instance = BrokenBackend(name, f"{type(exc).__name__}: {exc}")
        return entry.instance

    def load_builtins(self) -> None:
        """Discover entry points and instantiate the built-in backends now.

        Called at ``import attnkit`` so that the first call inside ``torch.compile`` finds everything loaded:
        dynamo can trace neither the registry lock nor ``importlib``. Built-in backend modules import their heavy
        optional dependencies (triton, cupy) lazily, so this stays cheap.
        """
        self._discover()
        for name, entry in list(self._entries.items()):
            if entry.source == "builtin":
                self.get(name)

    def backends(self) -> list[Backend]:
        return [self.get(n) for n in self.names()]


def _entry_points() -> Iterable[metadata.EntryPoint]:
    try:
        return metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception:
        return []


REGISTRY = Registry()


def register_backend(name: str, target: str | type[Backend] | Backend) -> None:
    """Register a backend under ``name`` (third-party packages usually use the entry-point group instead)."""
    REGISTRY.register(name, target)


def resolve_alias(name: str) -> str:
    if name == "triton":
        from .spec import is_hip

        return "triton_rocm" if is_hip() else "triton_cuda"
    return name
