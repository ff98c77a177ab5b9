"""Host side of the fused kv-cache append (:mod:`.append_kernel`): arguments, grid, launch plans."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from . import device, fastpath
from .append_kernel import append_kv_checked_fwd, append_kv_fwd

_LEAD = ("K_CACHE", "V_CACHE", "K", "V", "SEQLENS", "BATCH_IDX", "BLOCK_TABLE", "TOTAL", "length")


@dataclass(frozen=True)
class AppendPlan:
    launch: fastpath.Launcher


plans: fastpath.Plans[AppendPlan] = fastpath.Plans()


def fusable(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel writes what the torch append would, bit for bit: a plain copy (no dtype conversion,
    whose rounding triton and torch need not share), contiguous head dims."""
    return (
        k.dtype == k_cache.dtype
        and v.dtype == v_cache.dtype
        and all(t.stride(-1) == 1 for t in (k_cache, v_cache, k, v))
    )


def plan_key(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, check_high=None) -> tuple:
    meta = fastpath.meta
    lengths = int if isinstance(cache_seqlens, int) else meta(cache_seqlens)
    return (meta(k_cache), meta(v_cache), meta(k), meta(v), lengths, meta(cache_batch_idx), meta(block_table),
            check_high)  # fmt: skip


def append_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_seqlens: torch.Tensor | int,
    cache_batch_idx: torch.Tensor | None,
    block_table: torch.Tensor | None,
    check_high: int | None = None,
) -> torch.Tensor:
    """Writes ``k``/``v`` (B, S_new, Hk, D) at positions ``cache_seqlens[b] ...`` of each row (its cache row,
    ``cache_batch_idx[b]``, or its pages) and returns the lengths after the append, int32 (B,). An int
    ``cache_seqlens`` is every row's length, passed to the kernel as a number (checked by the caller).
    ``check_high`` (tensor lengths on a GPU): the kernel itself asserts ``0 <= cache_seqlens[b] <= check_high`` on
    the device first (a device-side assert, like ``torch._assert_async``), so the caller needs no check launch."""
    kernel = append_kv_fwd if check_high is None else append_kv_checked_fwd
    batch, seqlen_new = k.shape[:2]
    total = torch.empty(batch, dtype=torch.int32, device=k.device)
    if batch == 0:
        return total
    scalar = isinstance(cache_seqlens, int)
    length, seqlens = (cache_seqlens, total) if scalar else (0, cache_seqlens)
    # Absent optional tensors: the lengths stand in (never read, their flag is off).
    rows = seqlens if cache_batch_idx is None else cache_batch_idx
    table = seqlens if block_table is None else block_table
    key = None
    if fastpath.enabled():
        key = plan_key(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, check_high)
        plan = plans.get(key)
        if plan is not None and fastpath.aligned(total):
            plan.launch(k_cache, v_cache, k, v, seqlens, rows, table, total, length)
            return total
    paged = block_table is not None
    page_size = k_cache.shape[1] if paged else 1
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    values = {
        **dict(zip(_LEAD, (k_cache, v_cache, k, v, seqlens, rows, table, total, length))),
        "seqlen_new": seqlen_new, "num_kv_heads": k.shape[2], "capacity": capacity,
        "stride_kcb": k_cache.stride(0), "stride_kcs": k_cache.stride(1), "stride_kch": k_cache.stride(2),
        "stride_vcb": v_cache.stride(0), "stride_vcs": v_cache.stride(1), "stride_vch": v_cache.stride(2),
        "stride_kb": k.stride(0), "stride_ks": k.stride(1), "stride_kh": k.stride(2),
        "stride_vb": v.stride(0), "stride_vs": v.stride(1), "stride_vh": v.stride(2),
        "stride_bt_b": block_table.stride(0) if paged else 0,
        "HEAD_DIM": k.shape[3], "HEAD_DIM_V": v.shape[3], "BLOCK_H": triton.next_power_of_2(k.shape[2]),
        "BLOCK_D": triton.next_power_of_2(k.shape[3]), "BLOCK_DV": triton.next_power_of_2(v.shape[3]),
        "PAGE_SIZE": page_size, "PAGED": paged, "HAS_BATCH_IDX": cache_batch_idx is not None,
        "SCALAR_LENGTH": scalar, "CHECK_RANGE": check_high is not None,
        "high": 0 if check_high is None else check_high,
    }  # fmt: skip
    args = fastpath.arguments(kernel, values)
    grid = (batch * seqlen_new,)
    with device.on_device(k):
        compiled = kernel[grid](*args, num_warps=4)
    if key is not None and fastpath.aligned(total) and fastpath.leading(kernel, len(_LEAD)) == _LEAD:
        launcher = fastpath.bind(kernel, compiled, grid, args[len(_LEAD) :], k.device, False)
        if launcher is not None:
            plans.put(key, AppendPlan(launcher))
    return total
