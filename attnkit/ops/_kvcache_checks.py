"""Checks of ``attention_with_kvcache`` that must pass before the cache is written: memory aliasing of the
caches, and the pages a paged append touches.

On the host, a failed check raises :class:`InvalidArgumentError`. While a CUDA graph is captured nothing may be
read back, so the checks that need tensor values run on the device instead (:func:`device_check`): in stream
order before the writes that follow, a failure stops the GPU with a device-side assert.
"""

from __future__ import annotations

import torch

from ..errors import InvalidArgumentError
from . import _overlap


def device_check(ok: torch.Tensor, message: str) -> None:
    """A check whose inputs stay on the device (CUDA-graph capture): it runs in stream order before the writes
    that follow, and a failure stops the GPU with a device-side assert instead of raising here."""
    torch._assert_async(ok, f"attention_with_kvcache: {message}")


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
    seqlen_new: int,
    num_blocks: int,
    page_size: int,
    capturing: bool,
) -> None:
    """Every page a row uses is in ``[0, num_blocks)``; with an append, no page it writes is used elsewhere.

    A row uses its first ``ceil((cache_seqlens[b] + seqlen_new) / page_size)`` entries (later ones are not read).
    Without an append, rows may share pages (a common prompt prefix). With one, a page that row ``b`` writes must
    appear once in the used entries of the whole table: another row using it would see ``b``'s new keys. One
    device read-back decides everything on the host (none while capturing).
    """
    device = block_table.device
    blocks = torch.arange(block_table.shape[1], device=device)[None, :]
    start = cache_seqlens.long()[:, None]
    touched = blocks < (start + seqlen_new + page_size - 1) // page_size
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
    found = torch.stack(checks).tolist()
    if found[0]:
        b = int(bad_rows.nonzero()[0, 0])
        row = block_table[b, : int(touched[b].sum())].tolist()
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
