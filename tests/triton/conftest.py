"""Triton test setup: the CPU tests run the kernels through triton's interpreter; ``-m gpu`` runs compile them.

triton decides interpreter vs compiler when a kernel is decorated, so TRITON_INTERPRET must be set before the
kernel modules (attnkit.backends.triton.fwd_kernel, ...) are imported. Those are imported lazily on the first
Triton call, never by attnkit or the backend class, so setting it at configure time is early enough even though
tests/conftest.py has already imported attnkit.
"""

from __future__ import annotations

import os


def _gpu_run(markexpr: str) -> bool:
    return "gpu" in markexpr and "not gpu" not in markexpr


def pytest_configure(config) -> None:
    if not _gpu_run(config.getoption("markexpr", "") or ""):
        os.environ["TRITON_INTERPRET"] = "1"
