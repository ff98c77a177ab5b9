"""Checks of ``attention_with_kvcache`` that must pass before the cache is written: memory aliasing of the
caches, and the pages a paged append touches.

On the host, a failed check raises :class:`InvalidArgumentError`. While a CUDA graph is captured nothing may be
read back, so the checks that need tensor values run on the device instead (:func:`device_check`): in stream
order before the writes that follow, a failure stops the GPU with a device-side assert.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import InvalidArgumentError, InvalidArgumentTypeError, KVCacheOverflowError
from . import _overlap

INT32_MAX = 2**31 - 1


def device_check(ok: torch.Tensor, message: str) -> None:
    """A check whose inputs stay on the device (CUDA-graph capture): it runs in stream order before the writes
    that follow, and a failure stops the GPU with a device-side assert instead of raising here."""
    torch._assert_async(ok, f"attention_with_kvcache: {message}")


def int32_vector(name: str, x: object, length: int, device: torch.device) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InvalidArgumentTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.int32 or tuple(x.shape) != (length,):
        raise InvalidArgumentError(f"{name} must be int32 of shape ({length},), got {x.dtype} {tuple(x.shape)}")
    if x.device != device:
        raise InvalidArgumentError(f"{name} is on {x.device} but q is on {device}")
    # Kernels index these as dense vectors: a strided view (t[::2]) would be read as if it were contiguous.
    return x.contiguous()


@dataclass(frozen=True)
class Lengths:
    """Checked lengths: ``seqlens`` (B,) int32 holds each row's tokens before the append (the append position),
    ``leftpad`` (B,) int32 or None where each row's keys start, ``host`` the lengths as a list when known on the
    host (None while capturing a CUDA graph with tensor lengths), ``longest`` the most a row may hold."""

    seqlens: torch.Tensor
    leftpad: torch.Tensor | None
    host: list[int] | None
    longest: int


def lengths(
    cache_seqlens: object,
    cache_leftpad: object,
    batch: int,
    capacity: int,
    seqlen_new: int,
    device: torch.device,
    capturing: bool,
    range_check: Callable[[torch.Tensor, int, int], bool] | None = None,
) -> Lengths:
    """``cache_seqlens`` (tensor, int, or None for a full cache) and ``cache_leftpad``, checked against the capacity:
    ``0 <= cache_leftpad[b] <= cache_seqlens[b] <= capacity - seqlen_new``.

    An int or default length is checked on the host without reading the device. Tensors are read back once,
    together (a device sync: the host waits for the work queued before), or, while a CUDA graph is captured,
    checked on the device: by ``range_check(lengths, low, high)`` where given and it returns True (a backend's
    one-launch check, ``Backend.check_lengths``; not while torch.compile traces the call), else by torch ops.
    """
    _check_capacity(capacity)
    known = None  # lengths known on the host: made a tensor once they have passed the checks
    if cache_seqlens is None:
        if seqlen_new or cache_leftpad is not None:
            what = "appending k/v (where would they go?)" if seqlen_new else "cache_leftpad (where do rows end?)"
            raise InvalidArgumentError(f"cache_seqlens is required with {what}")
        known = capacity
    elif isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        known = cache_seqlens
    else:
        cache_seqlens = int32_vector("cache_seqlens", cache_seqlens, batch, device)
    leftpad = None if cache_leftpad is None else int32_vector("cache_leftpad", cache_leftpad, batch, device)
    host = None if known is None else [known] * batch
    pads = None
    if not capturing:
        reads = [t for t in (None if known is not None else cache_seqlens, leftpad) if t is not None]
        if reads:
            values = [reads[0].tolist()] if len(reads) == 1 else torch.stack(reads).tolist()  # one read-back
            if known is None:
                host = values[0]
            if leftpad is not None:
                pads = values[-1]
    if host is None:
        longest = capacity - seqlen_new
        range_on_device(cache_seqlens, longest, seqlen_new, capacity, range_check)
    else:
        longest = _check_host_lengths(host, capacity, seqlen_new)
    if known is not None:
        cache_seqlens = torch.full((batch,), known, dtype=torch.int32, device=device)
    if leftpad is not None:
        if pads is None:
            device_check(((leftpad >= 0) & (leftpad <= cache_seqlens)).all(),
                         "cache_leftpad has an entry outside [0, cache_seqlens]")  # fmt: skip
        else:
            bad = [b for b, (p, n) in enumerate(zip(pads, host)) if not 0 <= p <= n]
            if bad:
                b = bad[0]
                raise InvalidArgumentError(
                    f"cache_leftpad[{b}] is {pads[b]} but cache_seqlens[{b}] is {host[b]}; allowed: 0 <= "
                    "cache_leftpad <= cache_seqlens (a row's keys run from cache_leftpad to cache_seqlens + the new "
                    "tokens)"
                )
    return Lengths(cache_seqlens, leftpad, host, longest)


def _check_capacity(capacity: int) -> None:
    if capacity > INT32_MAX:
        raise InvalidArgumentError(
            f"the cache has room for {capacity} tokens per row; at most {INT32_MAX} are allowed (int32 lengths)"
        )


def range_on_device(cache_seqlens: torch.Tensor, high: int, seqlen_new: int, capacity: int,
                    range_check: Callable[[torch.Tensor, int, int], bool] | None) -> None:  # fmt: skip
    """``0 <= cache_seqlens <= high`` checked in stream order on the device: by ``range_check`` where given and it
    returns True (not while torch.compile traces), else by torch ops and ``torch._assert_async``."""
    by_backend = range_check is not None and not torch.compiler.is_compiling()
    if not (by_backend and range_check(cache_seqlens, 0, high)):
        device_check(
            ((cache_seqlens >= 0) & (cache_seqlens <= high)).all(),
            f"cache_seqlens has negative entries or a row without room for {seqlen_new} more tokens (capacity "
            f"{capacity})",
        )


def _check_host_lengths(host: list[int], capacity: int, seqlen_new: int) -> int:
    """Lengths known on the host against the capacity; returns the longest."""
    # min/max run in C: a decode batch of hundreds of rows costs no Python loop per call.
    longest = max(host) if host else 0  # no default=: Dynamo cannot trace it
    if host and min(host) < 0:
        raise InvalidArgumentError(f"cache_seqlens={_short(host)} has negative entries")
    if longest + seqlen_new > capacity:
        b = host.index(longest)
        if not seqlen_new:
            raise KVCacheOverflowError(
                f"cache_seqlens says cache row {b} holds {host[b]} tokens but the cache has room for {capacity}"
            )
        raise KVCacheOverflowError(
            f"cache row {b} holds {host[b]} tokens; appending {seqlen_new} would need "
            f"{host[b] + seqlen_new} slots but the cache has room for {capacity}"
        )
    return longest


def int_length(value: int, batch: int, capacity: int, seqlen_new: int) -> None:
    """An int ``cache_seqlens`` (every row's length) checked as :func:`lengths` checks it, without making it a
    device tensor: for a backend that takes the length as a number (Backend.kvcache_runner)."""
    _check_capacity(capacity)
    if batch and (value < 0 or value + seqlen_new > capacity):
        _check_host_lengths([value] * batch, capacity, seqlen_new)


def _short(values: list[int], limit: int = 16) -> str:
    return str(values) if len(values) <= limit else f"[{', '.join(map(str, values[:limit]))}, ...]"


def caches_writable(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """An append writes each new key once: no cache element may alias another, nor k_cache alias v_cache.

    Only appends are checked: a read-only call over a stride-0 cache (one prompt shared by every batch row) or with
    ``k_cache is v_cache`` is well defined.
    """
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if _overlap.has_internal_overlap(cache):
            raise InvalidArgumentError(
                f"{name} (shape {tuple(cache.shape)}, strides {cache.stride()}) has elements that share memory, "
                "e.g. a stride-0 expand over the batch; appending k/v would write several cache rows at once. "
                "Pass a cache with memory of its own (.clone())"
            )
    if _overlap.may_overlap(k_cache, v_cache):
        raise InvalidArgumentError(
            "k_cache and v_cache share memory (the same tensor passed twice?); appending would write keys over "
            "values. Pass two separate caches"
        )


def pages(
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    cache_leftpad: torch.Tensor | None,
    seqlen_new: int,
    num_blocks: int,
    page_size: int,
    capturing: bool,
) -> None:
    """Every page a row uses is in ``[0, num_blocks)``; with an append, no page it writes is used elsewhere.

    A row uses the entries ``cache_leftpad[b] // page_size`` (0 without left padding) up to
    ``ceil((cache_seqlens[b] + seqlen_new) / page_size)``; the others are not read.
    Without an append, rows may share pages (a common prompt prefix). With one, a page that row ``b`` writes must
    appear once in the used entries of the whole table: another row using it would see ``b``'s new keys. One
    device read-back decides everything on the host (none while capturing).
    """
    device = block_table.device
    blocks = torch.arange(block_table.shape[1], device=device)[None, :]
    start = cache_seqlens.long()[:, None]
    touched = blocks < (start + seqlen_new + page_size - 1) // page_size
    if cache_leftpad is not None:
        touched &= blocks >= cache_leftpad.long()[:, None] // page_size
    in_range = (block_table >= 0) & (block_table < num_blocks)
    bad_rows = (touched & ~in_range).any(dim=1)
    checks = [bad_rows.any()]
    if seqlen_new:
        used = torch.where(touched & in_range, block_table.long(), num_blocks)  # num_blocks: "no page"
        # 1-D scatter_add_ is deterministic on CUDA (torch.use_deterministic_algorithms allows it) and capturable.
        uses = torch.zeros(num_blocks + 1, dtype=torch.int32, device=device)
        uses.scatter_add_(0, used.flatten(), torch.ones(used.numel(), dtype=torch.int32, device=device))
        written = touched & (blocks >= start // page_size)
        shared = written & (uses[used] > 1) & (used < num_blocks)
        checks.append(shared.any())
    if capturing:
        device_check(~checks[0], f"block_table uses pages outside [0, {num_blocks})")
        if seqlen_new:
            device_check(~checks[1], "block_table rows share a page that the append writes")
        return
    found = [bool(checks[0])] if len(checks) == 1 else torch.stack(checks).tolist()  # one read-back
    if found[0]:
        b = int(bad_rows.nonzero()[0, 0])
        row = block_table[b][touched[b]].tolist()
        raise InvalidArgumentError(f"block_table[{b}] uses pages {row} outside [0, {num_blocks})")
    if seqlen_new and found[1]:
        b, m = shared.nonzero()[0].tolist()
        page = int(used[b, m])
        others = [(r, c) for r, c in (used == page).nonzero().tolist() if (r, c) != (b, m)]
        r, c = others[0]
        where = f"row {b} lists it twice (entries {m} and {c})" if r == b else f"rows {b} and {r} both use it"
        raise InvalidArgumentError(
            f"block_table: the append writes page {page} (block_table[{b}, {m}]) but {where}; the other entry would "
            "see the new keys. Give each row its own copy of a page it appends to (copy-on-write)"
        )
