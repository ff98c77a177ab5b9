"""Where the Triton kernels run: the device guard, multiprocessor counts, and the interpreter check."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from attnkit.errors import AttnkitError

from . import probes

INTERPRETER_SM_COUNT = 2  # persistent grids under the interpreter: few programs, each walking many tiles
_SM_COUNT: dict[int, int] = {}


def sm_count(device: torch.device, interpreter: int = INTERPRETER_SM_COUNT) -> int:
    """Multiprocessors of ``device`` (persistent grids, split-KV heuristics), cached per device index;
    ``interpreter`` for CPU tensors (the interpreter)."""
    if device.type != "cuda":
        return interpreter
    index = device.index if device.index is not None else torch.cuda.current_device()
    count = _SM_COUNT.get(index)
    if count is None:
        count = _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return count


@contextlib.contextmanager
def on_device(t: torch.Tensor) -> Iterator[None]:
    """Launch on ``t``'s GPU (triton launches on the current device)."""
    if t.device.type == "cuda":
        with torch.cuda.device(t.device):
            yield
    else:
        yield


def interpreted() -> bool:
    """Whether the kernels run under the interpreter; raises when TRITON_INTERPRET changed since they were
    decorated (triton reads it then, once)."""
    kernels = probes.kernels_interpreted()
    if kernels != probes.interpreter_enabled():
        raise AttnkitError(
            "the Triton kernels were imported with TRITON_INTERPRET="
            f"{'1' if kernels else 'unset'} but it is now {'1' if probes.interpreter_enabled() else 'unset'}; "
            "triton reads it once, when the kernels are decorated: set it before the first Triton attention call"
        )
    return kernels
