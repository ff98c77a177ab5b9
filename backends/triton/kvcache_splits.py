"""How many programs share one row's keys in the split-KV decoding kernel (FA3's ``num_splits_heuristic``).

Without splitting, the kernel runs ``work = batch x kv heads x query-row blocks`` programs (all query heads of a
GQA group are packed into one program's rows). A decode step has little work, so splitting the key range
multiplies the programs; each split adds a partial result that the combine kernel has to read back. The rule,
as in FlashAttention-3: no split when the work alone nearly fills the GPU (>= 80% of the programs it runs at
once) or when the cache is short; otherwise the smallest split count whose last wave is at least 85% as full as
the best count's (a wave efficiency of ``n / ceil(n)`` with ``n = work x splits / slots`` waves), so that no
split count is paid for in combine work without filling the machine better.
"""

from __future__ import annotations

import functools
import math

# FA3 does not split caches of <= 4 key blocks of its 128-key tiles: the combine would cost more than it saves.
MIN_SPLIT_KEYS = 4 * 128
MAX_SPLITS = 128


@functools.lru_cache(maxsize=4096)
def split_count(work: int, key_blocks: int, block_n: int, slots: int, max_splits: int = MAX_SPLITS) -> int:
    """Splits for ``work`` programs over ``key_blocks`` blocks of ``block_n`` keys on a GPU that runs ``slots``
    programs at once (multiprocessors x programs resident on each)."""
    if work <= 0 or slots <= 0 or work >= 0.8 * slots or key_blocks * block_n <= MIN_SPLIT_KEYS:
        return 1
    limit = max(1, min(max_splits, slots, key_blocks))
    efficiency = []
    for splits in range(1, limit + 1):
        waves = work * splits / slots
        efficiency.append(waves / math.ceil(waves))
    best = max(efficiency)
    return next(s for s, e in enumerate(efficiency, start=1) if e >= 0.85 * best)
