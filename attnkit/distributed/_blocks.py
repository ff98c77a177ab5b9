"""Planning: which block-operator calls compute a rank's share of the global attention, with what masks.

A block is a rectangle of the global score matrix: some consecutive query positions against some consecutive key
positions. The global mask is the usual band (``attnkit.params``) on global positions: with ``d = qpos - kpos``
(one sequence, ``Sq == Sk``), key ``kpos`` is visible to ``qpos`` iff ``d <= left`` (if ``left >= 0``) and
``d >= -right`` (if ``right >= 0``). The block operator aligns its masks (and ALiBi distances) to the block's own
bottom-right corner instead: with local row ``i``, column ``j`` and block lengths ``Lq``, ``Lk`` it uses
``d_local = i + Lk - Lq - j``, which equals ``d - shift`` where ``shift`` is the global ``d`` of the bottom-right
corner. So the global band becomes the local window ``(left - shift, right + shift)``.

Those local bounds must be expressible (``>= 0``; ``-1`` means unbounded). We cut every block down to the bounding
box of its visible pairs: for a band, the bottom-right corner of that box is always visible (if the last row's
keys all lay left of the band's right edge, the last column could not be visible either, and vice versa), so its
``d`` lies inside the band and both local bounds are ``>= 0``. A block with no visible pair is skipped; a bound
that cannot cut anything inside the box becomes ``-1``, so fully visible blocks run without a mask.

ALiBi adds ``-slope * |d_local|``; it equals the global ``-slope * |d|`` only when ``shift == 0``, so ALiBi is
accepted only for plans whose every block ends on the global diagonal (checked by the callers).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, replace

from ._layout import Segment, local_segments


@dataclass(frozen=True)
class Block:
    """Local query rows ``[q_start, q_start + q_len)`` against rows ``[k_start, k_start + k_len)`` of a key buffer.

    ``window_left``/``window_right`` are relative to this block's bottom-right corner (``-1`` = unbounded;
    ``window_right == 0`` is a causal call). ``shift`` is the global ``qpos - kpos`` of that corner, or None for a
    block fused from fully visible pieces that are not adjacent globally (only made when there is no ALiBi).
    """

    q_start: int
    q_len: int
    k_start: int
    k_len: int
    window_left: int = -1
    window_right: int = -1
    shift: int | None = 0

    @property
    def full(self) -> bool:
        return self.window_left < 0 and self.window_right < 0

    @property
    def q_slice(self) -> slice:
        return slice(self.q_start, self.q_start + self.q_len)

    @property
    def k_slice(self) -> slice:
        return slice(self.k_start, self.k_start + self.k_len)

    @property
    def shape_key(self) -> tuple[int, int, int, int]:
        """What dispatch sees of this block (lengths and masks)."""
        return (self.q_len, self.k_len, self.window_left, self.window_right)


def visible_box(q: Segment, k: Segment, left: int, right: int) -> tuple[int, int, int, int] | None:
    """Inclusive global ``(row_lo, row_hi, col_lo, col_hi)`` of the visible pairs of ``q x k``, or None if none."""
    q_lo, q_hi, k_lo, k_hi = q.start, q.stop - 1, k.start, k.stop - 1
    if q.length == 0 or k.length == 0:
        return None
    # Row qpos sees keys [qpos - left, qpos + right] (each bound only when set).
    row_lo = q_lo if right < 0 else max(q_lo, k_lo - right)
    row_hi = q_hi if left < 0 else min(q_hi, k_hi + left)
    col_lo = k_lo if left < 0 else max(k_lo, q_lo - left)
    col_hi = k_hi if right < 0 else min(k_hi, q_hi + right)
    if row_lo > row_hi or col_lo > col_hi:
        return None
    return row_lo, row_hi, col_lo, col_hi


def local_window(left: int, right: int, shift: int, q_len: int, k_len: int) -> tuple[int, int]:
    """The global band as windows of a ``q_len x k_len`` call whose bottom-right corner has global ``d = shift``.

    Only valid when that corner is visible (then both bounds are >= 0). A bound that no pair of the call reaches
    (``d_local`` spans ``1 - q_len .. k_len - 1``) becomes -1."""
    wl = -1 if left < 0 else left - shift
    wr = -1 if right < 0 else right + shift
    if wl >= k_len - 1:
        wl = -1
    if wr >= q_len - 1:
        wr = -1
    return wl, wr


def block(q: Segment, k: Segment, left: int, right: int) -> Block | None:
    """The call computing the visible part of ``q x k`` (segments of the q buffer and of a key buffer)."""
    box = visible_box(q, k, left, right)
    if box is None:
        return None
    row_lo, row_hi, col_lo, col_hi = box
    q_len, k_len = row_hi - row_lo + 1, col_hi - col_lo + 1
    shift = row_hi - col_hi
    wl, wr = local_window(left, right, shift, q_len, k_len)
    return Block(
        q_start=q.offset + row_lo - q.start,
        q_len=q_len,
        k_start=k.offset + col_lo - k.start,
        k_len=k_len,
        window_left=wl,
        window_right=wr,
        shift=shift,
    )


def _fuse_along(blocks: list[Block], along: str) -> list[Block]:
    """Fuse fully visible blocks that share their range on one axis and abut on the other (``along``)."""
    same = (lambda b: (b.q_start, b.q_len)) if along == "k" else (lambda b: (b.k_start, b.k_len))
    start = (lambda b: b.k_start) if along == "k" else (lambda b: b.q_start)
    length = (lambda b: b.k_len) if along == "k" else (lambda b: b.q_len)
    groups: dict[tuple[int, int], list[Block]] = {}
    for b in blocks:
        groups.setdefault(same(b), []).append(b)
    fused: list[Block] = []
    for group in groups.values():
        group.sort(key=start)
        current = group[0]
        for b in group[1:]:
            if start(current) + length(current) == start(b):
                grown = {"k_len": current.k_len + b.k_len} if along == "k" else {"q_len": current.q_len + b.q_len}
                current = replace(current, shift=None, **grown)
            else:
                fused.append(current)
                current = b
        fused.append(current)
    return fused


def fuse_full(blocks: Iterable[Block]) -> tuple[Block, ...]:
    """Fewer, larger calls: masked blocks stay as they are; fully visible ones that tile a rectangle of the
    buffers become one call (zigzag: both local query chunks against one received chunk, or one query chunk
    against both received chunks)."""
    blocks = list(blocks)
    masked = [b for b in blocks if not b.full]
    full = _fuse_along(_fuse_along([b for b in blocks if b.full], "k"), "q")
    return tuple(masked) + tuple(sorted(full, key=lambda b: (b.q_start, b.k_start)))


@functools.lru_cache(maxsize=256)
def ring_plan(
    layout: str, world: int, local_len: int, left: int, right: int
) -> tuple[tuple[tuple[Block, ...], ...], ...]:
    """``plan[rank][step]``: the blocks rank ``rank`` computes at ring step ``step``, when it holds the keys of rank
    ``(rank - step) % world`` (unfused: one block per pair of segments)."""
    plan = []
    for rank in range(world):
        q_segs = local_segments(layout, rank, world, local_len)
        steps = []
        for step in range(world):
            k_segs = local_segments(layout, (rank - step) % world, world, local_len)
            found = (block(qs, ks, left, right) for qs in q_segs for ks in k_segs)
            steps.append(tuple(b for b in found if b is not None))
        plan.append(tuple(steps))
    return tuple(plan)


@functools.lru_cache(maxsize=256)
def fused_ring_plan(
    layout: str, world: int, local_len: int, left: int, right: int
) -> tuple[tuple[tuple[Block, ...], ...], ...]:
    return tuple(tuple(fuse_full(step) for step in steps) for steps in ring_plan(layout, world, local_len, left, right))


@functools.lru_cache(maxsize=256)
def gathered_plan(layout: str, world: int, local_len: int, left: int, right: int) -> tuple[tuple[Block, ...], ...]:
    """``plan[rank]``: blocks of rank ``rank``'s queries against the whole sequence's keys in global order (the
    all-gather strategy): at most one per local segment, since every query sees its own position."""
    everything = Segment(0, world * local_len, 0)
    plan = []
    for rank in range(world):
        found = (block(qs, everything, left, right) for qs in local_segments(layout, rank, world, local_len))
        plan.append(tuple(b for b in found if b is not None))
    return tuple(plan)


@dataclass(frozen=True)
class VarlenCall:
    """One ``attention_varlen`` call of the packed strategy: sequences ``seqs`` (indices into ``cu_seqlens``),
    queries from local row ``q_start`` and keys from row ``k_start`` of the gathered packed keys, offsets relative
    to those rows. One window pair serves every sequence of the call."""

    q_start: int
    k_start: int
    cu_q: tuple[int, ...]
    cu_k: tuple[int, ...]
    seqs: tuple[int, ...]
    window_left: int
    window_right: int
    shifts: tuple[int, ...]

    @property
    def q_len(self) -> int:
        return self.cu_q[-1]

    @property
    def k_len(self) -> int:
        return self.cu_k[-1]

    @property
    def q_slice(self) -> slice:
        return slice(self.q_start, self.q_start + self.q_len)

    @property
    def k_slice(self) -> slice:
        return slice(self.k_start, self.k_start + self.k_len)

    @property
    def max_q(self) -> int:
        return max(b - a for a, b in itertools.pairwise(self.cu_q))

    @property
    def max_k(self) -> int:
        return max(b - a for a, b in itertools.pairwise(self.cu_k))

    @property
    def shape_key(self) -> tuple[int, int, int, int, int]:
        return (len(self.seqs), self.max_q, self.max_k, self.window_left, self.window_right)


def _varlen_pieces(rank: int, local_len: int, cu: tuple[int, ...], left: int, right: int) -> list[tuple]:
    """Per sequence meeting rank ``rank``'s rows: ``(seq, q_lo, q_hi, k_lo, k_hi, windows, shift)``, global rows,
    with the windows not yet reduced to -1 where they cut nothing (that is decided per call).

    Queries: the sequence's positions among the rank's rows (all of them see a key: their own position). Keys:
    from the sequence's start, so that the key ranges of consecutive sequences tile the packed buffer, to the last
    visible key. The call's bottom-right corner is the visible box's, and the keys left of the box are masked by
    the same windows."""
    pieces = []
    rank_lo, rank_hi = rank * local_len, (rank + 1) * local_len
    for seq, (st, en) in enumerate(itertools.pairwise(cu)):
        a, e = max(st, rank_lo), min(en, rank_hi)
        if a >= e:
            continue
        box = visible_box(Segment(a, e - a, 0), Segment(st, en - st, 0), left, right)
        _, row_hi, _, col_hi = box  # type: ignore[misc]  # never None: each query sees its own position
        shift = row_hi - col_hi
        raw = (-1 if left < 0 else left - shift, -1 if right < 0 else right + shift)
        pieces.append((seq, a, e, st, col_hi + 1, raw, shift))
    return pieces


def _varlen_call(rank_lo: int, group: list[tuple]) -> VarlenCall:
    q0, k0 = group[0][1], group[0][3]
    wl, wr = group[0][5]
    # A bound that cuts no pair of any sequence of the call is dropped (see local_window).
    if wl >= 0 and all(wl >= p[4] - p[3] - 1 for p in group):
        wl = -1
    if wr >= 0 and all(wr >= p[2] - p[1] - 1 for p in group):
        wr = -1
    return VarlenCall(
        q_start=q0 - rank_lo,
        k_start=k0,
        cu_q=(0, *(p[2] - q0 for p in group)),
        cu_k=(0, *(p[4] - k0 for p in group)),
        seqs=tuple(p[0] for p in group),
        window_left=wl,
        window_right=wr,
        shifts=tuple(p[6] for p in group),
    )


@functools.lru_cache(maxsize=64)
def varlen_plan(
    world: int, local_len: int, cu: tuple[int, ...], left: int, right: int
) -> tuple[tuple[VarlenCall, ...], ...]:
    """``plan[rank]``: the varlen calls of rank ``rank`` (packed tokens split contiguously, keys all-gathered).
    Consecutive sequences share a call while their windows agree and their key ranges abut (only the sequence
    running past the rank's last row can end its keys early)."""
    plan = []
    for rank in range(world):
        groups: list[list[tuple]] = []
        for piece in _varlen_pieces(rank, local_len, cu, left, right):
            last = groups[-1][-1] if groups else None
            if last is not None and last[5] == piece[5] and last[4] == piece[3] and last[2] == piece[1]:
                groups[-1].append(piece)
            else:
                groups.append([piece])
        plan.append(tuple(_varlen_call(rank * local_len, g) for g in groups))
    return tuple(plan)
