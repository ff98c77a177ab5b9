"""Tile choice of the Triton kernels: forced (tests, sweeps), fixed (interpreter, ATTNKIT_TRITON_AUTOTUNE=0) or
autotuned once per key and remembered."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
import triton

from attnkit import env
from attnkit.errors import BackendCompileError

from . import configs, device


class Shape(Protocol):
    """What tile choice reads of a problem (launch.Problem)."""

    seqlen_q: int
    seqlen_k: int
    block_d: int
    block_dv: int


# Tuned tile per (kernel, vendor, dtype, TMA, sequence-length bucket, kernel flags incl. head dims).
tuned: dict[tuple, configs.Tile] = {}
# Tiles forced by forced_tiles(): kind -> Tile. Consulted before everything else, the interpreter included.
_forced: dict[str, configs.Tile] = {}


def any_forced() -> bool:
    return bool(_forced)


@contextlib.contextmanager
def forced_tiles(**tiles: configs.Tile) -> Iterator[None]:
    """Run the kernels named by keyword (``fwd``, ``dkdv``, ``dq``) with the given tiles inside the block, for
    tests, sweeps and fuzzing. The launch plans (fastpath) are bypassed meanwhile, so every call goes through
    triton's JIT and compiles the forced tile; the tiles chosen outside the block (autotuned or remembered) are
    left as they were.
    """
    unknown = sorted(set(tiles) - set(configs.KINDS))
    if unknown:
        raise ValueError(f"forced_tiles: unknown kernel kind(s) {unknown}; expected some of {configs.KINDS}")
    saved = dict(_forced)
    _forced.update(tiles)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(saved)


def tile_for(
    kind: str,
    vendor: str,
    prob: Shape,
    dtype: torch.dtype,
    tma: bool,
    flags: dict[str, object],
    launch_with: Callable[[configs.Tile], object],
) -> configs.Tile:
    """The tile for one kernel launch: fixed under the interpreter or with ATTNKIT_TRITON_AUTOTUNE=0, otherwise
    the fastest candidate, timed once per key and remembered.

    triton.autotune is not used: its per-call key building scans ~70 arguments in Python, which cost more than
    the kernel itself on short sequences (benchmarks/NOTES-triton.md).
    """
    autotune = env.triton_autotune()  # read first: a malformed value raises under the interpreter too
    forced = _forced.get(kind)
    if forced is not None:
        if forced.use_tma and not tma:
            raise ValueError(f"forced_tiles: {kind} tile {forced} streams through TMA, which this call cannot use")
        return forced
    if device.interpreted():
        return configs.INTERPRETER_TILES[kind]
    block_d = max(prob.block_d, prob.block_dv)
    elem_bytes = dtype.itemsize
    if not autotune:
        return configs.default(kind, vendor, block_d, elem_bytes, tma)
    key = (kind, vendor, str(dtype), tma, configs.seq_bucket(max(prob.seqlen_q, prob.seqlen_k)), *flags.values())
    tile = tuned.get(key)
    if tile is None:
        tile = autotune_tiles(configs.candidates(kind, vendor, block_d, elem_bytes, tma), launch_with)
        tuned[key] = tile
    return tile


# Candidates within this fraction of the fastest first-round time are timed again, interleaved, before choosing.
RETIME_WITHIN = 0.08


def autotune_tiles(tiles: list[configs.Tile], launch_with: Callable[[configs.Tile], object]) -> configs.Tile:
    """Fastest tile: one timing per candidate, then the close ones again in alternation.

    One 20 ms round per tile picked tiles up to 8% off the best in a benchmark run (d=64 non-causal 4k: 395 vs
    426 TFLOP/s for the sweep's best, benchmarks/NOTES-triton.md); the second round keeps one slow sample (clock
    ramp, a neighbour's launch) from deciding.
    """
    from triton.runtime import errors

    skip = tuple(getattr(errors, name) for name in ("OutOfResources", "PTXASError") if hasattr(errors, name))

    def timed(i: int, rep: int) -> float:
        return triton.testing.do_bench(lambda: launch_with(tiles[i]), warmup=5, rep=rep, return_mode="median")

    timings: list[tuple[float, int]] = []
    failures: list[str] = []
    for i, tile in enumerate(tiles):
        try:
            timings.append((timed(i, 20), i))
        except skip as exc:  # a tile this GPU or compiler cannot build is just not a candidate
            failures.append(f"{tile}: {type(exc).__name__}: {exc}")
    if not timings:
        raise BackendCompileError("no Triton tile compiled for this call:\n" + "\n".join(failures))
    best = min(timings)[0]
    close = [i for ms, i in sorted(timings) if ms <= best * (1 + RETIME_WITHIN)]
    if len(close) == 1:
        return tiles[close[0]]
    samples: dict[int, list[float]] = {i: [] for i in close}
    for _ in range(2):
        for i in close:
            samples[i].append(timed(i, 20))
    return tiles[min(close, key=lambda i: min(samples[i]))]
