"""TMA (Hopper tensor-memory accelerator) for the Triton kernels: which calls may stream through it, and the
global scratch its device-side descriptors need."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from . import probes


def eligible(block_d: int, head_dim: int, head_dim_v: int, tensors: list[torch.Tensor]) -> bool:
    """TMA descriptors need 16-byte aligned bases and strides and a contiguous head dim."""
    if not tensors[0].is_cuda or not probes.use_tma(tensors[0].device):
        return False
    # ptxas (triton 3.6) crashes on TMA kernels with 256-wide head tiles; 16-byte rows need D % 8 == 0.
    if block_d > 128 or head_dim % 8 or head_dim_v % 8:
        return False
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any((st * size) % 16 for st in t.stride()[:-1]):
            return False
    return True


def _alloc(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def set_scratch() -> object:
    """Installs the scratch allocator triton asks for descriptor memory; returns the token for reset_scratch."""
    from triton.runtime import _allocation

    return _allocation._allocator.set(_alloc)


def reset_scratch(token: object) -> None:
    from triton.runtime import _allocation

    _allocation._allocator.reset(token)


@contextlib.contextmanager
def scratch(enabled: bool) -> Iterator[None]:
    """The scratch allocator inside the block when ``enabled`` (a TMA launch), else nothing."""
    if not enabled:
        yield
        return
    token = set_scratch()
    try:
        yield
    finally:
        reset_scratch(token)
