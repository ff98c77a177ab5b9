"""Which global sequence positions each rank holds: the ``contiguous`` and ``zigzag`` layouts.

A rank's local buffer (dim 1 of ``(B, S_local, H, D)``) is a list of *segments*, runs of consecutive global
positions. ``contiguous``: rank ``r`` of ``W`` holds chunk ``r`` of ``W``. ``zigzag``: the sequence is cut into
``2W`` chunks and rank ``r`` holds chunks ``r`` and ``2W - 1 - r``, so that under a causal mask every rank has the
same amount of work (an early chunk with little to attend to, paired with a late chunk with much).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..errors import InvalidArgumentError, InvalidArgumentTypeError

LAYOUTS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class Segment:
    """``length`` consecutive global positions from ``start``, stored from row ``offset`` of a local buffer."""

    start: int
    length: int
    offset: int

    @property
    def stop(self) -> int:
        return self.start + self.length


def check_layout(layout: object) -> str:
    if not isinstance(layout, str):
        raise InvalidArgumentTypeError(f"layout must be a str, got {type(layout).__name__}")
    if layout not in LAYOUTS:
        raise InvalidArgumentError(f"layout is {layout!r}; allowed: {', '.join(repr(x) for x in LAYOUTS)}")
    return layout


def chunks_per_rank(layout: str) -> int:
    return 2 if layout == "zigzag" else 1


def check_local_length(name: str, local_len: int, layout: str, world: int) -> None:
    """The local shard must split into the layout's equal chunks (two per rank for zigzag)."""
    per_rank = chunks_per_rank(layout)
    if local_len % per_rank:
        raise InvalidArgumentError(
            f"{name} has local sequence length {local_len}, which is odd; layout={layout!r} gives every rank "
            f"two chunks of equal length, so the local length must be even (the global length {local_len * world} "
            f"a multiple of 2 * world_size = {2 * world}). Shard with attnkit.distributed.shard, or use "
            "layout='contiguous'"
        )


def check_global_length(name: str, seqlen: int, layout: str, world: int) -> None:
    chunks = chunks_per_rank(layout) * world
    if seqlen % chunks:
        how = "2 * world_size" if layout == "zigzag" else "world_size"
        raise InvalidArgumentError(
            f"{name} has sequence length {seqlen}, which is not a multiple of {how} = {chunks}; layout={layout!r} "
            f"cuts the sequence into {chunks} chunks of equal length. Pad the sequence to a multiple of {chunks}"
        )


@functools.lru_cache(maxsize=1024)
def local_segments(layout: str, rank: int, world: int, local_len: int) -> tuple[Segment, ...]:
    """Segments of rank ``rank``'s buffer, in buffer order. Adjacent runs are fused (zigzag with one rank is one
    run), so a call never splits what could be one block."""
    if layout == "contiguous":
        pieces = [Segment(rank * local_len, local_len, 0)]
    else:
        c = local_len // 2
        pieces = [Segment(rank * c, c, 0), Segment((2 * world - 1 - rank) * c, c, c)]
    fused: list[Segment] = []
    for seg in pieces:
        if seg.length == 0:
            continue
        last = fused[-1] if fused else None
        if last is not None and last.stop == seg.start and last.offset + last.length == seg.offset:
            fused[-1] = Segment(last.start, last.length + seg.length, last.offset)
        else:
            fused.append(seg)
    return tuple(fused)


def to_global_order(gathered: torch.Tensor, layout: str) -> torch.Tensor:
    """``(W, B, L, ...)`` rank buffers (group-rank order) -> ``(B, W * L, ...)`` in global sequence order."""
    world, batch, local_len = gathered.shape[:3]
    full = gathered.new_empty((batch, world * local_len, *gathered.shape[3:]))
    for rank in range(world):
        for seg in local_segments(layout, rank, world, local_len):
            full[:, seg.start : seg.stop] = gathered[rank, :, seg.offset : seg.offset + seg.length]
    return full


def to_rank_order(full: torch.Tensor, layout: str, world: int) -> torch.Tensor:
    """Inverse of :func:`to_global_order`: ``(B, S, ...)`` -> ``(W, B, S / W, ...)``."""
    batch, seqlen = full.shape[:2]
    local_len = seqlen // world
    parts = full.new_empty((world, batch, local_len, *full.shape[2:]))
    for rank in range(world):
        for seg in local_segments(layout, rank, world, local_len):
            parts[rank, :, seg.offset : seg.offset + seg.length] = full[:, seg.start : seg.stop]
    return parts
