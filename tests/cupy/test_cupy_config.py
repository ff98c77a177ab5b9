"""CPU tests of backends/cupy/config.py: head-dim mapping, the tile tables (each fits the hardware and the
kernels' static_asserts), shared-memory fallbacks and grids."""

from __future__ import annotations

import math

import pytest
import torch
from attnkit.backends.cupy import config

from attnkit.errors import InvalidArgumentError


def test_tile_fallback_for_small_shared_memory():
    for hd in config.KERNEL_HEAD_DIMS:
        f = config.fwd_config(hd, torch.float16, 99 * 1024)
        b = config.bwd_config(hd, torch.float16, 99 * 1024)
        assert f.smem_bytes <= 99 * 1024 and b.smem_bytes <= 99 * 1024, hd
        assert config.fwd_config(hd, torch.float16, 227 * 1024) == config.fwd_config(hd, torch.float16)


def test_head_dim_mapping():
    assert [config.padded_head_dim(d) for d in (1, 8, 9, 40, 255)] == [8, 8, 16, 40, 256]
    assert [config.kernel_head_dim(d) for d in (8, 32, 40, 64, 72, 96, 104, 128, 136, 256)] == [
        32, 32, 64, 64, 96, 96, 128, 128, 256, 256,
    ]  # fmt: skip
    with pytest.raises(InvalidArgumentError, match="257"):
        config.kernel_head_dim(257)
    with pytest.raises(InvalidArgumentError, match="float16 or bfloat16"):
        config.fwd_config(64, torch.float32)


@pytest.mark.parametrize("hd", config.KERNEL_HEAD_DIMS)
def test_configs_fit_the_hardware(hd):
    candidates = [
        (config.FwdConfig(hd, dtype == torch.bfloat16, *t), config.BwdConfig(hd, dtype == torch.bfloat16, *u))
        for dtype in (torch.float16, torch.bfloat16)
        for t in config._FWD_TILES[hd]
        for u in config._BWD_TILES[hd]
    ]
    for f, b in candidates:
        dtype = torch.bfloat16 if f.bf16 else torch.float16
        assert f.head_dim == hd and f.bf16 == (dtype == torch.bfloat16)
        assert f.threads <= 1024 and b.threads <= 1024
        # sm_80 allows 163 KB of dynamic shared memory per block; sm_86/89 99 KB (checked at dispatch).
        assert f.smem_bytes <= 163 * 1024 and b.smem_bytes <= 163 * 1024
        # The backward kernel's dQ split must be even (mirrors its static_asserts).
        warps = b.warps_n * b.warps_d
        assert warps % (b.block_m // 16) == 0
        assert (hd // (warps // (b.block_m // 16))) % 16 == 0


def test_grids():
    f = config.fwd_config(128, torch.bfloat16)
    assert f.grid(1, 3, 2) == (1, 3, 2)
    assert f.grid(f.block_m + 1, 16, 4) == (2, 16, 4)
    b = config.bwd_config(64, torch.float16)
    assert b.grid(b.block_n * 3, 2, 5) == (3, 2, 5)
    # Four warps, each serving 32 / lanes rows: 16 rows per CTA at d 64, 8 at d 128, 4 at d 256.
    assert config.pre_grid(10, 3, 2, 64) == (math.ceil(30 / 16), 2, 1)
    assert config.pre_grid(10, 3, 2, 128) == (math.ceil(30 / 8), 2, 1)
    assert config.pre_grid(10, 3, 2, 256) == (math.ceil(30 / 4), 2, 1)


def test_pre_pass_lanes_cover_the_row():
    """The fewest lanes (a power of two up to a warp) whose 8 elements each span the padded head dim."""
    lanes = {d: config.pre_lanes_per_row(d) for d in (8, 16, 24, 40, 64, 72, 128, 136, 200, 256)}
    assert lanes == {8: 1, 16: 2, 24: 4, 40: 8, 64: 8, 72: 16, 128: 16, 136: 32, 200: 32, 256: 32}
    for d, n in lanes.items():
        assert n * 8 >= d and (n == 1 or (n // 2) * 8 < d) and 32 % n == 0


@pytest.mark.parametrize("hd", sorted(config.SM90_FWD_TILES))
def test_sm90_tiles_fit_and_keep_the_swizzle_phase(hd):
    for t in config.SM90_FWD_TILES[hd]:
        for bf16 in (False, True):
            cfg = config.Sm90FwdConfig(hd, bf16, *t)
            assert cfg.smem_bytes <= 227 * 1024 and cfg.threads <= 1024
            # Mirrors load_sw128's static_assert: a thread's rows step by a multiple of 8.
            assert (cfg.threads // (hd // 8)) % 8 == 0 and cfg.threads % (hd // 8) == 0
            assert cfg.block_n in (64, 128) and cfg.block_m == 64 * cfg.warpgroups
