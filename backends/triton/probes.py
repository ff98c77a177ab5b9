"""Every feature probe of the Triton backends, in one place.

Nothing here imports triton at module import: the backend module must load (and explain itself through
``why_not``) on machines without triton. Probes that need triton import it lazily and cache the answer.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
from importlib import metadata

import torch

from attnkit.spec import is_hip

INSTALL_HINT = "pip install 'attnkit[triton]'"

_TRUE = {"1", "true", "yes", "on"}


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def triton_version() -> str | None:
    try:
        return metadata.version("triton")
    except metadata.PackageNotFoundError:
        # Some ROCm builds ship triton under another distribution name (pytorch-triton-rocm).
        if not triton_installed():
            return None
        import triton

        return getattr(triton, "__version__", "unknown")


def interpreter_enabled() -> bool:
    """True when triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``).

    This is triton's own variable, read the way triton reads it. It is consulted at call time; triton itself
    reads it when a kernel is decorated, which :func:`kernels_interpreted` checks against.
    """
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


@functools.cache
def kernels_interpreted() -> bool:
    """Whether the kernels were built for the interpreter; fixed once they are imported (triton decides when it
    decorates them), so the answer is cached: it is asked on every launch."""
    from triton.runtime.interpreter import InterpretedFunction

    from . import fwd_kernel

    return isinstance(fwd_kernel.attn_fwd, InterpretedFunction)


def hip_build() -> bool:
    return is_hip()


@functools.cache
def has_tensor_descriptors() -> bool:
    """``tl.make_tensor_descriptor`` and ``triton.set_allocator`` exist in this triton (TMA on Hopper)."""
    if not triton_installed():
        return False
    import triton.language as tl

    try:  # tma.scratch scopes the descriptor scratch allocator through this ContextVar
        from triton.runtime._allocation import _allocator
    except ImportError:
        return False
    return hasattr(tl, "make_tensor_descriptor") and hasattr(_allocator, "set")


@functools.cache
def has_warp_specialize() -> bool:
    """``tl.range(..., warp_specialize=True)`` is accepted by this triton."""
    if not triton_installed():
        return False
    import triton.language as tl

    return "warp_specialize" in inspect.signature(tl.range.__init__).parameters


def device_capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return tuple(torch.cuda.get_device_capability(index))  # type: ignore[return-value]


def is_hopper(device: torch.device) -> bool:
    return not is_hip() and device_capability(device) == (9, 0)


def use_tma(device: torch.device) -> bool:
    """TMA tensor descriptors pay off on Hopper only; never on ROCm or in the interpreter."""
    return is_hopper(device) and has_tensor_descriptors() and not interpreter_enabled()


def summary() -> dict[str, str]:
    """Probe results for ``attnkit info``."""
    return {
        "triton": triton_version() or "not installed",
        "interpreter": "on" if interpreter_enabled() else "off",
        "tensor descriptors": "yes" if has_tensor_descriptors() else "no",
        "warp_specialize": "yes" if has_warp_specialize() else "no",
        "hip": "yes" if hip_build() else "no",
    }
