"""Kernel launches of the cupy_cuda backend: the device's shared-memory limit, PyTorch's current stream seen by
CuPy, and :class:`Launcher`, the one object that runs a compiled kernel (and counts what ran)."""

from __future__ import annotations

import functools
from collections import Counter
from typing import Any

import torch

from . import compiler


@functools.cache
def max_smem_optin(device: int) -> int:
    """Dynamic shared memory one block may opt in to on ``device``, in bytes."""
    props = torch.cuda.get_device_properties(device)
    value = getattr(props, "shared_memory_per_block_optin", None)
    if value:
        return int(value)
    import cupy

    return int(cupy.cuda.Device(device).attributes["MaxSharedMemoryPerBlockOptin"])


class _StreamHandle:
    """A raw CUDA stream handle exposed through the CUDA stream protocol (what ``Stream.from_external`` reads)."""

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.ptr)


@functools.lru_cache(maxsize=64)
def _cupy_stream(ptr: int, device: int) -> Any:
    """CuPy's view of a PyTorch stream, cached so a launch costs no wrapper construction."""
    import cupy

    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None:  # CuPy >= 14; ExternalStream is deprecated there
        with cupy.cuda.Device(device):
            return from_external(_StreamHandle(ptr))
    return cupy.cuda.ExternalStream(ptr, device)


# Kernel launches per kernel name since import: lets tests check which kernel actually served a call.
LAUNCH_COUNTS: Counter[str] = Counter()


class Launcher:
    """Runs one kernel on PyTorch's current stream of ``device``."""

    def __init__(self, device: torch.device):
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.stream = torch.cuda.current_stream(self.index).cuda_stream

    def smem_limit(self) -> int:
        return max_smem_optin(self.index)

    def __call__(
        self, spec: compiler.ModuleSpec, name: str, grid: tuple[int, int, int], threads: int, smem: int, args: list[Any]
    ) -> None:
        import cupy

        kern = compiler.MODULES.kernel(self.index, spec, name, smem)
        with cupy.cuda.Device(self.index), _cupy_stream(self.stream, self.index):
            kern(grid, (threads, 1, 1), tuple(args), shared_mem=smem)
        LAUNCH_COUNTS[name] += 1
