"""Timing that does not flatter: warm-up outside the timed region, a median over many calls, inputs rotated among
several buffers so that small problems cannot sit in L2 between calls, and the implementations of one case timed
in rounds so that all of them see the same GPU clocks (``measure_interleaved``; docs/bench.md, "Timing").

On CUDA each call is bracketed by CUDA events (GPU timestamps, no host sync inside the loop); elsewhere by
``time.perf_counter``. The number of repeats adapts to a per-case time budget, within [min_repeats, max_repeats].
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch


class Clock(Protocol):
    def mark(self) -> Any: ...

    def elapsed_ms(self, start: Any, end: Any) -> float: ...

    def synchronize(self) -> None: ...


class HostClock:
    """Wall-clock time; correct for CPU work, which is synchronous."""

    def mark(self) -> float:
        return time.perf_counter()

    def elapsed_ms(self, start: float, end: float) -> float:
        return (end - start) * 1e3

    def synchronize(self) -> None:
        pass


class CudaClock:
    """CUDA events on the current stream: they time the GPU work, not the Python that launched it."""

    def __init__(self, device: torch.device):
        self.device = device

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed_ms(self, start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        return start.elapsed_time(end)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


def clock_for(device: torch.device) -> Clock:
    return CudaClock(device) if device.type == "cuda" else HostClock()


def median_batch_ms(fn: Callable[[], object], warmup: int, rounds: int, iters: int) -> float:
    """Median over ``rounds`` of the mean milliseconds of ``iters`` back-to-back CUDA calls of ``fn``, after
    ``warmup`` untimed calls: the fixed-count timer of the one-kernel benchmark scripts (no input rotation; use
    :func:`measure_interleaved` to compare providers)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int
    rotations: int


def rotation_count(set_bytes: int, target_bytes: int, max_sets: int = 8) -> int:
    """How many input sets to cycle through so that together they exceed ``target_bytes`` (a few L2 sizes)."""
    if set_bytes <= 0:
        return 1
    return max(1, min(max_sets, math.ceil(target_bytes / set_bytes)))


def l2_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        if size:
            return int(size)
        return 50 * 2**20  # H100's 50 MiB when the property is missing
    return 32 * 2**20  # a typical server last-level cache share


def measure(
    step: Callable[[int], object],
    rotations: int,
    clock: Clock,
    *,
    warmup: int = 2,
    min_repeats: int = 5,
    max_repeats: int = 100,
    budget_s: float = 0.2,
) -> Timing:
    """Median time of ``step(i)`` in milliseconds, where ``i`` cycles over ``range(rotations)``.

    ``warmup`` untimed calls come first (compilation, autotuning, allocator growth); one more call estimates the
    cost so that ``repeats`` fits ``budget_s``. Results of ``step`` are dropped right away so that their memory is
    reused, as in a real training loop.
    """
    result = measure_interleaved({"step": step}, rotations, clock, warmup=warmup, min_repeats=min_repeats,
                                 max_repeats=max_repeats, budget_s=budget_s)["step"]  # fmt: skip
    if isinstance(result, BaseException):
        raise result
    return result


def measure_interleaved(
    steps: dict[str, Callable[[int], object]],
    rotations: int,
    clock: Clock,
    *,
    warmup: int = 2,
    min_repeats: int = 5,
    max_repeats: int = 100,
    budget_s: float = 0.2,
) -> dict[str, Timing | Exception]:
    """:func:`measure` for several implementations of one case, timed in rounds of one call each.

    A GPU under sustained load runs into its power cap and lowers its clock within ~100 ms (an H200 went from
    1980 to 1665-1830 MHz, docs/bench.md), so back-to-back blocks of calls favour whichever
    implementation runs first after a lighter one. In rounds every implementation sees the same clocks. Each
    has its own warm-up, estimate and repeat count; one that raises is reported as its exception and dropped
    from later rounds.
    """
    rotations = max(1, rotations)
    calls = dict.fromkeys(steps, 0)
    repeats: dict[str, int] = {}
    results: dict[str, Timing | Exception] = {}

    def call(name: str) -> None:
        steps[name](calls[name] % rotations)
        calls[name] += 1

    for name in steps:
        try:
            for _ in range(max(1, warmup)):
                call(name)
            clock.synchronize()
            start = clock.mark()
            call(name)
            end = clock.mark()
            clock.synchronize()
        except Exception as exc:
            results[name] = exc
            continue
        estimate_ms = max(clock.elapsed_ms(start, end), 1e-3)
        repeats[name] = int(min(max_repeats, max(min_repeats, budget_s * 1e3 // estimate_ms)))
    marks: dict[str, list] = {name: [] for name in repeats}
    for round_ in range(max(repeats.values(), default=0)):
        for name, count in repeats.items():
            if round_ >= count or name in results:
                continue
            try:
                start = clock.mark()
                call(name)
                marks[name].append((start, clock.mark()))
            except Exception as exc:
                results[name] = exc
    clock.synchronize()
    for name, count in repeats.items():
        if name not in results:
            times = [clock.elapsed_ms(a, b) for a, b in marks[name]]
            results[name] = Timing(statistics.median(times), min(times), max(times), count, rotations)
    return {name: results[name] for name in steps}
