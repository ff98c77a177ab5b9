"""Decode timing: every provider's step measured eagerly and as CUDA-graph replays, side by side.

A decode step is shorter than the host time of an eager call (~0.1 ms of GPU work on an H200), so CUDA events
around single calls measure either the kernel (when the host keeps ahead) or the host (when it does not),
depending on what ran before (docs/bench.md, "Timing"). Decode cases therefore get two numbers, both timed in
rounds across the providers of a case like every other mode:

* **eager**: wall-clock time per call of ``EAGER_CALLS`` back-to-back calls (one on the CPU), the device
  synchronised before and after each block: what a Python decode loop pays, host overhead (argument checks,
  dispatch, launches) included.
* **graph**: the step captured once per input set in a CUDA graph (after warm-up calls on a side stream), replays
  timed with CUDA events: the GPU time alone, what a decode loop under ``torch.cuda.graph`` pays. A provider whose
  step cannot be captured gets the reason instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .timing import Clock, CudaClock, Timing, measure_interleaved

EAGER_CALLS = 20  # calls per timed block on a GPU: enough to amortise the two synchronisations around it


def eager_calls(device: torch.device) -> int:
    """Calls per eager block: on the CPU every call is synchronous, so one call is already its wall time."""
    return EAGER_CALLS if device.type == "cuda" else 1


Step = Callable[[int], object]
Capture = Callable[[Callable[[], object]], Callable[[], object]]


class SyncedHostClock:
    """Wall-clock time with the device synchronised at every mark: the block between two marks is host work plus
    all the device work it queued."""

    def __init__(self, device: torch.device):
        self.device = device

    def mark(self) -> float:
        self.synchronize()
        return time.perf_counter()

    def elapsed_ms(self, start: float, end: float) -> float:
        return (end - start) * 1e3

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def eager_block(step: Step, calls: int, rotations: int) -> Step:
    """``calls`` back-to-back calls of ``step``, cycling through the input sets."""

    def block(i: int) -> None:
        for j in range(calls):
            step((i * calls + j) % rotations)

    return block


def cuda_graph(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """Capture ``fn`` in a CUDA graph after two warm-up calls on a side stream (compilation, autotuning and the
    allocator's first blocks stay outside the graph); returns its replay. The graph keeps its own output buffers."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


@dataclass(frozen=True)
class DecodeTiming:
    eager: Timing | Exception  # per call
    graph: Timing | Exception | str  # per replay; a str says why there is no graph number


def measure_decode(
    steps: dict[str, Step],
    rotations: int,
    device: torch.device,
    *,
    warmup: int,
    min_repeats: int,
    max_repeats: int,
    budget_s: float,
    capture: Capture | None = None,
    graph_clock: Clock | None = None,
) -> dict[str, DecodeTiming]:
    """Eager and graph timings of every step. ``capture`` and ``graph_clock`` default to CUDA graphs and CUDA
    events on a CUDA device; elsewhere there is no graph number unless both are given (tests)."""
    rotations = max(1, rotations)
    blocks = {name: eager_block(step, eager_calls(device), rotations) for name, step in steps.items()}
    blocks_timed = measure_interleaved(blocks, rotations, SyncedHostClock(device), warmup=warmup,
                                       min_repeats=min_repeats, max_repeats=max_repeats, budget_s=budget_s)  # fmt: skip
    eager = {name: _per_call(t, eager_calls(device), rotations) for name, t in blocks_timed.items()}
    graph: dict[str, Timing | Exception | str] = {}
    if capture is None and device.type == "cuda":

        def capture(fn: Callable[[], object]) -> Callable[[], object]:
            return cuda_graph(fn, device)

        graph_clock = graph_clock or CudaClock(device)
    if capture is None or graph_clock is None:
        graph = dict.fromkeys(steps, "CUDA graphs need a CUDA device")
    else:
        replays: dict[str, Step] = {}
        for name, step in steps.items():
            if isinstance(eager[name], Exception):
                graph[name] = "the eager call failed"
                continue
            try:
                per_set = [capture(lambda step=step, i=i: step(i)) for i in range(rotations)]
            except Exception as exc:
                graph[name] = f"not capturable: {type(exc).__name__}: {_first_line(exc)}"
                continue
            replays[name] = lambda i, per_set=per_set: per_set[i % len(per_set)]()
        graph.update(measure_interleaved(replays, rotations, graph_clock, warmup=warmup, min_repeats=min_repeats,
                                         max_repeats=max_repeats, budget_s=budget_s))  # fmt: skip
    return {name: DecodeTiming(eager[name], graph[name]) for name in steps}


def _per_call(timing: Timing | Exception, calls: int, rotations: int) -> Timing | Exception:
    if isinstance(timing, Exception):
        return timing
    return Timing(timing.median_ms / calls, timing.min_ms / calls, timing.max_ms / calls, timing.repeats, rotations)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""
