"""CPU tests of the warp-specialized Hopper backward's host side (backends/cupy/ws_bwd.py): its configuration,
when it is selected, its tensor maps and the exact argument list of its launch. The GPU launch is recorded."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from attnkit.backends.cupy import backend as cb
from attnkit.backends.cupy import compiler, config, ws_bwd
from helpers import H200_SMEM, ints, record_cupy_launches

from attnkit.errors import EnvironmentVariableError, InvalidArgumentError
from attnkit.params import AttentionParams

# ---- configuration -------------------------------------------------------------------------------------------
# Queries per step each head dim runs by default, with early dV, late dK and the 16-bit dS^T factor.
DEFAULT_TILES = {64: 128, 128: 80}


@pytest.mark.parametrize("hd", [64, 128])
def test_config_geometry(hd):
    bm = DEFAULT_TILES[hd]
    cfg = config.sm90_ws_bwd_config(hd, torch.bfloat16)
    assert cfg == config.Sm90WsBwdConfig(hd, True, block_m=bm, early_dv=True, late_dk=True, ds_bf16=True)
    assert (cfg.block_n, cfg.block_m, cfg.threads, cfg.stages) == (128, bm, 384, 2)
    # K, V; Q and dO twice; dS^T twice; fp32 dQ staging of two warpgroups (64 x 64 each, or 80 x 64: the 80-query
    # step's transposed dQ product gives each warpgroup all 80 rows); lse/delta twice; 5 mbarriers; slack.
    dq_rows = 80 if bm == 80 else 64
    assert cfg.dq_tile_rows == dq_rows
    expect = 2 * 128 * hd * 2 + 4 * bm * hd * 2 + 2 * 128 * bm * 2 + 2 * dq_rows * 64 * 4 + 4 * bm * 4 + 40 + 1024
    assert cfg.smem_bytes == expect <= H200_SMEM
    assert cfg.defines() == {
        "ATTNKIT_HEAD_DIM": hd, "ATTNKIT_BF16": 1, "ATTNKIT_WS_BWD_BM": bm, "ATTNKIT_WS_BWD_OVERLAP": 1,
        "ATTNKIT_WS_BWD_EARLY_DV": 1, "ATTNKIT_WS_BWD_LATE_DK": 1, "ATTNKIT_WS_BWD_DQ_WRITER": 1,
        "ATTNKIT_WS_BWD_DS_BF16": 1,
    }  # fmt: skip
    for name, change in config.ws_bwd_ablations(hd).items():  # other defines; the same memory unless a new tile
        variant = dataclasses.replace(cfg, **change)
        assert variant.defines() != cfg.defines(), name
        if variant.block_m == cfg.block_m:
            assert variant.smem_bytes == cfg.smem_bytes, name
    serial = dataclasses.replace(cfg, **config.WS_BWD_ABLATIONS["serial"])
    assert [serial.defines()[f"ATTNKIT_WS_BWD_{m}"] for m in ("OVERLAP", "EARLY_DV", "LATE_DK")] == [0, 0, 0]
    assert cfg.grid(1000, 4, 3) == (8, 4, 3) and cfg.grid(128, 1, 1) == (1, 1, 1) and cfg.grid(129, 1, 1)[0] == 2
    assert [cfg.lse_len(n) for n in (1, bm, bm + 1, 1000)] == [bm, bm, 2 * bm, -(-1000 // bm) * bm]


def test_ablations_by_head_dim():
    """The ablations that apply at both head dims, whose defaults are the wide steps with early dV, late dK and the
    16-bit dS^T factor: every schedule, the dQ writer off, the wide step in the overlap schedule (the previous d 64
    default) and the 64-query step with early dV and the fp32 factor (the previous d 128 default)."""
    assert list(config.ws_bwd_ablations(128)) == ["serial", "overlap", "early-dv", "no-dq-writer", "bm80", "bm64"]
    assert list(config.ws_bwd_ablations(64)) == ["serial", "overlap", "early-dv", "no-dq-writer", "bm128", "bm64"]
    for hd in (64, 128):
        base = config.sm90_ws_bwd_config(hd, torch.bfloat16)
        narrow = dataclasses.replace(base, **config.WS_BWD_ABLATIONS["bm64"])
        assert narrow == config.Sm90WsBwdConfig(hd, True)
        assert narrow.defines()["ATTNKIT_WS_BWD_BM"] == 64 and narrow.defines()["ATTNKIT_WS_BWD_DS_BF16"] == 0
        # Every schedule without early dV drops the 16-bit factor, which only that schedule uses.
        for name in ("serial", "overlap", "bm80" if hd == 128 else "bm128"):
            variant = dataclasses.replace(base, **config.WS_BWD_ABLATIONS[name])
            assert not variant.early_dv and not variant.ds_bf16, name


def test_eighty_query_step_fits_and_stages_whole_dq_tiles():
    """bm80 at d 128: Q/dO, dS and lse/delta sized by 80 queries, and each warpgroup's fp32 dQ staging holds all 80
    query rows (its transposed product covers 64 head-dim columns of every query), within an H200's opt-in
    shared memory."""
    cfg = dataclasses.replace(config.sm90_ws_bwd_config(128, torch.bfloat16), **config.WS_BWD_ABLATIONS["bm80"])
    assert (cfg.block_m, cfg.early_dv, cfg.late_dk, cfg.dq_tile_rows) == (80, False, False, 80)
    expect = 2 * 128 * 128 * 2 + 4 * 80 * 128 * 2 + 2 * 128 * 80 * 2 + 2 * 80 * 64 * 4 + 4 * 80 * 4 + 40 + 1024
    assert cfg.smem_bytes == expect <= H200_SMEM
    assert cfg.defines()["ATTNKIT_WS_BWD_BM"] == 80 and cfg.defines()["ATTNKIT_WS_BWD_EARLY_DV"] == 0
    assert [cfg.lse_len(n) for n in (1, 80, 81, 1000)] == [80, 80, 160, 1040]
    assert dataclasses.replace(cfg, **config.WS_BWD_ABLATIONS["bm64"]).dq_tile_rows == 64


@pytest.mark.parametrize(("hd", "name"), [(128, "bm80-early"), (64, "bm128-early")])
def test_wide_steps_with_early_dv_take_the_16_bit_factor(hd, name):
    """Early dV and late dK on the wide steps: the same memory as the step without them, one define apart."""
    base = config.sm90_ws_bwd_config(hd, torch.bfloat16)
    early = dataclasses.replace(base, **config.WS_BWD_ABLATIONS[name])
    plain = dataclasses.replace(early, early_dv=False, late_dk=False, ds_bf16=False)
    assert early.smem_bytes == plain.smem_bytes
    changed = {k for k, v in early.defines().items() if plain.defines()[k] != v}
    assert changed == {"ATTNKIT_WS_BWD_EARLY_DV", "ATTNKIT_WS_BWD_LATE_DK", "ATTNKIT_WS_BWD_DS_BF16"}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(head_dim=128, block_m=128, early_dv=False, late_dk=False), "head dim 64"),
        (dict(head_dim=64, block_m=128, early_dv=True, late_dk=False), "early_dv only beside ds_bf16"),
        (dict(head_dim=64, block_m=96), "block_m=96"),
        (dict(head_dim=64, block_m=80, early_dv=False, late_dk=False), "head dim 128"),
        (dict(head_dim=128, block_m=80, early_dv=True, late_dk=False), "early_dv only beside ds_bf16"),
        (dict(head_dim=64, block_m=128, early_dv=True, late_dk=True), "early_dv only beside ds_bf16"),
        (dict(head_dim=128, early_dv=False, late_dk=False, ds_bf16=True), "ds_bf16 applies to the early_dv"),
        (dict(head_dim=64, block_n=64), "block_n=64"),
        (dict(head_dim=96), "head_dim=96"),
        (dict(head_dim=64, early_dv=False), "late_dk"),
    ],
)
def test_config_refuses_what_is_not_built(change, match):
    with pytest.raises(InvalidArgumentError, match=match):
        config.Sm90WsBwdConfig(bf16=True, **change)


def test_config_is_frozen():
    cfg = config.Sm90WsBwdConfig(128, False)
    with pytest.raises(AttributeError):
        cfg.block_n = 64  # type: ignore[misc]


@pytest.mark.parametrize(
    ("head_dim", "expected"), [(128, 128), (120, 128), (64, 64), (40, 64), (32, None), (96, None), (256, None)]
)
def test_config_head_dims(head_dim, expected):
    cfg = config.sm90_ws_bwd_config(head_dim, torch.float16)
    assert (cfg.head_dim if cfg else None) == expected
    assert config.sm90_ws_bwd_config(head_dim, torch.float16, smem_limit=100 * 1024) is None  # 99 KB GPUs


# ---- selection -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arch", "varlen", "wgmma", "tma", "smem", "selected"),
    [
        ("sm_90", False, None, None, H200_SMEM, True),  # ATTNKIT_CUPY_TMA_BWD defaults to 1
        ("sm_90", False, None, "1", H200_SMEM, True),
        ("sm_90", False, "1", "1", H200_SMEM, True),
        ("sm_90", False, None, "0", H200_SMEM, False),
        ("sm_90", False, "0", "1", H200_SMEM, False),  # ATTNKIT_CUPY_WGMMA=0 turns off every wgmma kernel
        ("sm_90", True, None, "1", H200_SMEM, False),  # varlen stays on bwd_sm90.cu
        ("sm_80", False, None, "1", 163 * 1024, False),
        ("compute_90", False, None, "1", H200_SMEM, False),
        ("sm_90", False, None, "1", 150 * 1024, False),  # 198 KB do not fit
    ],
)
def test_selection(monkeypatch, arch, varlen, wgmma, tma, smem, selected):
    for name, value in (("ATTNKIT_CUPY_WGMMA", wgmma), ("ATTNKIT_CUPY_TMA_BWD", tma)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    cfg = ws_bwd.ws_backward_config(128, torch.bfloat16, arch, smem, varlen)
    assert (cfg is not None) == selected


def test_bad_switch_is_rejected(monkeypatch):
    monkeypatch.setenv("ATTNKIT_CUPY_TMA_BWD", "sometimes")
    with pytest.raises(EnvironmentVariableError, match="ATTNKIT_CUPY_TMA_BWD='sometimes'"):
        ws_bwd.ws_backward_config(128, torch.bfloat16, "sm_90", H200_SMEM, False)


def test_source_registered_for_sm90a_only():
    assert ws_bwd.SOURCE in compiler.SOURCES and ws_bwd.SOURCE in compiler.SM90A_SOURCES
    assert compiler.ModuleSpec.make(ws_bwd.SOURCE, {}, "sm_90a").arch == "sm_90a"
    with pytest.raises(Exception, match="sm_90a"):
        compiler.ModuleSpec.make(ws_bwd.SOURCE, {}, "sm_90")
    assert f'"C" __global__ void __launch_bounds__(384, 1)\n    {ws_bwd.KERNEL}(' in compiler.read_kernel_text(
        ws_bwd.SOURCE
    )


# ---- tensor maps -----------------------------------------------------------------------------------------------
def test_tensor_maps_describe_the_layouts():
    cfg = config.Sm90WsBwdConfig(128, True)
    q = torch.empty(2, 37, 4, 128, dtype=torch.bfloat16)
    k = torch.empty(2, 50, 1, 128, dtype=torch.bfloat16)
    dq = torch.empty(2, 37, 4, 128, dtype=torch.float32)
    maps = ws_bwd.tensor_maps(cfg, q, k, k, q, dq)
    assert maps.q.dims == (128, 37, 4, 2) and maps.q.box == (64, 64, 1, 1) and maps.q.swizzle == 3
    assert maps.q.strides_bytes == (4 * 128 * 2, 128 * 2, 37 * 4 * 128 * 2) and maps.q.data_type == 9
    assert maps.k.dims == (128, 50, 1, 2) and maps.k.box == (64, 128, 1, 1)
    assert maps.dq.data_type == 7 and maps.dq.box == (32, 64, 1, 1) and maps.dq.swizzle == 3
    assert maps.dq.strides_bytes == (4 * 128 * 4, 128 * 4, 37 * 4 * 128 * 4)
    assert [m.address for m in maps.all()] == [q.data_ptr(), k.data_ptr(), k.data_ptr(), q.data_ptr(), dq.data_ptr()]


def test_tensor_maps_of_the_wide_step():
    """128 queries per step: Q and dO boxes of 128 rows, dQ boxes still 64 (one warpgroup's tile)."""
    cfg = config.Sm90WsBwdConfig(64, True, **config.WS_BWD_ABLATIONS["bm128"])
    q = torch.empty(1, 300, 2, 64, dtype=torch.bfloat16)
    maps = ws_bwd.tensor_maps(cfg, q, q, q, q, torch.empty(1, 300, 2, 64))
    assert maps.q.box == maps.dout.box == (64, 128, 1, 1) and maps.dq.box == (32, 64, 1, 1)


def test_tensor_maps_of_the_eighty_query_step():
    """80 queries per step: Q, dO and dQ boxes of 80 rows (each warpgroup reduces a 32-column x 80-row box twice)."""
    cfg = config.Sm90WsBwdConfig(128, True, **config.WS_BWD_ABLATIONS["bm80"])
    q = torch.empty(1, 300, 2, 128, dtype=torch.bfloat16)
    maps = ws_bwd.tensor_maps(cfg, q, q, q, q, torch.empty(1, 300, 2, 128))
    assert maps.q.box == maps.dout.box == (64, 80, 1, 1) and maps.dq.box == (32, 80, 1, 1)
    assert maps.k.box == maps.v.box == (64, 128, 1, 1)


def test_tensor_maps_take_strided_views():
    cfg = config.Sm90WsBwdConfig(64, False)
    base = torch.empty(2, 4, 100, 64, dtype=torch.float16)  # (b, h, s, d) seen as (b, s, h, d)
    q = base.transpose(1, 2)
    m = ws_bwd.tensor_maps(cfg, q, q, q, q, torch.empty(2, 100, 4, 64)).q
    assert m.dims == (64, 100, 4, 2) and m.strides_bytes == (64 * 2, 100 * 64 * 2, 4 * 100 * 64 * 2)


def test_tensor_maps_refuse_what_tma_cannot_describe():
    cfg = config.Sm90WsBwdConfig(128, True)
    good = torch.empty(1, 8, 2, 128, dtype=torch.bfloat16)
    dq = torch.empty(1, 8, 2, 128)
    expanded = torch.empty(1, 8, 1, 128, dtype=torch.bfloat16).expand(1, 8, 2, 128)  # head stride 0
    with pytest.raises(InvalidArgumentError, match="stride"):
        ws_bwd.tensor_maps(cfg, good, expanded, good, good, dq)
    with pytest.raises(InvalidArgumentError, match="contiguous last dim"):
        ws_bwd.tensor_maps(cfg, good, good, good.transpose(2, 3), good, dq)


def test_padded_rows():
    cfg = config.Sm90WsBwdConfig(128, True)
    lse = torch.randn(2, 3, 70)
    lse_p, delta_p = ws_bwd.padded_rows(cfg, lse)
    assert lse_p.shape == delta_p.shape == (2, 3, 128) and lse_p.dtype == torch.float32
    assert torch.equal(lse_p[..., :70], lse) and not lse_p[..., 70:].any() and not delta_p.any()


# ---- the launch ----------------------------------------------------------------------------------------------
@pytest.fixture
def recorder(monkeypatch):
    calls = record_cupy_launches(monkeypatch)
    # The driver encoding needs a GPU; the recorded maps are their checked descriptions instead.
    monkeypatch.setattr(ws_bwd, "encode_maps", lambda maps: list(maps.all()))
    monkeypatch.delenv("ATTNKIT_CUPY_WGMMA", raising=False)
    monkeypatch.setenv("ATTNKIT_CUPY_TMA_BWD", "1")
    return calls


def test_backward_launch_arguments(recorder):
    q = torch.randn(2, 37, 4, 120, dtype=torch.bfloat16)  # head dim 120: padded to 120, kernel 128
    k = torch.randn(2, 200, 2, 120, dtype=torch.bfloat16)
    v = torch.randn(2, 200, 2, 120, dtype=torch.bfloat16)
    out, dout = torch.randn_like(q), torch.randn_like(q)
    lse = torch.randn(2, 4, 37)
    slopes = torch.rand(2, 4)
    params = AttentionParams(softmax_scale=0.1, window_left=8, window_right=3, softcap=30.0)
    dq, dk, dv = cb.CupyCudaBackend().backward(dout, q, k, v, out, lse, slopes, params, None)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert dq.dtype == dk.dtype == dv.dtype == torch.bfloat16
    pre, main = recorder
    cfg = config.sm90_ws_bwd_config(120, torch.bfloat16)
    rows = cfg.lse_len(37)  # one whole query step: 80 rows at d 128
    assert rows == cfg.block_m == 80
    # delta comes from bwd.cu's pre-pass, written into the padded (batch, heads, rows) buffer.
    assert pre["name"] == "attnkit_bwd_pre" and pre["spec"].source == "bwd.cu" and pre["spec"].arch == "sm_90"
    assert pre["grid"] == config.pre_grid(37, 4, 2, 120) and pre["threads"] == config.PRE_THREADS
    pa = pre["args"]
    # O and dO strides, the padded delta's, then the float32 dQ accumulator's (120 columns), which the pre-pass
    # zeroes; 16 lanes per 120-column row.
    assert ints(pa, 4, 8) == [*q.stride()[:3], *q.stride()[:3], 4 * rows, rows]
    assert ints(pa, 12, 3) == [37 * 4 * 120, 4 * 120, 120] and ints(pa, 15, 4) == [37, 4, 120, 16]
    assert main["name"] == ws_bwd.KERNEL and main["spec"].source == ws_bwd.SOURCE
    assert main["spec"].arch == "sm_90a" and dict(main["spec"].defines) == cfg.defines()
    assert main["grid"] == (2, 2, 2) and main["threads"] == 384 and main["smem"] == cfg.smem_bytes
    a = main["args"]
    assert len(a) == 5 + 5 + 4 + 6 + 4 + 4  # the kernel's parameter count
    mq, mk, mv, mdo, mdq = a[:5]
    assert mq.dims == (120, 37, 4, 2) and mk.dims == (120, 200, 2, 2) and mv.box == (64, 128, 1, 1)
    assert mdo.box == (64, 80, 1, 1) and mdq.dims == (120, 37, 4, 2) and mdq.data_type == 7
    assert mq.address == q.data_ptr() and mdo.address == dout.data_ptr()  # aligned inputs go in without a copy
    assert mdq.address == int(pa[3])  # the accumulator the pre-pass zeroed
    assert all(isinstance(x, np.uint64) for x in a[5:10])
    assert int(a[5]) != lse.data_ptr() and int(a[5]) != 0 and int(a[6]) == pa[2]  # padded lse; delta as pre-pass
    assert int(a[7]) == dk.data_ptr() and int(a[8]) == dv.data_ptr() and int(a[9]) == slopes.data_ptr()
    assert all(isinstance(x, np.int64) for x in a[10:14])
    assert ints(a, 10, 4) == [rows, *dk.stride()[:3]]
    assert all(isinstance(x, np.int32) for x in a[14:20]) and ints(a, 14, 6) == [37, 200, 4, 2, 120, 4]
    floats = [float(x) for x in a[20:24]]
    assert floats == pytest.approx([0.1, 0.1 * math.log2(math.e), 0.1 / 30.0, 30.0 * math.log2(math.e)])
    assert ints(a, 24, 4) == [1, 1, 8, 3]


def test_backward_launch_pads_odd_head_dims(recorder):
    q = torch.randn(1, 5, 2, 36, dtype=torch.float16)  # padded to 40 for 16-byte rows, kernel 64
    k = torch.randn(1, 7, 2, 36, dtype=torch.float16)
    dq, dk, _ = cb.CupyCudaBackend().backward(
        q, q, k, k, q, torch.randn(1, 2, 5), None, AttentionParams(softmax_scale=0.2), None
    )
    assert dq.shape == q.shape and dk.shape == k.shape and dk.is_contiguous()
    _, main = recorder
    assert main["name"] == ws_bwd.KERNEL and dict(main["spec"].defines)["ATTNKIT_HEAD_DIM"] == 64
    mq = main["args"][0]
    assert mq.dims == (40, 5, 2, 1) and mq.address != q.data_ptr()  # the padded copy
    assert ints(main["args"], 14, 6) == [5, 7, 2, 1, 40, 0]
    assert int(main["args"][9]) == 0  # no ALiBi


def test_backward_falls_back_when_tma_cannot_map(recorder):
    q = torch.randn(1, 16, 2, 64, dtype=torch.bfloat16)
    k = torch.randn(1, 16, 1, 64, dtype=torch.bfloat16).expand(1, 16, 2, 64)  # stride-0 heads: no tensor map
    cb.CupyCudaBackend().backward(q, q, k, k, q, torch.randn(1, 2, 16), None, AttentionParams(softmax_scale=0.1), None)
    assert [c["name"] for c in recorder] == ["attnkit_bwd_pre", "attnkit_bwd_sm90"]


def test_argument_list_checks():
    t = torch.empty(1, 4, 1, 64, dtype=torch.bfloat16)
    lse = torch.empty(1, 1, 64)
    with pytest.raises(InvalidArgumentError, match="5 tensor maps"):
        ws_bwd.kernel_arguments([], lse, lse, t, t, None, 0, 4, 4, 1, 1, 64, 0.1, (0.1, 0, 0, 0, 0), (-1, -1))
    with pytest.raises(InvalidArgumentError, match="differ"):
        ws_bwd.kernel_arguments(
            [0] * 5, lse, lse, t, t[:, :2], None, 0, 4, 4, 1, 1, 64, 0.1, (0.1, 0, 0, 0, 0), (-1, -1)
        )
    with pytest.raises(InvalidArgumentError, match="32-bit"):
        ws_bwd.kernel_arguments([0] * 5, lse, lse, t, t, None, 0, 2**31, 4, 1, 1, 64, 0.1, (0.1, 0, 0, 0, 0), (-1, -1))
