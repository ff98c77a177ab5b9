"""Tile tables and the autotune switch (pure Python: no kernels run here)."""

from __future__ import annotations

import dataclasses

import pytest
from attnkit.backends.triton import configs

from attnkit import env
from attnkit.errors import EnvironmentVariableError


@pytest.mark.parametrize("vendor", ["nvidia", "amd"])
@pytest.mark.parametrize("kind", configs.KINDS)
@pytest.mark.parametrize("block_d", [16, 64, 128, 256])
@pytest.mark.parametrize("elem_bytes", [2, 4])
def test_every_space_is_well_formed(vendor, kind, block_d, elem_bytes):
    for tma in (False, True):
        tiles = configs.candidates(kind, vendor, block_d, elem_bytes, tma)
        assert tiles and configs.default(kind, vendor, block_d, elem_bytes, tma) == tiles[0]
        for t in tiles:
            for block in (t.block_m, t.block_n):
                assert block >= 16 and block & (block - 1) == 0  # tl.dot needs >= 16, arange powers of two
            assert t.num_warps in (4, 8) and 1 <= t.num_stages <= 4
            assert not (t.use_tma and (vendor == "amd" or not tma or block_d > 128))
            assert (t.waves_per_eu is not None) == (vendor == "amd")
            assert t.persistent == 0 or kind == "fwd"  # only the forward kernel has a persistent grid
        assert len(set(tiles)) == len(tiles)


@pytest.mark.parametrize("key", sorted(configs.MISCOMPILED_TILES))
def test_known_miscompiled_tiles_are_never_candidates(key):
    kind, vendor, block_d, elem_bytes = key
    for tma in (False, True):
        tiles = configs.candidates(kind, vendor, block_d, elem_bytes, tma)
        assert tiles and not any(configs.miscompiled(kind, vendor, block_d, elem_bytes, t) for t in tiles)
    bad = configs.MISCOMPILED_TILES[key][0]
    assert configs.miscompiled(kind, vendor, block_d, elem_bytes, dataclasses.replace(bad, use_tma=True))
    assert not configs.miscompiled(kind, vendor, block_d, elem_bytes, dataclasses.replace(bad, num_warps=4))


def test_forced_tiles_rejects_unknown_kinds():
    from attnkit.backends.triton import launch

    with pytest.raises(ValueError, match="fwdd"), launch.forced_tiles(fwdd=configs.Tile(16, 16, 4, 1)):
        pass


def test_tma_tiles_lead_only_when_eligible():
    assert configs.default("fwd", "nvidia", 128, 2, tma=True).use_tma
    assert not configs.default("fwd", "nvidia", 128, 2, tma=False).use_tma


def test_meta_carries_compile_options():
    rocm = configs.default("fwd", "amd", 64, 2)
    assert rocm.meta()["waves_per_eu"] == rocm.waves_per_eu
    assert "waves_per_eu" not in configs.default("fwd", "nvidia", 64, 2).meta()


@pytest.mark.parametrize("n,bucket", [(1, 128), (128, 128), (129, 256), (5000, 8192), (10**6, 16384)])
def test_seq_bucket(n, bucket):
    assert configs.seq_bucket(n) == bucket


def test_autotune_switch(monkeypatch):
    monkeypatch.delenv(env.TRITON_AUTOTUNE, raising=False)
    assert env.triton_autotune()
    monkeypatch.setenv(env.TRITON_AUTOTUNE, "0")
    assert not env.triton_autotune()
    monkeypatch.setenv(env.TRITON_AUTOTUNE, "maybe")
    with pytest.raises(EnvironmentVariableError):
        env.triton_autotune()


def test_autotune_retimes_close_candidates(monkeypatch):
    """A candidate that looked best in one noisy sample loses to a close one that is faster when timed again."""
    import triton
    from attnkit.backends.triton import tuning

    tiles = [configs.Tile(64, 64, 4, 3), configs.Tile(128, 64, 8, 3), configs.Tile(128, 128, 8, 3)]
    first = {0: 1.00, 1: 1.05, 2: 2.0}  # tile 2 is far off: not timed again
    again = {0: [1.10, 1.09], 1: [1.02, 1.03]}
    calls: list[int] = []

    def fake_bench(fn, warmup, rep, return_mode):
        fn()
        i = calls[-1]
        n = sum(1 for c in calls if c == i)
        return first[i] if n == 1 else again[i][n - 2]

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    chosen = tuning.autotune_tiles(tiles, lambda tile: calls.append(tiles.index(tile)))
    assert chosen == tiles[1]
    assert calls.count(2) == 1 and calls.count(0) == 3 and calls.count(1) == 3


def test_autotune_single_clear_winner_is_not_retimed(monkeypatch):
    import triton
    from attnkit.backends.triton import tuning

    tiles = [configs.Tile(64, 64, 4, 3), configs.Tile(128, 64, 8, 3)]
    times = iter([1.0, 1.5])
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep, return_mode: (fn(), next(times))[1])
    assert tuning.autotune_tiles(tiles, lambda tile: None) == tiles[0]


def test_head_blocks_cut_by_a_mask_are_at_least_64_wide():
    """configs.head_block: powers of two stay exact; a block a mask cuts is >= 64 (narrower ones miscompute on
    sm_90), for the dense, kv-cache and fp8 launchers alike."""
    from attnkit.backends.triton import fp8_launch, launch

    assert [configs.head_block(d) for d in (16, 32, 64, 128, 256)] == [16, 32, 64, 128, 256]
    assert [configs.head_block(d) for d in (1, 8, 12, 20, 24, 36, 40, 48)] == [64] * 8
    assert [configs.head_block(d) for d in (72, 96, 160, 200)] == [128, 128, 256, 256]
    assert configs.head_block(16, minimum=32) == 64 and configs.head_block(32, minimum=32) == 32
    prob = launch.Problem(1, 4, 2, 200, 17, 36, 24, None)
    assert (prob.block_d, prob.block_dv) == (64, 64)
    assert fp8_launch._block(24) == 64 and fp8_launch._block(128) == 128
