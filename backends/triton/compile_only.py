"""A stand-in triton driver that compiles kernels for a CUDA target on a machine without a GPU.

Used by the CPU compile check (tests/triton/test_triton_sm90_compile.py) and the benchmarks' ``xcompile``
commands: with it active, ``JITFunction.run(..., warmup=True)`` runs triton's front end, optimiser and ptxas for
the target and launches nothing. Imports triton, so only code that compiles on purpose imports this module.
"""

from __future__ import annotations

from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

HOPPER = 90


class CompileOnlyDriver:
    """Just enough of a driver for a warm-up compile: the target, device 0, stream 0."""

    def __init__(self, arch: int = HOPPER) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


def activate(arch: int = HOPPER) -> None:
    """Make triton compile for ``arch`` (sm_90 by default) from here on, in this process."""
    driver.set_active(CompileOnlyDriver(arch))
