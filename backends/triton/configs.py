"""Tile configurations: fixed defaults, small autotune spaces, one table per vendor.

Kernels: "fwd" (BLOCK_M query rows x BLOCK_N keys), "dkdv" (BLOCK_N keys owned, BLOCK_M query rows per step),
"dq" (BLOCK_M query rows owned, BLOCK_N keys per step). Spaces are keyed by the padded head dim and the element
size, because those decide register and shared-memory pressure; the autotuner key adds dtype, masking flags and
a sequence-length bucket.

The CUDA entries were picked from sm_90 compiles with triton 3.6 (benchmarks/NOTES-triton.md): the tiles listed
for 16-bit inputs compile without register spills, except the head-dim-128 dK/dV tile of 64 queries x 128 keys
(16-24 bytes of stack), which measured fastest anyway (benchmarks/results/h200_2026-11-30_bwd/); tiles that
spilled more, or crashed ptxas with TMA (head dim 256, several num_stages=2 tiles), are left out. Plain-tile
defaults are the H200 autotuning winners of benchmarks/results/triton_h200_run1.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

KINDS = ("fwd", "dkdv", "dq")

# Head-dim blocks: a power of two, and at least 64 wide when a mask cuts them (the dim is not a power of two).
# When a mask cuts a 16- or 32-wide value block (head dim_v 8 of 16, 20-28 of 32) and q/k have another head dim,
# triton 3.6's sm_90 dense forward gets the P V product wrong: an illegal address or a wrong output, while the
# interpreter is right. With 64-wide blocks every pair measured is right (benchmarks/NOTES-triton.md, "Narrow
# value head dims"). The kv-cache split and fp8 kernels have the same kind of product and take the same rule.
MIN_BLOCK = 16
MIN_MASKED_BLOCK = 64


def head_block(dim: int, minimum: int = MIN_BLOCK) -> int:
    """The padded block of a head dim ``dim`` (>= ``minimum``; >= MIN_MASKED_BLOCK when the block is cut)."""
    block = max(minimum, 1 << max(dim - 1, 0).bit_length())
    return block if block == dim else max(block, MIN_MASKED_BLOCK)


@dataclass(frozen=True)
class Tile:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    use_tma: bool = False  # tiles streamed through TMA tensor descriptors (Hopper)
    waves_per_eu: int | None = None  # ROCm occupancy hint (a compile option, not a kernel argument)
    persistent: int = 0  # forward only: >0 launches this many programs per SM, each walking several tiles
    warp_specialize: bool = False  # forward only: tl.range(..., warp_specialize=True) over the key blocks

    def meta(self) -> dict[str, int]:
        meta = {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "USE_TMA": self.use_tma}
        if self.persistent:
            meta["PERSISTENT"] = True
        if self.warp_specialize:
            meta["WARP_SPEC"] = True
        if self.waves_per_eu is not None:
            meta["waves_per_eu"] = self.waves_per_eu
        return meta

    def launch_kwargs(self) -> dict[str, int]:
        return {**self.meta(), "num_warps": self.num_warps, "num_stages": self.num_stages}


# Under the interpreter speed comes from few, large numpy ops; BLOCK_M != BLOCK_N on purpose so the tests
# exercise the block-range arithmetic with unequal tiles.
INTERPRETER_TILES = {
    "fwd": Tile(32, 16, 4, 1),
    "dkdv": Tile(16, 32, 4, 1),
    "dq": Tile(32, 16, 4, 1),
}
PREPROCESS_BLOCK_M = 64


def _d_class(block_d: int) -> str:
    return "small" if block_d <= 64 else ("mid" if block_d <= 128 else "large")


# (block_m, block_n, num_warps, num_stages, tma[, persistent programs per SM]), best first: candidates() drops the
# TMA entries for calls that cannot use TMA, and the first remaining entry is the fixed default
# (ATTNKIT_TRITON_AUTOTUNE=0). The forward lists keep the tiles that won or came within 2% somewhere in the H200
# sweep of benchmarks/results/triton_h200_run3.md (d<=64: 128x64 w8 leads non-causal, 64x64 causal; d=128: the
# persistent TMA tile leads non-causal 8k; 128x128 w8 s3 leads at 16k, causal and not, and non-causal 4k in
# benchmarks/results/triton_h200_sweep4.md); shapes neither sweep measured are ordered by the H200 autotuner's
# winners in benchmarks/results/triton_h200_run2.md. TMA entries are Hopper-only.
_T = True
_F = False
_CUDA: dict[tuple[str, str, int], list[tuple]] = {
    ("fwd", "small", 2): [
        (64, 64, 4, 3, _F),
        (128, 64, 8, 3, _F),
        (128, 64, 4, 3, _T),
        (128, 64, 4, 4, _T),
        (128, 64, 4, 3, _F),
    ],
    ("fwd", "mid", 2): [
        (64, 64, 4, 3, _T),
        (64, 64, 4, 3, _T, 2),
        (64, 64, 4, 3, _F),
        (128, 64, 8, 3, _F),
        (128, 128, 8, 3, _T),
        (128, 128, 8, 3, _F),
        (128, 128, 8, 2, _F),
    ],
    # 64x64 w8 s2 is absent on purpose: triton 3.6 miscompiles it at head dim 256 (MISCOMPILED_TILES).
    ("fwd", "large", 2): [(64, 64, 4, 2, _F), (64, 64, 8, 3, _F), (128, 64, 8, 2, _F), (64, 32, 4, 2, _F)],
    ("dkdv", "small", 2): [
        (64, 64, 4, 3, _F),
        (32, 64, 4, 3, _F),
        (64, 128, 8, 2, _F),
        (64, 64, 4, 3, _T),
        (64, 128, 8, 2, _T),
    ],
    ("dkdv", "mid", 2): [
        (64, 128, 8, 3, _T),
        (32, 64, 4, 3, _F),
        (64, 128, 8, 3, _F),
        (32, 128, 8, 3, _F),
        (32, 64, 4, 3, _T),
    ],
    ("dkdv", "large", 2): [(16, 32, 4, 2, _F), (32, 32, 4, 2, _F)],
    ("dq", "small", 2): [
        (64, 64, 4, 3, _F),
        (64, 64, 4, 3, _T),
        (128, 64, 8, 2, _F),
        (64, 32, 4, 3, _F),
        (128, 32, 4, 3, _T),
        (128, 64, 8, 3, _T),
    ],
    ("dq", "mid", 2): [(64, 32, 4, 3, _F), (128, 64, 8, 2, _F), (64, 64, 4, 3, _F), (64, 64, 4, 3, _T)],
    ("dq", "large", 2): [(64, 32, 8, 2, _F), (32, 32, 4, 2, _F)],
    # float32 (tf32x3: three tensor-core products per dot, so registers run out early; the smallest
    # spills win).
    ("fwd", "small", 4): [(64, 32, 4, 2, _F), (64, 64, 4, 2, _F)],
    ("fwd", "mid", 4): [(64, 32, 4, 2, _F), (32, 32, 4, 2, _F)],
    ("fwd", "large", 4): [(32, 16, 4, 2, _F), (32, 32, 4, 2, _F)],
    ("dkdv", "small", 4): [(32, 32, 4, 2, _F), (32, 64, 4, 2, _F)],
    ("dkdv", "mid", 4): [(16, 32, 4, 2, _F), (32, 32, 4, 2, _F)],
    ("dkdv", "large", 4): [(16, 16, 4, 1, _F)],
    ("dq", "small", 4): [(64, 32, 4, 2, _F), (32, 32, 4, 2, _F)],
    ("dq", "mid", 4): [(16, 32, 4, 2, _F), (32, 32, 4, 2, _F)],
    ("dq", "large", 4): [(16, 16, 4, 1, _F)],
}

# ROCm (CDNA): wavefronts of 64, no TMA, one pipelining stage is usually best; waves_per_eu trades
# registers for occupancy. (block_m, block_n, num_warps, num_stages, waves_per_eu)
_ROCM: dict[tuple[str, str, int], list[tuple[int, int, int, int, int]]] = {
    ("fwd", "small", 2): [(128, 64, 4, 1, 2), (128, 128, 4, 1, 2), (64, 64, 4, 1, 3)],
    ("fwd", "mid", 2): [(128, 64, 4, 1, 2), (128, 32, 4, 1, 2), (64, 64, 4, 1, 2)],
    ("fwd", "large", 2): [(64, 64, 4, 1, 1), (64, 32, 4, 1, 2), (32, 32, 4, 1, 2)],
    ("dkdv", "small", 2): [(32, 128, 4, 1, 1), (64, 64, 4, 1, 2), (32, 64, 4, 1, 2)],
    ("dkdv", "mid", 2): [(32, 128, 4, 1, 1), (32, 64, 4, 1, 2), (16, 64, 4, 1, 2)],
    ("dkdv", "large", 2): [(16, 64, 4, 1, 1), (32, 32, 4, 1, 1), (16, 32, 4, 1, 2)],
    ("dq", "small", 2): [(128, 32, 4, 1, 1), (64, 64, 4, 1, 2), (64, 32, 4, 1, 2)],
    ("dq", "mid", 2): [(128, 32, 4, 1, 1), (64, 32, 4, 1, 2), (64, 64, 4, 1, 2)],
    ("dq", "large", 2): [(64, 16, 4, 1, 1), (32, 32, 4, 1, 1), (32, 16, 4, 1, 2)],
    ("fwd", "small", 4): [(64, 32, 4, 1, 2), (32, 32, 4, 1, 2)],
    ("fwd", "mid", 4): [(64, 32, 4, 1, 2), (32, 32, 4, 1, 2)],
    ("fwd", "large", 4): [(32, 32, 4, 1, 1), (32, 16, 4, 1, 2)],
    ("dkdv", "small", 4): [(32, 32, 4, 1, 1), (16, 64, 4, 1, 1)],
    ("dkdv", "mid", 4): [(16, 32, 4, 1, 1), (32, 32, 4, 1, 1)],
    ("dkdv", "large", 4): [(16, 16, 4, 1, 1), (16, 32, 4, 1, 1)],
    ("dq", "small", 4): [(32, 32, 4, 1, 1), (64, 16, 4, 1, 1)],
    ("dq", "mid", 4): [(32, 16, 4, 1, 1), (32, 32, 4, 1, 1)],
    ("dq", "large", 4): [(16, 16, 4, 1, 1), (32, 16, 4, 1, 1)],
}


# Tiles that compile but compute wrong answers on the GPU, never offered (the interpreter gets them right, so only
# the GPU suite sees this): (kind, vendor, block_d, elem_bytes) -> tiles. The forward's 64x64 w8 s2 tile at head
# dim 256 with triton 3.6 on an H200: every query block wrong (relative error 1-8) when the mask has a right bound
# but no left one (causal, window (-1, r)) and triton cannot assume the sequence lengths divisible by 16; the same
# kernel with 4 warps, 1 or 3 stages, and each other tile tried is right (benchmarks/NOTES-triton.md, "Head dim
# 256"). candidates() never lists them; tests/triton/test_triton_configs.py holds the tables to that.
MISCOMPILED_TILES: dict[tuple[str, str, int, int], tuple[Tile, ...]] = {
    ("fwd", "nvidia", 256, 2): (Tile(64, 64, 8, 2),),
}


def miscompiled(kind: str, vendor: str, block_d: int, elem_bytes: int, tile: Tile) -> bool:
    """Whether ``tile`` is known to give wrong answers for this kernel, vendor, padded head dim and element size."""
    bad = MISCOMPILED_TILES.get((kind, vendor, block_d, elem_bytes), ())
    return any(dataclasses.replace(tile, use_tma=False, persistent=0) == b for b in bad)


def candidates(kind: str, vendor: str, block_d: int, elem_bytes: int, tma: bool = False) -> list[Tile]:
    """The autotune space, default first. ``tma``: the call may use TMA descriptors (Hopper, aligned inputs)."""
    key = (kind, _d_class(block_d), 4 if elem_bytes >= 4 else 2)
    if vendor == "amd":
        return [Tile(m, n, w, s, waves_per_eu=wpe) for m, n, w, s, wpe in _ROCM[key]]
    return [
        Tile(m, n, w, s, use_tma=t, persistent=p[0] if p else 0) for m, n, w, s, t, *p in _CUDA[key] if tma or not t
    ]


def default(kind: str, vendor: str, block_d: int, elem_bytes: int, tma: bool = False) -> Tile:
    return candidates(kind, vendor, block_d, elem_bytes, tma)[0]


def seq_bucket(seqlen: int) -> int:
    """Autotune key for the sequence length: powers of two between 128 and 16384."""
    bucket = 128
    while bucket < seqlen and bucket < 16384:
        bucket *= 2
    return bucket
