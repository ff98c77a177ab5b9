"""Whether tensors share memory, decided from their shapes, strides and offsets alone (no data is read).

An in-place write into a tensor whose elements alias one another (a stride-0 ``expand``), or into one that shares
memory with another operand (``k_cache is v_cache``), silently writes several places at once. These checks let an
operator refuse such inputs before writing. They run on the host in microseconds: tensors in different storages,
or whose address ranges do not meet, are answered at once; otherwise a small exact search over the index space
decides (an interleaved ``kv[:, :, 0]`` / ``kv[:, :, 1]`` pair is proved disjoint this way).
"""

from __future__ import annotations

import torch

# Search nodes before giving up; the layouts met in practice need a handful.
_BUDGET = 10_000


class _TooHard(Exception):
    pass


def _solvable(terms: list[tuple[int, int, int]], target: int) -> bool:
    """Is there an integer x_i in [lo_i, hi_i] for every term (w_i, lo_i, hi_i) with sum(w_i * x_i) == target?

    Depth-first over the terms by decreasing |w|; at each level only the x whose remainder the smaller terms can
    still reach are tried, which for nested strides leaves one or two candidates per level.
    """
    if any(lo > hi for _, lo, hi in terms):
        return False
    const = sum(w * lo for w, lo, hi in terms if lo == hi)
    terms = sorted((t for t in terms if t[0] != 0 and t[1] != t[2]), key=lambda t: -abs(t[0]))
    # reach[i]: the (min, max) of sum(w_j * x_j) over the terms j >= i
    reach = [(0, 0)] * (len(terms) + 1)
    for i in range(len(terms) - 1, -1, -1):
        w, lo, hi = terms[i]
        a, b = w * lo, w * hi
        reach[i] = (reach[i + 1][0] + min(a, b), reach[i + 1][1] + max(a, b))
    budget = [_BUDGET]

    def search(i: int, rest: int) -> bool:
        if i == len(terms):
            return rest == 0
        w, lo, hi = terms[i]
        low, high = rest - reach[i + 1][1], rest - reach[i + 1][0]  # w * x must land in [low, high]
        if w > 0:
            x_lo, x_hi = -(-low // w), high // w
        else:
            x_lo, x_hi = -(-high // w), low // w
        for x in range(max(lo, x_lo), min(hi, x_hi) + 1):
            budget[0] -= 1
            if budget[0] < 0:
                raise _TooHard
            if search(i + 1, rest - w * x):
                return True
        return False

    return search(0, target - const)


def _box(x: torch.Tensor) -> list[tuple[int, int]]:
    """(stride, size) of the dimensions that move: size > 1."""
    return [(st, n) for st, n in zip(x.stride(), x.shape) if n > 1]


def has_internal_overlap(x: torch.Tensor) -> bool:
    """True when two different indices of ``x`` address the same element (or when that cannot be ruled out)."""
    if x.numel() <= 1 or x.device.type == "meta":
        return False
    quick = torch._debug_has_internal_overlap(x)  # 0: no (dense), 1: yes (a zero stride), 2: too hard for torch
    if quick != 2:
        return bool(quick)
    dims = sorted(_box(x))
    reach = 0
    for stride, size in dims:  # each stride beyond everything the smaller ones reach: one address per index
        if stride <= reach:
            break
        reach += stride * (size - 1)
    else:
        return False
    # Exact: a nonzero index difference d with sum(d_i * stride_i) == 0. Up to sign, its first nonzero entry (in
    # the order below) is positive.
    dims = sorted(dims, reverse=True)
    try:
        for first, (stride, size) in enumerate(dims):
            terms = [(stride, 1, size - 1)] + [(st, 1 - n, n - 1) for st, n in dims[first + 1 :]]
            if _solvable(terms, 0):
                return True
    except _TooHard:
        return True
    return False


def may_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when some element of ``a`` and some element of ``b`` share memory (or when that cannot be ruled out)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device or a.device.type == "meta":
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    size_a, size_b = a.element_size(), b.element_size()
    start_a, start_b = a.data_ptr(), b.data_ptr()
    end_a = start_a + size_a * (1 + sum(st * (n - 1) for st, n in zip(a.stride(), a.shape)))
    end_b = start_b + size_b * (1 + sum(st * (n - 1) for st, n in zip(b.stride(), b.shape)))
    if end_a <= start_b or end_b <= start_a:
        return False
    if a.dtype != b.dtype or (start_b - start_a) % size_a:
        return True  # mixed element grids: not worth an exact answer for the operators that ask
    terms = [(st, 0, n - 1) for st, n in _box(a)] + [(-st, 0, n - 1) for st, n in _box(b)]
    try:
        return _solvable(terms, (start_b - start_a) // size_a)
    except _TooHard:
        return True
