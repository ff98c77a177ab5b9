"""Launch plans' kernels through the CUDA driver's ``cuLaunchKernel``, with the plan's arguments packed once.

triton 3.6's launcher parses every bound argument of a call (constexprs included: ~70 for the forward), asks the
driver for each pointer's attributes and wraps the launch in its hooks: ~9 us per launch on an H200 host
(benchmarks/results/h200_2026-12-02_s4/host_parts.txt), more than a decode step's kernels take. A launch plan
fixes every argument but its leading ones, so their packed values can be built once: a launch then writes the
leading tensors' addresses (and leading numbers, such as a decode step's length) into the packed block and calls
the driver.

Built only where the compiled kernel's parameters are known exactly: every non-constexpr entry of its signature
is a pointer or an integer or float32/float64 scalar (no tensor descriptors, no tuples), it needs no global or
profile scratch, runs one CTA per cluster, without programmatic dependent launch or a cooperative grid, and the
driver's own record of the function's parameters (``cuFuncGetParamInfo``) agrees in count and size with the
packed block (the two trailing pointers are the scratch buffers triton 3.x kernels always take). Anything else
keeps triton's launcher, and so does a launch the driver refuses (a thread without a current context, say): the
caller then launches through triton, which raises the driver's error where there is one.

A lock per launcher keeps two threads launching the same plan from interleaving their writes to its packed block;
the driver is called through ``ctypes.PyDLL``, which keeps the GIL for the few microseconds of the call.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

# On since the H200 runs of 2026-12-02 (fifth session, benchmarks/results/h200_2026-12-02_s5/): the GPU suite
# (473 passed, 2 skipped, none failed, 3 not reached), the fuzzer and the host-path tests, which compare repeated
# calls bitwise with triton's launcher, passed with it. False keeps triton's launcher, for A/B timing.
ENABLED = True

# Scalar parameter types of triton signatures and their C storage (fp16/bf16 scalars are left to triton).
_SCALARS: dict[str, type] = {
    "i1": ctypes.c_int8, "i8": ctypes.c_int8, "i16": ctypes.c_int16, "i32": ctypes.c_int32, "i64": ctypes.c_int64,
    "u1": ctypes.c_uint8, "u8": ctypes.c_uint8, "u16": ctypes.c_uint16, "u32": ctypes.c_uint32,
    "u64": ctypes.c_uint64, "fp32": ctypes.c_float, "f32": ctypes.c_float, "fp64": ctypes.c_double,
}  # fmt: skip
_SCRATCH_POINTERS = 2  # global and profile scratch, appended by triton's launcher after the kernel's own
_MAX_PARAMS = 4096  # a bound on the driver's parameter-count probe


class Driver(Protocol):
    def launch(self, function: int, grid: tuple[int, int, int], block: int, shared: int, stream: int,
               params: ctypes.Array) -> int: ...  # fmt: skip

    def param_sizes(self, function: int) -> list[int] | None: ...


class CudaDriver:
    """The two driver entry points, from libcuda through ctypes.PyDLL."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._launch = lib.cuLaunchKernel
        self._launch.restype = ctypes.c_int
        self._launch.argtypes = [ctypes.c_void_p, *[ctypes.c_uint] * 7, ctypes.c_void_p, ctypes.c_void_p,
                                 ctypes.c_void_p]  # fmt: skip
        self._param_info = getattr(lib, "cuFuncGetParamInfo", None)  # CUDA 12.4 and newer drivers
        if self._param_info is not None:
            self._param_info.restype = ctypes.c_int
            self._param_info.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t),
                                         ctypes.POINTER(ctypes.c_size_t)]  # fmt: skip

    def launch(self, function, grid, block, shared, stream, params) -> int:
        return self._launch(function, grid[0], grid[1], grid[2], block, 1, 1, shared, stream, params, None)

    def param_sizes(self, function: int) -> list[int] | None:
        """The size of each parameter of ``function`` as the driver records it, or None when it cannot say."""
        if self._param_info is None:
            return None
        offset, size = ctypes.c_size_t(), ctypes.c_size_t()
        sizes = []
        for index in range(_MAX_PARAMS):
            if self._param_info(function, index, ctypes.byref(offset), ctypes.byref(size)) != 0:
                return sizes
            sizes.append(size.value)
        return None


@functools.cache
def cuda_driver() -> CudaDriver | None:
    try:
        return CudaDriver(ctypes.PyDLL("libcuda.so.1"))
    except (OSError, AttributeError):
        return None


def _slot_type(ty: object) -> type | None:
    if not isinstance(ty, str):
        return None
    return ctypes.c_uint64 if ty.startswith("*") else _SCALARS.get(ty)


def _address(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    return value.data_ptr()


def packed_sizes(signature: dict) -> list[int] | None:
    """Bytes of each parameter a launch of a kernel with this triton signature packs (its non-constexpr entries,
    then the scratch pointers), or None when an entry has no known C type."""
    slot_types = [_slot_type(ty) for ty in signature.values() if ty != "constexpr"]
    if any(t is None for t in slot_types):
        return None
    return [ctypes.sizeof(t) for t in slot_types] + [ctypes.sizeof(ctypes.c_uint64)] * _SCRATCH_POINTERS


DirectLaunch = Callable[[Sequence[object], int], bool]


def build(
    compiled: object, grid: tuple[int, int, int], tail: tuple, driver: Driver | None = None
) -> DirectLaunch | None:
    """``direct(lead, stream) -> launched`` for a plan whose arguments are ``(*lead, *tail)``, or None where the
    kernel does not qualify (see the module docstring). ``driver``: tests pass their own."""
    signature = getattr(getattr(compiled, "src", None), "signature", None)
    meta = getattr(compiled, "metadata", None)
    function = getattr(compiled, "function", None)
    if not ENABLED or not isinstance(signature, dict) or meta is None or not isinstance(function, int):
        return None
    driver = driver or cuda_driver()
    if driver is None:
        return None
    try:
        if (meta.global_scratch_size or meta.profile_scratch_size or getattr(meta, "num_ctas", 1) != 1
                or meta.launch_pdl or meta.launch_cooperative_grid):  # fmt: skip
            return None
        block, shared = 32 * int(meta.num_warps), int(meta.shared)
    except AttributeError:
        return None
    n_lead = len(signature) - len(tail)
    sizes = packed_sizes(signature)
    if n_lead < 0 or sizes is None or driver.param_sizes(function) != sizes:
        return None
    slots: list[ctypes._SimpleCData] = []
    lead_slots: list[tuple[ctypes._SimpleCData, int]] = []  # tensors: their address per launch
    lead_scalars: list[tuple[ctypes._SimpleCData, int]] = []  # numbers passed per launch (a decode step's length)
    for position, ty in enumerate(signature.values()):
        if ty == "constexpr":
            continue
        slot_type = _slot_type(ty)
        if position < n_lead:
            slot = slot_type(0)
            (lead_slots if slot_type is ctypes.c_uint64 else lead_scalars).append((slot, position))
        else:
            value = tail[position - n_lead]
            slot = slot_type(_address(value)) if slot_type is ctypes.c_uint64 else slot_type(value)
        slots.append(slot)
    slots += [ctypes.c_uint64(0) for _ in range(_SCRATCH_POINTERS)]
    params = (ctypes.c_void_p * len(slots))(*[ctypes.addressof(s) for s in slots])

    lock = threading.Lock()

    # _keep: the tail's tensors and the packed values live as long as the launcher (params holds addresses only).
    def direct(lead: Sequence[object], stream: int, _keep: tuple = (tail, slots)) -> bool:
        with lock:
            for slot, position in lead_slots:
                slot.value = lead[position].data_ptr()
            for slot, position in lead_scalars:
                slot.value = lead[position]
            return driver.launch(function, grid, block, shared, stream, params) == 0

    return direct
