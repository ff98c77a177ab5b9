"""A device-side range check of a length vector in one launch, for the kv-cache frontend (Backend.check_lengths).

The frontend's torch formulation of ``0 <= cache_seqlens <= capacity - seqlen_new`` (two comparisons, an and, an
all, then ``torch._assert_async``) is five launches: ~35 us of host time per decode step on an H200
(benchmarks/results/h200_2026-12-02_s4/host_parts.txt). This kernel checks every entry in one program and stops
the GPU with a device-side assert when one is outside the range, in stream order before the append and the
attention that follow, like ``torch._assert_async``; the host never waits. It is compiled with ``debug=True``,
without which triton drops ``tl.device_assert`` (the checks that mode adds cost nothing in a kernel this small).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import device, fastpath


@triton.jit(debug=True)
def check_range(LENGTHS, count, low, high, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    values = tl.load(LENGTHS + offs, mask=offs < count, other=low)
    # The message is a literal: triton 3.6 refuses a module-level string that is not a tl.constexpr (a compile error
    # only the GPU front end raises; tests/triton/test_triton_sm90_compile.py compiles this kernel on the CPU).
    tl.device_assert(
        (values >= low) & (values <= high),
        "attention_with_kvcache: cache_seqlens has an entry outside [low, high] (negative, or a row without room "
        "for the appended tokens)",
    )


plans: fastpath.Plans[fastpath.Launcher] = fastpath.Plans()


def check(lengths: torch.Tensor, low: int, high: int) -> None:
    """Queue the check of the contiguous int32 vector ``lengths`` against ``[low, high]`` on its device."""
    count = lengths.shape[0]
    if count == 0:
        return
    key = None
    if fastpath.enabled():
        key = (fastpath.meta(lengths), low, high)
        launch = plans.get(key)
        if launch is not None:
            launch(lengths)
            return
    values = {"LENGTHS": lengths, "count": count, "low": low, "high": high, "BLOCK": triton.next_power_of_2(count)}
    args = fastpath.arguments(check_range, values)
    with device.on_device(lengths):
        compiled = check_range[(1,)](*args, num_warps=1)
    if key is not None:
        launcher = fastpath.bind(check_range, compiled, (1,), args[1:], lengths.device, False)
        if launcher is not None:
            plans.put(key, launcher)
