"""Tensor maps for Hopper's bulk tensor copy engine (TMA), encoded on the host by the CUDA driver.

A tensor map is a 128-byte opaque descriptor of a strided global tensor and the box one copy moves. The
kernels take it by value as a ``const __grid_constant__ CUtensorMap`` parameter; CuPy passes any NumPy
structured scalar by value, so :func:`encode_tiled` returns one holding the driver's bytes.

The driver entry point is called through ``ctypes`` on ``libcuda.so.1`` (present wherever a CUDA GPU is), so
no extra package is needed. Everything except the final driver call is plain Python and is unit-tested on
machines without a GPU (:func:`tiled_arguments`).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from attnkit.errors import BackendCompileError, InvalidArgumentError

TENSOR_MAP_BYTES = 128
TENSOR_MAP_ALIGN = 64

# CUtensorMapDataType values (cuda.h).
_DATA_TYPES = {
    torch.uint8: 0,
    torch.float16: 6,
    torch.float32: 7,
    torch.bfloat16: 9,
}
if hasattr(torch, "float8_e4m3fn"):
    _DATA_TYPES[torch.float8_e4m3fn] = 0  # moved as bytes

# CUtensorMapSwizzle values keyed by the swizzle span in bytes (0: none).
_SWIZZLES = {0: 0, 32: 1, 64: 2, 128: 3}
_INTERLEAVE_NONE = 0
_L2_PROMOTION_128B = 2
_OOB_FILL_ZERO = 0  # out-of-bounds elements of a box read as zero
_MAX_RANK = 5
_MAX_BOX = 256


@dataclass(frozen=True)
class TiledArguments:
    """The checked arguments of one ``cuTensorMapEncodeTiled`` call; dims and boxes innermost first."""

    data_type: int
    address: int
    dims: tuple[int, ...]
    strides_bytes: tuple[int, ...]  # of dims 1 .. rank-1 (the innermost is contiguous)
    box: tuple[int, ...]
    swizzle: int


def tiled_arguments(
    address: int,
    dtype: torch.dtype,
    dims: Sequence[int],
    strides: Sequence[int],
    box: Sequence[int],
    swizzle_bytes: int = 128,
) -> TiledArguments:
    """Check a tiled tensor map's description against TMA's rules and return it in the driver's terms.

    ``dims`` and ``box`` list the tensor's sizes and one copy's box, innermost (contiguous) dim first;
    ``strides`` are the element strides of dims 1 .. rank-1. Raises :class:`InvalidArgumentError` naming the
    rule a value breaks (the caller falls back to a non-TMA kernel before that happens).
    """
    if dtype not in _DATA_TYPES:
        raise InvalidArgumentError(f"TMA dtype {dtype} is not one of {sorted(map(str, _DATA_TYPES))}")
    if swizzle_bytes not in _SWIZZLES:
        raise InvalidArgumentError(f"swizzle_bytes={swizzle_bytes}; allowed: {sorted(_SWIZZLES)}")
    rank = len(dims)
    if not 1 <= rank <= _MAX_RANK or len(box) != rank or len(strides) != rank - 1:
        raise InvalidArgumentError(
            f"TMA rank {rank} with {len(box)} box dims and {len(strides)} strides; need rank 1-{_MAX_RANK}, "
            "one box dim per dim and one stride per dim after the first"
        )
    elem = torch.empty((), dtype=dtype).element_size()
    if address % 16:
        raise InvalidArgumentError(f"TMA base address {address:#x} is not 16-byte aligned")
    strides_bytes = tuple(int(s) * elem for s in strides)
    for i, s in enumerate(strides_bytes):
        if s % 16 or s <= 0 or s >= 1 << 40:
            raise InvalidArgumentError(f"TMA stride of dim {i + 1} is {s} bytes; it must be a positive multiple of 16")
    for i, (n, b) in enumerate(zip(dims, box)):
        if n < 1 or n >= 1 << 32:
            raise InvalidArgumentError(f"TMA dim {i} has size {n}; allowed 1 .. 2**32-1")
        if not 1 <= b <= _MAX_BOX:
            raise InvalidArgumentError(f"TMA box dim {i} is {b}; allowed 1 .. {_MAX_BOX}")
    if (box[0] * elem) % 16:
        raise InvalidArgumentError(f"TMA inner box of {box[0]} elements is not a multiple of 16 bytes")
    if swizzle_bytes and box[0] * elem > swizzle_bytes:
        raise InvalidArgumentError(
            f"TMA inner box of {box[0] * elem} bytes exceeds the {swizzle_bytes}-byte swizzle span"
        )
    return TiledArguments(
        _DATA_TYPES[dtype],
        int(address),
        tuple(int(n) for n in dims),
        strides_bytes,
        tuple(int(b) for b in box),
        _SWIZZLES[swizzle_bytes],
    )


@functools.cache
def _encode_fn() -> Any:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:  # pragma: no cover - only on machines without the NVIDIA driver
        raise BackendCompileError(f"the CUDA driver (libcuda.so.1) is not loadable: {exc}") from exc
    fn = lib.cuTensorMapEncodeTiled
    fn.restype = ctypes.c_int
    fn.argtypes = [
        ctypes.c_void_p,  # CUtensorMap*
        ctypes.c_int,  # data type
        ctypes.c_uint32,  # rank
        ctypes.c_void_p,  # global address
        ctypes.POINTER(ctypes.c_uint64),  # dims
        ctypes.POINTER(ctypes.c_uint64),  # strides (bytes)
        ctypes.POINTER(ctypes.c_uint32),  # box
        ctypes.POINTER(ctypes.c_uint32),  # element strides
        ctypes.c_int,  # interleave
        ctypes.c_int,  # swizzle
        ctypes.c_int,  # L2 promotion
        ctypes.c_int,  # OOB fill
    ]
    return fn


def _kernel_arg_dtype() -> Any:
    import numpy as np

    return np.dtype({"names": ["bytes"], "formats": [(np.uint8, TENSOR_MAP_BYTES)], "itemsize": TENSOR_MAP_BYTES})


def encode(args: TiledArguments) -> Any:
    """Run the driver's encoder; returns a NumPy structured scalar that CuPy passes to a kernel by value."""
    import numpy as np

    rank = len(args.dims)
    raw = (ctypes.c_uint8 * (TENSOR_MAP_BYTES + TENSOR_MAP_ALIGN))()
    base = ctypes.addressof(raw)
    aligned = (base + TENSOR_MAP_ALIGN - 1) // TENSOR_MAP_ALIGN * TENSOR_MAP_ALIGN
    dims = (ctypes.c_uint64 * rank)(*args.dims)
    strides = (ctypes.c_uint64 * max(rank - 1, 1))(*(args.strides_bytes or (0,)))
    box = (ctypes.c_uint32 * rank)(*args.box)
    ones = (ctypes.c_uint32 * rank)(*([1] * rank))
    status = _encode_fn()(
        ctypes.c_void_p(aligned),
        args.data_type,
        rank,
        ctypes.c_void_p(args.address),
        dims,
        strides,
        box,
        ones,
        _INTERLEAVE_NONE,
        args.swizzle,
        _L2_PROMOTION_128B,
        _OOB_FILL_ZERO,
    )
    if status != 0:
        raise BackendCompileError(f"cuTensorMapEncodeTiled failed with CUresult {status} for {args}")
    data = ctypes.string_at(aligned, TENSOR_MAP_BYTES)
    return np.frombuffer(data, dtype=_kernel_arg_dtype())[0]


def encode_tiled(
    t: torch.Tensor,
    dims: Sequence[int],
    strides: Sequence[int],
    box: Sequence[int],
    swizzle_bytes: int = 128,
) -> Any:
    """Tensor map over ``t``'s storage (from its data pointer) with the given innermost-first dims/strides."""
    return encode(tiled_arguments(t.data_ptr(), t.dtype, dims, strides, box, swizzle_bytes))
