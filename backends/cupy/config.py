"""Tile configurations of the CuPy kernels and the launch geometry derived from them.

Pure Python (no CuPy, no GPU), so the numbers the kernels are launched with can be unit-tested anywhere.
The tile choices follow FlashAttention-2 on Ampere/Hopper (see benchmarks/NOTES-cupy.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from attnkit.errors import InvalidArgumentError

# Head dims the kernels are compiled for; a call uses the smallest one >= its head dim (rounded up to 8),
# and the kernel zero-fills the columns in between.
KERNEL_HEAD_DIMS = (32, 64, 96, 128, 256)

# Shared-memory pitch padding in elements (16 bytes), mirrored from the kernels' LD = D + 8.
_PAD = 8


def padded_head_dim(head_dim: int) -> int:
    """Head dim rounded up to a multiple of 8: rows must be 16-byte aligned for cp.async."""
    return (head_dim + 7) // 8 * 8


def kernel_head_dim(head_dim: int) -> int:
    for hd in KERNEL_HEAD_DIMS:
        if head_dim <= hd:
            return hd
    raise InvalidArgumentError(f"head_dim={head_dim} exceeds the CuPy kernels' maximum {KERNEL_HEAD_DIMS[-1]}")


def dtype_flag(dtype: torch.dtype) -> int:
    if dtype == torch.float16:
        return 0
    if dtype == torch.bfloat16:
        return 1
    raise InvalidArgumentError(f"the CuPy kernels take float16 or bfloat16, got {dtype}")


@dataclass(frozen=True)
class FwdConfig:
    head_dim: int  # kernel (padded) head dim
    bf16: bool
    m_tiles: int  # 16-row tiles per warp
    warps: int
    block_n: int

    @property
    def block_m(self) -> int:
        return 16 * self.m_tiles * self.warps

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def smem_bytes(self) -> int:
        return (self.block_m + 2 * self.block_n) * (self.head_dim + _PAD) * 2

    def defines(self) -> dict[str, int]:
        return {
            "ATTNKIT_HEAD_DIM": self.head_dim,
            "ATTNKIT_BF16": int(self.bf16),
            "ATTNKIT_FWD_MT": self.m_tiles,
            "ATTNKIT_FWD_WARPS": self.warps,
            "ATTNKIT_FWD_BN": self.block_n,
        }

    def grid(self, max_seqlen_q: int, heads_q: int, batch: int) -> tuple[int, int, int]:
        return (-(-max_seqlen_q // self.block_m), heads_q, batch)


@dataclass(frozen=True)
class Sm90FwdConfig:
    """Tiles of the Hopper wgmma forward (fwd_sm90.cu): 64 query rows per warpgroup, 128-byte-swizzled tiles."""

    head_dim: int  # kernel head dim: 64 or 128
    bf16: bool
    warpgroups: int
    block_n: int

    @property
    def block_m(self) -> int:
        return 64 * self.warpgroups

    @property
    def threads(self) -> int:
        return 128 * self.warpgroups

    @property
    def smem_bytes(self) -> int:
        # Q plus two stages of K and V, unpadded (the swizzle replaces the padding), and 1 KB so the kernel can
        # align its tiles to the swizzle's 1024-byte period.
        return (self.block_m + 4 * self.block_n) * self.head_dim * 2 + SM90_ALIGN_SLACK

    def defines(self) -> dict[str, int]:
        return {
            "ATTNKIT_HEAD_DIM": self.head_dim,
            "ATTNKIT_BF16": int(self.bf16),
            "ATTNKIT_FWD_WG": self.warpgroups,
            "ATTNKIT_FWD_BN": self.block_n,
        }

    def grid(self, max_seqlen_q: int, heads_q: int, batch: int) -> tuple[int, int, int]:
        return (-(-max_seqlen_q // self.block_m), heads_q, batch)


SM90_ALIGN_SLACK = 1024


@dataclass(frozen=True)
class Sm90BwdConfig:
    """The Hopper wgmma backward (bwd_sm90.cu): one warpgroup per CTA, 64 keys per CTA, 64 queries per step."""

    head_dim: int  # kernel head dim: 64 or 128
    bf16: bool
    block_n: int = 64
    block_m: int = 64
    threads: int = 128

    @property
    def smem_bytes(self) -> int:
        # K, V; Q and dO double-buffered; dS^T; lse and delta double-buffered (float32); alignment slack.
        d, bn, bm = self.head_dim, self.block_n, self.block_m
        return (2 * bn * d + 4 * bm * d + bn * bm) * 2 + 4 * bm * 4 + SM90_ALIGN_SLACK

    def defines(self) -> dict[str, int]:
        return {"ATTNKIT_HEAD_DIM": self.head_dim, "ATTNKIT_BF16": int(self.bf16)}

    def grid(self, max_seqlen_k: int, heads_k: int, batch: int) -> tuple[int, int, int]:
        return (-(-max_seqlen_k // self.block_n), heads_k, batch)


SM90_BWD_HEAD_DIMS = (64, 128)


@dataclass(frozen=True)
class Sm90WsFwdConfig:
    """The warp-specialised Hopper forward (fwd_sm90_ws.cu): a TMA producer warpgroup and ``consumers`` (2, or 3
    at head dim 64) consumer warpgroups of 64 query rows each (BM = 64 x consumers), K/V in a 2-stage ring of
    ``block_n``-key tiles.

    ``pipeline`` (softmax of tile i overlapping the GEMMs inside a warpgroup) and ``pingpong`` (the consumers
    taking turns on named barriers) are compile-time switches, so one GPU run can time each lever."""

    head_dim: int  # kernel head dim: 64 or 128
    bf16: bool
    block_n: int = 128
    # Three consumers (FlashAttention-3's 192-row tile at head dim 64) hand each softmax two other warpgroups'
    # products to hide behind; their 160 registers per thread hold head dim 64's accumulators only.
    consumers: int = 2
    pipeline: bool = True
    # On by default: +1-13% over the pipelined schedule alone in 15 of 16 cells (d 64/128, 2k-16k, causal and
    # not), -2% in the other (d128 non-causal 4k; H200, benchmarks/results/h200_2026-12-02_s3/cupy_ws_ablations.md).
    pingpong: bool = True
    producer_regs: int = 24
    consumer_regs: int = 240
    # float8_e4m3fn inputs with descales (the fp8 forward); ``bf16`` then names the output dtype (bfloat16 or
    # float16) unless ``out_f32``.
    fp8: bool = False
    out_f32: bool = False
    # Of every 4 column groups of an unmasked score tile, how many take their exponentials from a polynomial on
    # the float pipes instead of the MUFU (kernels/common.cuh, poly_exp2). 0 by default: on an H200 1 and 2 were
    # 0-19% slower for bf16 and at best even for fp8, the float pipe being the tighter one (NOTES-cupy.md).
    poly_exp: int = 0

    barrier_bytes: ClassVar[int] = 9 * 8  # Q full; K/V full and empty per stage

    @property
    def block_m(self) -> int:
        return 64 * self.consumers

    @property
    def threads(self) -> int:
        return 128 * (1 + self.consumers)

    def __post_init__(self) -> None:
        if self.head_dim not in SM90_WS_HEAD_DIMS or self.block_n not in (64, 128):
            raise InvalidArgumentError(
                f"fwd_sm90_ws is built for head dims {SM90_WS_HEAD_DIMS} and 64 or 128 keys per tile, "
                f"got head_dim={self.head_dim}, block_n={self.block_n}"
            )
        # setmaxnreg takes multiples of 8 in [24, 256]. It only moves registers between the warpgroups of one CTA:
        # setmaxnreg.inc waits until .dec has released enough of the CTA's own allocation, which is 384 threads x
        # the per-thread cap ptxas derives from __launch_bounds__(384, 1). A budget above that allocation never
        # completes the .inc (the 32/240 split hung on the H200, 2026-12-02).
        if self.fp8 and (self.head_dim != FP8_WS_HEAD_DIM or self.block_n != 128):
            raise InvalidArgumentError(
                f"the fp8 forward is built for kernel head dim {FP8_WS_HEAD_DIM} and 128 keys per tile (a V^T tile "
                f"row is one 128-byte swizzle span), got head_dim={self.head_dim}, block_n={self.block_n}"
            )
        if self.consumers not in (2, 3) or (self.consumers == 3 and (self.head_dim != 64 or self.fp8)):
            raise InvalidArgumentError(
                f"consumers={self.consumers} (head_dim={self.head_dim}, fp8={self.fp8}); allowed: 2, or 3 at 16-bit "
                "head dim 64 (three warpgroups' accumulators fit their 160 registers there only)"
            )
        if not 0 <= self.poly_exp <= 4:
            raise InvalidArgumentError(f"poly_exp={self.poly_exp}; allowed: 0-4 column groups of every 4")
        if self.out_f32 and not self.fp8:
            raise InvalidArgumentError("out_f32 applies to the fp8 forward only (16-bit inputs give their own dtype)")
        for name, regs in (("producer_regs", self.producer_regs), ("consumer_regs", self.consumer_regs)):
            if regs % 8 or not 24 <= regs <= 256:
                raise InvalidArgumentError(f"{name}={regs}; allowed: multiples of 8 in 24..256")
        budget = ws_cta_registers(self.threads)
        if 128 * (self.producer_regs + self.consumers * self.consumer_regs) > budget:
            raise InvalidArgumentError(
                f"producer_regs={self.producer_regs} + {self.consumers} x consumer_regs={self.consumer_regs} per "
                f"thread of 128 exceed the {budget} registers a {self.threads}-thread CTA is launched with"
            )

    @property
    def smem_bytes(self) -> int:
        # Q and two stages of K and V (unpadded, 128-byte swizzle), the barriers, and 1 KB to align to the swizzle.
        elem = 1 if self.fp8 else 2
        return (self.block_m + 4 * self.block_n) * self.head_dim * elem + self.barrier_bytes + SM90_ALIGN_SLACK

    def defines(self) -> dict[str, int]:
        return {
            "ATTNKIT_HEAD_DIM": self.head_dim,
            "ATTNKIT_BF16": int(self.bf16),
            "ATTNKIT_WS_BN": self.block_n,
            "ATTNKIT_WS_PIPE": int(self.pipeline),
            "ATTNKIT_WS_PINGPONG": int(self.pingpong),
            "ATTNKIT_WS_PRODUCER_REGS": self.producer_regs,
            "ATTNKIT_WS_CONSUMER_REGS": self.consumer_regs,
            # Only when set: the default kernels keep the module keys (and disk caches) they had before these.
            **({"ATTNKIT_WS_CONSUMERS": self.consumers} if self.consumers != 2 else {}),
            **({"ATTNKIT_FP8": 1, "ATTNKIT_OUT_F32": int(self.out_f32)} if self.fp8 else {}),
            **({"ATTNKIT_WS_POLY_EXP": self.poly_exp} if self.poly_exp else {}),
        }

    def grid(self, max_seqlen_q: int, heads_q: int, batch: int) -> tuple[int, int, int]:
        return (-(-max_seqlen_q // self.block_m), heads_q, batch)


# The warp-specialised forward covers padded head dims 33..128 (TMA zero-fills the columns up to the kernel dim,
# so e.g. 80 and 96 run on the 128 kernel); 32 and below keep the mma.sync kernel built for them.
SM90_WS_HEAD_DIMS = (64, 128)
# The fp8 forward: one kernel head dim (a row of 128 e4m3 values is one 128-byte swizzle span); smaller head dims
# that are multiples of 16 (TMA's 16-byte rows) run on it with the columns past them zero-filled.
FP8_WS_HEAD_DIM = 128
FP8_WS_HEAD_DIM_MULTIPLE = 16
# Keys of V^T are padded to whole blocks of 32, the span the fp8 forward's key permutation works in.
FP8_VT_KEY_BLOCK = 32
FP8_VT_THREADS = 256
FP8_VT_KEYS_PER_CTA = 64
SM90_WS_MIN_HEAD_DIM = 33
# At kernel head dim 64 the warp-specialised forward serves calls from 2k keys on. With two consumers it overtook
# fwd_sm90 only from 8k keys (H200, 2026-12-02); on an H100 (2026-12-06) it already led at 2k (383 vs 361 TFLOP/s
# non-causal, 295 vs 290 causal), and the three-consumer tile runs 1.09-1.22x it at 4k-16k. Shorter calls, where
# 192-row blocks idle most SMs, were not measured and keep fwd_sm90.
SM90_WS_D64_MIN_SEQLEN_K = 2048
# The warp-specialised forward's schedule variants that the benchmark times against the default (each is a
# change of Sm90WsFwdConfig fields); the GPU tests, the nvcc build test and the precompile list use the same table.
WS_FWD_ABLATIONS: dict[str, dict[str, object]] = {
    "no-pingpong": {"pingpong": False},
    "no-pipe": {"pipeline": False},
    "no-pipe+no-pingpong": {"pipeline": False, "pingpong": False},
    "bn64": {"block_n": 64},
    # FlashAttention-3's head-dim-64 tile: 192 query rows in three consumer warpgroups (producer 24 registers per
    # thread, consumers 160: 128 x (24 + 3 x 160) <= 512 x 128) on 128-key tiles. The consumer fits 160 registers
    # because every tile takes one exponential path (softmax.cuh, OnlineSoftmax::probs); on 64-key tiles it ran
    # 0.87-0.99x the default on an H100 (NOTES-cupy.md).
    "wg3": {"consumers": 3, "consumer_regs": 160},
    # Two consumers of 240 registers, 128 rows: the head-dim-64 default until the three-consumer tile fit.
    "wg2": {"consumers": 2, "consumer_regs": 240},
    # Exponentials of unmasked tiles partly on the float pipes (poly_exp2): 1 or 2 column groups of every 4.
    "poly-exp-1": {"poly_exp": 1},
    "poly-exp-2": {"poly_exp": 2},
}
# The 16-bit forward's tile and schedule by kernel head dim (changes of the Sm90WsFwdConfig defaults). Head dim 64
# runs FlashAttention-3's 192 x 128 tile: 1.12-1.22x two consumers non-causal and 1.09-1.14x causal at 4k-16k
# (H100, benchmarks/results/h100_2026-12-06_s15/, NOTES-cupy.md).
WS_FWD_TILES: dict[int, dict[str, object]] = {64: WS_FWD_ABLATIONS["wg3"], 128: {}}

SM_REGISTERS = 65536


def ws_cta_registers(threads: int) -> int:
    """Registers a warp-specialised CTA of ``threads`` holds: the per-thread cap (a multiple of 8) that
    __launch_bounds__(threads, 1) gives on a 65536-register SM, times the threads (384 x 168, 512 x 128).
    setmaxnreg only moves registers inside that allocation."""
    return threads * (SM_REGISTERS // threads // 8 * 8)


@dataclass(frozen=True)
class Sm90WsBwdConfig:
    """The warp-specialized Hopper backward (bwd_sm90_ws.cu): a producer warpgroup issuing TMA copies and two
    consumer warpgroups of 64 keys each, 128 keys per CTA, Q/dO/lse/delta in two stages; WS_BWD_TILES gives the
    queries per step and the schedule of each head dim (128 at d 64, 80 at d 128, with early dV and late dK)."""

    head_dim: int  # kernel head dim: 64 or 128
    bf16: bool
    block_n: int = 128
    block_m: int = 64  # queries per step: 64, 128 at head dim 64 or 80 at head dim 128 (early_dv there with ds_bf16)
    threads: int = 384  # producer warpgroup + two consumer warpgroups
    stages: int = 2
    # Each step's products overlap its score math (P^T while dP^T runs, dQ issued while dV/dK run); False waits
    # for every product group at once (the ablation baseline, benchmarks/cupy_ws_bwd_bench.py).
    overlap: bool = True
    # With overlap: FA3's order, dV issued as soon as P^T is packed so that dS^T is formed while it runs (False:
    # dV and dK issued together after dS^T).
    early_dv: bool = True
    # With early_dv: dK issued after dQ, past the consumer barrier, so it runs while the dQ tile is staged.
    late_dk: bool = True
    # Warp 1 of the producer warpgroup issues the dQ reductions (FA3's dQ writer), so the consumers store their dQ
    # tile and arrive without waiting; False (the ablation "no-dq-writer"): each consumer warpgroup synchronises
    # and issues its own. +3.6-8.6% on an H200 (benchmarks/NOTES-cupy.md).
    dq_writer: bool = True
    # With early_dv: the factor of dS^T taken from P^T is kept as 16-bit fragments instead of fp32 registers while
    # dV runs, so early dV fits beside the wider query steps (the ablations "bm80-early", "bm128-early"). Rounds
    # that factor to 16 bits before dS^T is formed (plain PyTorch in bf16 rounds P itself).
    ds_bf16: bool = False

    def __post_init__(self) -> None:
        if self.head_dim not in SM90_BWD_HEAD_DIMS or self.block_n != 128 or self.block_m not in (64, 80, 128):
            raise InvalidArgumentError(
                f"bwd_sm90_ws is built for head dims {SM90_BWD_HEAD_DIMS}, 128 keys and 64, 80 or 128 queries per "
                f"step, got head_dim={self.head_dim}, block_n={self.block_n}, block_m={self.block_m}"
            )
        # 128 queries per step hold S^T and dP^T in 128 registers a thread: dK and dV fit beside them at d 64 only.
        # 80 queries hold them in 80 registers beside d 128's 128 of dK and dV. Early dV fits there only with the
        # 16-bit factor (nvcc 13.0: with the fp32 one, 144 bytes spill at 128 queries, 192 at 80, and the wgmmas
        # serialise; with ds_bf16 neither spills and both keep 4 warpgroup waits).
        wide = {128: 64, 80: 128}
        if self.block_m in wide and (self.head_dim != wide[self.block_m] or (self.early_dv and not self.ds_bf16)):
            raise InvalidArgumentError(
                f"block_m={self.block_m} is built for head dim {wide[self.block_m]}, with early_dv only beside "
                f"ds_bf16, got head_dim={self.head_dim}, early_dv={self.early_dv}, ds_bf16={self.ds_bf16}"
            )
        if self.ds_bf16 and not self.early_dv:
            raise InvalidArgumentError("ds_bf16 applies to the early_dv schedule only; set ds_bf16=False without it")
        if self.late_dk and not self.early_dv:
            raise InvalidArgumentError("late_dk applies to the early_dv schedule only; set late_dk=False with it")

    @property
    def smem_bytes(self) -> int:
        d, bn, bm, st = self.head_dim, self.block_n, self.block_m, self.stages
        kv = 2 * bn * d * 2
        q_do = st * 2 * bm * d * 2
        ds = 2 * bn * bm * 2  # dS^T, two buffers
        dq = 2 * self.dq_tile_rows * 64 * 4  # fp32 dQ staging, one dq_tile_rows x 64 tile per consumer warpgroup
        lse_delta = st * 2 * bm * 4
        barriers = 8 * (1 + 2 * st)
        return kv + q_do + ds + dq + lse_delta + barriers + SM90_ALIGN_SLACK

    def defines(self) -> dict[str, int]:
        return {"ATTNKIT_HEAD_DIM": self.head_dim, "ATTNKIT_BF16": int(self.bf16), "ATTNKIT_WS_BWD_BM": self.block_m,
                "ATTNKIT_WS_BWD_OVERLAP": int(self.overlap), "ATTNKIT_WS_BWD_EARLY_DV": int(self.early_dv),
                "ATTNKIT_WS_BWD_LATE_DK": int(self.late_dk),
                "ATTNKIT_WS_BWD_DQ_WRITER": int(self.dq_writer),
                "ATTNKIT_WS_BWD_DS_BF16": int(self.ds_bf16)}  # fmt: skip

    def grid(self, max_seqlen_k: int, heads_k: int, batch: int) -> tuple[int, int, int]:
        return (-(-max_seqlen_k // self.block_n), heads_k, batch)

    @property
    def dq_tile_rows(self) -> int:
        """Query rows of one consumer warpgroup's dQ tile (and of the dQ tensor map's box): 64, or all 80 of the
        80-query step, whose transposed dQ product splits the head dim between the warpgroups instead."""
        return 80 if self.block_m == 80 else 64

    def lse_len(self, seqlen_q: int) -> int:
        """Row length of the padded lse/delta buffers: whole query blocks, so every bulk copy is 16-byte aligned."""
        return -(-seqlen_q // self.block_m) * self.block_m


# The warp-specialized backward's variants timed against the default (changes of Sm90WsBwdConfig fields). Not
# every row applies at every head dim: ws_bwd_ablations(head_dim) gives those that do, and the benchmark, the GPU
# tests, the nvcc build test and the precompile list take them from there.
WS_BWD_ABLATIONS: dict[str, dict[str, object]] = {
    "serial": {"overlap": False, "early_dv": False, "late_dk": False, "ds_bf16": False},
    "overlap": {"early_dv": False, "late_dk": False, "ds_bf16": False},
    "early-dv": {"late_dk": False},
    "no-dq-writer": {"dq_writer": False},
    # The wide steps (FA3's tiles): 128 queries at d 64 (S^T and dP^T wgmmas 128 wide, half the steps and
    # barriers), 80 at d 128 (dQ computed transposed, dQ^T = K^T dS^T), in the overlap schedule; with early dV and
    # late dK, which fit beside them only with the 16-bit dS^T factor, they are the defaults (WS_BWD_TILES).
    "bm128": {"block_m": 128, "early_dv": False, "late_dk": False, "ds_bf16": False},
    "bm80": {"block_m": 80, "early_dv": False, "late_dk": False, "ds_bf16": False},
    "bm128-early": {"block_m": 128, "early_dv": True, "late_dk": True, "ds_bf16": True},
    "bm80-early": {"block_m": 80, "early_dv": True, "late_dk": True, "ds_bf16": True},
    # The 64-query step with early dV, late dK and the fp32 factor (the default of both head dims until the wide
    # steps took early dV).
    "bm64": {"block_m": 64, "early_dv": True, "late_dk": True, "ds_bf16": False},
}
# Queries per step by kernel head dim: the wide step with early dV and late dK at both. On an H100 (2026-12-06,
# benchmarks/NOTES-cupy.md) +2-6% over the 64-query step at d 128 non-causal (within 2% causal), +2-3% over the
# overlap-schedule 128-query step at d 64 (-3 to +3% causal).
WS_BWD_TILES: dict[int, dict[str, object]] = {64: WS_BWD_ABLATIONS["bm128-early"], 128: WS_BWD_ABLATIONS["bm80-early"]}


def ws_bwd_ablations(head_dim: int) -> dict[str, dict[str, object]]:
    """The rows of WS_BWD_ABLATIONS that give a valid configuration other than the default at this kernel head
    dim (64 or 128)."""
    base = sm90_ws_bwd_config(head_dim, torch.bfloat16)
    if base is None:
        raise InvalidArgumentError(f"the warp-specialized backward is built for head dims {SM90_BWD_HEAD_DIMS}")
    out: dict[str, dict[str, object]] = {}
    for name, change in WS_BWD_ABLATIONS.items():
        try:
            variant = dataclasses.replace(base, **change)
        except InvalidArgumentError:
            continue
        if variant != base:
            out[name] = change
    return out


def sm90_ws_bwd_config(head_dim: int, dtype: torch.dtype, smem_limit: int | None = None) -> Sm90WsBwdConfig | None:
    """The warp-specialized backward's configuration for this head dim, or None when it does not cover it (or does
    not fit ``smem_limit``)."""
    hd = kernel_head_dim(padded_head_dim(head_dim))
    if hd not in SM90_BWD_HEAD_DIMS:
        return None
    cfg = Sm90WsBwdConfig(hd, bool(dtype_flag(dtype)), **WS_BWD_TILES[hd])  # type: ignore[arg-type]
    return cfg if smem_limit is None or cfg.smem_bytes <= smem_limit else None


@dataclass(frozen=True)
class BwdConfig:
    head_dim: int
    bf16: bool
    warps_n: int  # warps along the keys (16 keys each)
    warps_d: int  # warps along the head dim for dK/dV
    block_m: int  # queries per inner step

    @property
    def block_n(self) -> int:
        return 16 * self.warps_n

    @property
    def threads(self) -> int:
        return 32 * self.warps_n * self.warps_d

    @property
    def smem_bytes(self) -> int:
        ld = self.head_dim + _PAD
        lds = self.block_m + _PAD
        return (2 * self.block_n * ld + 4 * self.block_m * ld + self.block_n * lds) * 2 + 4 * self.block_m * 4

    def defines(self) -> dict[str, int]:
        return {
            "ATTNKIT_HEAD_DIM": self.head_dim,
            "ATTNKIT_BF16": int(self.bf16),
            "ATTNKIT_BWD_WN": self.warps_n,
            "ATTNKIT_BWD_WD": self.warps_d,
            "ATTNKIT_BWD_BM": self.block_m,
        }

    def grid(self, max_seqlen_k: int, heads_k: int, batch: int) -> tuple[int, int, int]:
        return (-(-max_seqlen_k // self.block_n), heads_k, batch)


# Candidate tiles per kernel head dim, fastest first; a call takes the first that fits the device's shared memory
# (sm_80/90: 163/227 KB per block, sm_86/89: 99 KB). Picked by timing on an H200 (benchmarks/NOTES-cupy.md);
# the first D=128 forward entry (20 bytes of spills) beats the spill-free (1, 8, 64) by 25%.
# Forward: (m_tiles, warps, block_n).
_FWD_TILES: dict[int, list[tuple[int, int, int]]] = {
    32: [(2, 4, 64)],
    64: [(2, 4, 64)],
    96: [(1, 8, 64), (1, 4, 64)],
    128: [(2, 4, 64), (1, 4, 64)],
    256: [(1, 4, 64), (1, 4, 32)],
}
# Hopper wgmma forward: (warpgroups, block_n), for the kernel head dims it is built for. Picked on an H200
# (benchmarks/results/cupy_h200_sm90.md): for d = 64 one warpgroup per CTA wins (several CTAs per SM overlap one
# another's loads and softmax without a shared barrier), for d = 128 two warpgroups with 128-key tiles.
SM90_FWD_TILES: dict[int, list[tuple[int, int]]] = {
    64: [(1, 128)],
    128: [(2, 128), (1, 64)],
}
# Backward: (warps_n, warps_d, block_m); D = 256 splits dK/dV over two warps to bound registers.
_BWD_TILES: dict[int, list[tuple[int, int, int]]] = {
    32: [(4, 1, 64)],
    64: [(8, 1, 64), (4, 1, 64)],
    96: [(4, 1, 64), (4, 1, 32)],
    128: [(8, 1, 64), (4, 1, 64), (4, 1, 32)],
    256: [(4, 2, 32), (2, 2, 16)],
}

# Rows per CTA of the delta = rowsum(dO * O) pre-pass (one warp per row and head).
PRE_THREADS = 128


def pre_lanes_per_row(head_dim: int) -> int:
    """Lanes of attnkit_bwd_pre that share one row: the fewest (a power of two, at most a warp) whose 8 elements
    each cover ``head_dim``, so that a warp serves 32 // lanes rows at once."""
    lanes = 1
    while lanes < 32 and lanes * 8 < head_dim:
        lanes *= 2
    return lanes


def _pick(candidates: list, smem_limit: int | None):
    """First candidate within ``smem_limit`` bytes (None: no limit); the smallest when none fits, so the caller's
    shared-memory check can name the least it needs."""
    if smem_limit is None:
        return candidates[0]
    for c in candidates:
        if c.smem_bytes <= smem_limit:
            return c
    return min(candidates, key=lambda c: c.smem_bytes)


def fwd_config(head_dim: int, dtype: torch.dtype, smem_limit: int | None = None) -> FwdConfig:
    hd = kernel_head_dim(padded_head_dim(head_dim))
    bf16 = bool(dtype_flag(dtype))
    return _pick([FwdConfig(hd, bf16, *t) for t in _FWD_TILES[hd]], smem_limit)


def sm90_fwd_config(head_dim: int, dtype: torch.dtype, smem_limit: int | None = None) -> Sm90FwdConfig | None:
    """The wgmma forward's tiles for this head dim, or None when no wgmma kernel covers it (or none fits)."""
    hd = kernel_head_dim(padded_head_dim(head_dim))
    if hd not in SM90_FWD_TILES:
        return None
    bf16 = bool(dtype_flag(dtype))
    cfg = _pick([Sm90FwdConfig(hd, bf16, *t) for t in SM90_FWD_TILES[hd]], smem_limit)
    return cfg if smem_limit is None or cfg.smem_bytes <= smem_limit else None


def sm90_bwd_config(head_dim: int, dtype: torch.dtype, smem_limit: int | None = None) -> Sm90BwdConfig | None:
    """The wgmma backward's configuration for this head dim, or None when no wgmma kernel covers it (or it does
    not fit)."""
    hd = kernel_head_dim(padded_head_dim(head_dim))
    if hd not in SM90_BWD_HEAD_DIMS:
        return None
    cfg = Sm90BwdConfig(hd, bool(dtype_flag(dtype)))
    return cfg if smem_limit is None or cfg.smem_bytes <= smem_limit else None


def bwd_config(head_dim: int, dtype: torch.dtype, smem_limit: int | None = None) -> BwdConfig:
    hd = kernel_head_dim(padded_head_dim(head_dim))
    bf16 = bool(dtype_flag(dtype))
    return _pick([BwdConfig(hd, bf16, *t) for t in _BWD_TILES[hd]], smem_limit)


def pre_grid(seqlen: int, heads: int, batch: int, head_dim: int) -> tuple[int, int, int]:
    rows_per_cta = (PRE_THREADS // 32) * (32 // pre_lanes_per_row(head_dim))
    return (-(-(seqlen * heads) // rows_per_cta), batch, 1)


# CUDA caps gridDim.y and gridDim.z at 65535 (heads and batch live there).
MAX_GRID_YZ = 65535


def ws_kernel_head_dim(head_dim: int) -> int | None:
    """Kernel head dim of the warp-specialised forward for this head dim, or None when it does not cover it."""
    dp = padded_head_dim(head_dim)
    if dp < SM90_WS_MIN_HEAD_DIM or dp > SM90_WS_HEAD_DIMS[-1]:
        return None
    return next(hd for hd in SM90_WS_HEAD_DIMS if dp <= hd)


def sm90_ws_fwd_config(head_dim: int, dtype: torch.dtype, smem_limit: int | None = None) -> Sm90WsFwdConfig | None:
    """The warp-specialised forward's configuration for this head dim, or None when it does not cover the head dim
    or does not fit ``smem_limit`` bytes of shared memory."""
    hd = ws_kernel_head_dim(head_dim)
    if hd is None:
        return None
    cfg = Sm90WsFwdConfig(hd, bool(dtype_flag(dtype)), **WS_FWD_TILES[hd])
    return cfg if smem_limit is None or cfg.smem_bytes <= smem_limit else None


def fp8_ws_fwd_config(head_dim: int, out_dtype: torch.dtype, smem_limit: int | None = None) -> Sm90WsFwdConfig | None:
    """The fp8 forward's configuration (fwd_sm90_ws.cu with float8_e4m3fn inputs) for this head dim and output
    dtype, or None when it does not cover the head dim or does not fit ``smem_limit`` bytes of shared memory."""
    if not 0 < head_dim <= FP8_WS_HEAD_DIM or head_dim % FP8_WS_HEAD_DIM_MULTIPLE:
        return None
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return None
    cfg = Sm90WsFwdConfig(FP8_WS_HEAD_DIM, out_dtype == torch.bfloat16, fp8=True, out_f32=out_dtype == torch.float32)
    return cfg if smem_limit is None or cfg.smem_bytes <= smem_limit else None


def fp8_vt_keys(seqlen_k: int) -> int:
    """Keys per row of the fp8 forward's V^T: seqlen_k rounded up to whole blocks of the key permutation."""
    return -(-seqlen_k // FP8_VT_KEY_BLOCK) * FP8_VT_KEY_BLOCK


def fp8_vt_grid(keys_padded: int, heads_k: int, batch: int) -> tuple[int, int, int]:
    return (-(-keys_padded // FP8_VT_KEYS_PER_CTA), heads_k, batch)


def _ws_fwd_ablations_of(base: Sm90WsFwdConfig) -> dict[str, dict[str, object]]:
    """The WS_FWD_ABLATIONS rows that are valid changes of ``base`` and differ from it."""
    valid = {}
    for name, change in WS_FWD_ABLATIONS.items():
        try:
            changed = dataclasses.replace(base, **change)
        except InvalidArgumentError:
            continue
        if changed != base:  # a row that names the default itself (wg3 at head dim 64) is no ablation of it
            valid[name] = change
    return valid


def ws_fwd_ablations(head_dim: int) -> dict[str, dict[str, object]]:
    """The WS_FWD_ABLATIONS variants (changes of that head dim's default) the 16-bit forward of kernel head dim
    ``head_dim`` can be built with (three consumer warpgroups exist at head dim 64 only)."""
    return _ws_fwd_ablations_of(sm90_ws_fwd_config(head_dim, torch.bfloat16))


def fp8_ws_ablations() -> dict[str, dict[str, object]]:
    """The WS_FWD_ABLATIONS variants the fp8 forward can be built with (its key tile is fixed at 128)."""
    return _ws_fwd_ablations_of(fp8_ws_fwd_config(FP8_WS_HEAD_DIM, torch.bfloat16))
