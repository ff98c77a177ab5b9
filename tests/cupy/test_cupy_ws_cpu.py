"""CPU tests of the warp-specialised Hopper forward's Python side (fwd_sm90_ws.cu): its configuration, when the
backend selects it, and the arguments and tensor maps a launch receives. The launch and the driver's tensor-map
encoder are replaced by recorders; the kernel itself runs in tests/cupy/test_cupy_ws_gpu.py."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
import torch
from attnkit.backends.cupy import backend as cb
from attnkit.backends.cupy import compiler, config, tma, ws_fwd
from helpers import H200_SMEM, ints, record_cupy_tma_launches

from attnkit.errors import EnvironmentVariableError, InvalidArgumentError
from attnkit.params import AttentionParams, VarlenInfo


# ---- configuration ------------------------------------------------------------------------------------------------
def test_default_config_numbers():
    cfg = config.Sm90WsFwdConfig(128, True)
    assert (cfg.block_m, cfg.block_n, cfg.threads) == (128, 128, 384)
    # Q 32 KB + 2 stages of K and V at 32 KB each + 9 barriers + 1 KB alignment slack.
    assert cfg.smem_bytes == (128 + 4 * 128) * 128 * 2 + 72 + 1024
    assert cfg.smem_bytes <= H200_SMEM
    assert cfg.grid(1000, 16, 3) == (8, 16, 3)
    assert cfg.defines() == {
        "ATTNKIT_HEAD_DIM": 128,
        "ATTNKIT_BF16": 1,
        "ATTNKIT_WS_BN": 128,
        "ATTNKIT_WS_PIPE": 1,
        "ATTNKIT_WS_PINGPONG": 1,
        "ATTNKIT_WS_PRODUCER_REGS": 24,
        "ATTNKIT_WS_CONSUMER_REGS": 240,
    }
    small = config.Sm90WsFwdConfig(64, False, block_n=64, pipeline=False, pingpong=True)
    assert small.smem_bytes == (128 + 4 * 64) * 64 * 2 + 72 + 1024
    assert small.defines()["ATTNKIT_WS_PIPE"] == 0 and small.defines()["ATTNKIT_WS_PINGPONG"] == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.block_n = 64  # type: ignore[misc]


def test_three_consumer_warpgroups():
    """FlashAttention-3's head-dim-64 tile: 192 query rows in three consumers, 512 threads, 160 registers each,
    128-key tiles."""
    cfg = config.Sm90WsFwdConfig(64, True, **config.WS_FWD_ABLATIONS["wg3"])
    assert (cfg.consumers, cfg.block_m, cfg.block_n, cfg.threads) == (3, 192, 128, 512)
    assert (cfg.producer_regs, cfg.consumer_regs) == (24, 160)
    # Q 24 KB + 2 stages of K and V at 16 KB each + 9 barriers + 1 KB alignment slack.
    assert cfg.smem_bytes == (192 + 4 * 128) * 64 * 2 + 72 + 1024 <= H200_SMEM
    assert cfg.grid(1000, 16, 3) == (6, 16, 3) and cfg.grid(192, 1, 1) == (1, 1, 1) and cfg.grid(193, 1, 1)[0] == 2
    assert cfg.defines()["ATTNKIT_WS_CONSUMERS"] == 3 and cfg.defines()["ATTNKIT_WS_CONSUMER_REGS"] == 160
    # Two consumers keep the module key they always had (no ATTNKIT_WS_CONSUMERS define).
    assert "ATTNKIT_WS_CONSUMERS" not in config.Sm90WsFwdConfig(64, True).defines()
    assert config.ws_cta_registers(384) == 384 * 168 and config.ws_cta_registers(512) == 512 * 128
    # Head dim 64's default is the three-consumer tile, so its ablations list the two-consumer one instead.
    assert config.sm90_ws_fwd_config(64, torch.bfloat16) == cfg
    assert "wg3" not in config.ws_fwd_ablations(64) and "wg2" in config.ws_fwd_ablations(64)
    assert "wg3" not in config.ws_fwd_ablations(128) and "wg2" not in config.ws_fwd_ablations(128)
    assert "wg3" not in config.fp8_ws_ablations()


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"head_dim": 64, "consumers": 4}, "consumers=4"),
        ({"consumers": 3, "consumer_regs": 160}, "consumers=3 \\(head_dim=128"),
        ({"head_dim": 64, "consumers": 3}, "3 x consumer_regs=240 .* exceed the 65536 registers a 512-thread CTA"),
        ({"head_dim": 64, "consumers": 3, "producer_regs": 40, "consumer_regs": 160}, "65536 registers"),
        ({"head_dim": 96}, "head_dim=96"),
        ({"block_n": 176}, "block_n=176"),
        ({"producer_regs": 20}, "producer_regs=20"),
        ({"consumer_regs": 241}, "consumer_regs=241"),
        ({"producer_regs": 40, "consumer_regs": 240}, "64512 registers a 384-thread CTA"),
        ({"producer_regs": 32, "consumer_regs": 240}, "64512 registers"),  # hung on the H200: above the CTA's share
    ],
)
def test_bad_configs_are_refused_with_the_value(kwargs, needle):
    base = {"head_dim": 128, "bf16": True, **kwargs}
    with pytest.raises(InvalidArgumentError, match=needle):
        config.Sm90WsFwdConfig(**base)


@pytest.mark.parametrize(
    ("head_dim", "kernel_dim"),
    [(8, None), (32, None), (33, 64), (40, 64), (64, 64), (72, 128), (80, 128), (96, 128), (128, 128), (136, None)],
)
def test_head_dim_mapping(head_dim, kernel_dim):
    assert config.ws_kernel_head_dim(head_dim) == kernel_dim
    cfg = config.sm90_ws_fwd_config(head_dim, torch.bfloat16, H200_SMEM)
    assert (cfg.head_dim if cfg else None) == kernel_dim


def test_config_respects_shared_memory():
    need = config.Sm90WsFwdConfig(128, True).smem_bytes
    assert config.sm90_ws_fwd_config(128, torch.bfloat16, need) is not None
    assert config.sm90_ws_fwd_config(128, torch.bfloat16, need - 1) is None
    assert config.sm90_ws_fwd_config(128, torch.float16, None).bf16 is False


# ---- selection ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arch", "wgmma", "tma_env", "expected"),
    [
        ("sm_90", None, None, True),
        ("sm_90", "1", "1", True),
        ("sm_90", None, "0", False),
        ("sm_90", "0", None, False),  # no wgmma at all: the mma.sync kernels
        ("sm_80", None, None, False),
        ("compute_90", None, None, False),  # PTX fallback has no sm_90a code
    ],
)
def test_ws_selection_switches(monkeypatch, arch, wgmma, tma_env, expected):
    for name, value in (("ATTNKIT_CUPY_WGMMA", wgmma), ("ATTNKIT_CUPY_TMA", tma_env)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    cfg = ws_fwd.ws_forward_config(128, torch.bfloat16, arch, H200_SMEM, 4096)
    assert (cfg is not None) == expected


def test_bad_tma_switch_is_rejected(monkeypatch):
    monkeypatch.setenv("ATTNKIT_CUPY_TMA", "sometimes")
    with pytest.raises(EnvironmentVariableError, match="ATTNKIT_CUPY_TMA='sometimes'"):
        ws_fwd.ws_forward_config(128, torch.bfloat16, "sm_90", H200_SMEM, 4096)


@pytest.mark.parametrize(
    ("head_dim", "seqlen_k", "kernel_dim"),
    [(128, 1, 128), (96, 300, 128), (64, 2047, None), (64, 2048, 64), (48, 20000, 64), (40, 100, None)],
)
def test_ws_serves_head_dim_64_only_from_long_keys(monkeypatch, head_dim, seqlen_k, kernel_dim):
    """Kernel head dim 64 runs the warp-specialised forward from SM90_WS_D64_MIN_SEQLEN_K keys on (fwd_sm90 is
    faster below); 128 always."""
    monkeypatch.delenv("ATTNKIT_CUPY_WGMMA", raising=False)
    monkeypatch.delenv("ATTNKIT_CUPY_TMA", raising=False)
    cfg = ws_fwd.ws_forward_config(head_dim, torch.bfloat16, "sm_90", H200_SMEM, seqlen_k)
    assert (cfg.head_dim if cfg is not None else None) == kernel_dim
    if cfg is not None:
        assert cfg.pingpong and cfg.pipeline


def test_tma_ready():
    x = torch.randn(2, 16, 4, 64, dtype=torch.bfloat16)
    assert ws_fwd.tma_ready(x)
    assert ws_fwd.tma_ready(x.transpose(1, 2).contiguous().transpose(1, 2))  # (b, h, s, d) storage viewed as bshd
    assert not ws_fwd.tma_ready(x[..., 1:57])  # misaligned base
    assert not ws_fwd.tma_ready(torch.randn(2, 16, 4, 68, dtype=torch.bfloat16)[..., :64])  # 136-byte row stride
    assert not ws_fwd.tma_ready(x[:, :, :1].expand(2, 16, 4, 64))  # stride 0 over heads
    assert ws_fwd.tma_ready(x[:1, :, :1])  # size-1 dims: their stride is never used
    assert not ws_fwd.tma_ready(x[0])  # not 4-D


# ---- arguments ----------------------------------------------------------------------------------------------------
@pytest.fixture
def recorder(monkeypatch):
    return record_cupy_tma_launches(monkeypatch)


def _kernel_params() -> list[str]:
    """Parameter declarations of the kernel's entry point, read from its source."""
    text = compiler.read_kernel_text("fwd_sm90_ws.cu")
    sig = re.search(r"attnkit_fwd_sm90_ws\(([^)]*)\)", text, re.S)
    assert sig
    return [p.strip() for p in sig.group(1).split(",")]


def test_kernel_parameter_kinds_match_the_arguments():
    params = _kernel_params()
    assert [p.split()[-1] for p in params[:3]] == ["tq", "tk", "tv"]
    assert all("__grid_constant__ ak::TmaMap" in p for p in params[:3])
    # o, lse, alibi, then the three fp8 descales (null for 16-bit inputs).
    kinds = ["map"] * 3 + ["ptr"] * 6 + ["i64"] * 5 + ["i32"] * 5 + ["f32"] * 3 + ["i32"] * 4
    assert len(params) == len(kinds)
    for p, kind in zip(params, kinds):
        ctype = {"map": "TmaMap", "ptr": "*", "i64": "ak::i64", "i32": "int", "f32": "float"}[kind]
        assert ctype in p, (p, kind)


def _map(t: torch.Tensor, rows: int) -> tma.TiledArguments:
    b, n, h, d = t.shape
    return tma.tiled_arguments(
        t.data_ptr(), t.dtype, (d, n, h, b), (t.stride(1), t.stride(2), t.stride(0)), (64, rows, 1, 1)
    )


def test_dense_forward_takes_the_ws_kernel_with_its_arguments(recorder):
    q = torch.randn(2, 37, 4, 128, dtype=torch.bfloat16)
    k = torch.randn(2, 203, 2, 128, dtype=torch.bfloat16)
    v = torch.randn(2, 203, 2, 128, dtype=torch.bfloat16)
    slopes = torch.rand(4)
    params = AttentionParams(softmax_scale=0.125, causal=True, window_left=-1, window_right=0, softcap=5.0)
    out, lse = cb.CupyCudaBackend().forward(q, k, v, slopes, params, None)
    assert out.shape == q.shape and lse.shape == (2, 4, 37)
    (call,) = recorder
    cfg = config.Sm90WsFwdConfig(128, True)
    assert call["name"] == ws_fwd.KERNEL == "attnkit_fwd_sm90_ws"
    assert call["spec"] == compiler.ModuleSpec.make("fwd_sm90_ws.cu", cfg.defines(), "sm_90a")
    assert call["grid"] == (1, 4, 2) and call["threads"] == 384 and call["smem"] == cfg.smem_bytes
    a = call["args"]
    assert len(a) == len(_kernel_params())
    assert a[0] == _map(q, 128) and a[1] == _map(k, 128) and a[2] == _map(v, 128)
    assert a[0].dims == (128, 37, 4, 2) and a[0].box == (64, 128, 1, 1) and a[0].swizzle == 3
    assert a[1].strides_bytes == (2 * 128 * 2, 128 * 2, 203 * 2 * 128 * 2)
    assert all(isinstance(x, np.uint64) for x in a[3:9])
    assert int(a[3]) == out.data_ptr() and int(a[4]) == lse.data_ptr() and int(a[5]) != 0
    assert ints(a, 6, 3) == [0, 0, 0]  # no descales for 16-bit inputs
    assert all(isinstance(x, np.int64) for x in a[9:14])
    assert ints(a, 9, 5) == [*out.stride()[:3], 4 * 37, 37]
    assert ints(a, 14, 5) == [37, 203, 2, 128, 0]
    floats = [float(x) for x in a[19:22]]
    assert floats == pytest.approx([0.125 * math.log2(math.e), 0.125 / 5.0, 5.0 * math.log2(math.e)])
    assert ints(a, 22, 4) == [1, 1, -1, 0]


def test_strided_inputs_map_their_own_strides(recorder):
    # q in (b, h, s, d) storage viewed as (b, s, h, d): TMA walks the real strides, nothing is copied.
    # Head dim 64 takes this kernel from SM90_WS_D64_MIN_SEQLEN_K keys on.
    n = config.SM90_WS_D64_MIN_SEQLEN_K
    q = torch.randn(3, 6, 50, 64, dtype=torch.float16).transpose(1, 2)
    kv = torch.randn(3, n, 2, 2, 64, dtype=torch.float16)  # packed K and V
    k, v = kv[:, :, 0], kv[:, :, 1]
    cb.CupyCudaBackend().forward(q, k, v, None, AttentionParams(softmax_scale=0.1), None)
    (call,) = recorder
    a = call["args"]
    assert a[0].address == q.data_ptr() and a[0].strides_bytes == (64 * 2, 50 * 64 * 2, 6 * 50 * 64 * 2)
    assert a[1].address == k.data_ptr() and a[2].address == v.data_ptr()
    assert a[1].strides_bytes == (2 * 2 * 64 * 2, 64 * 2, n * 2 * 2 * 64 * 2)
    rows = config.sm90_ws_fwd_config(64, torch.float16).block_m
    assert a[0].box == (64, rows, 1, 1) and a[1].box == (64, 128, 1, 1)
    assert dict(call["spec"].defines)["ATTNKIT_HEAD_DIM"] == 64 and dict(call["spec"].defines)["ATTNKIT_BF16"] == 0


@pytest.mark.parametrize("consumers", [2, 3])
def test_head_dim_64_launches_its_tile(recorder, monkeypatch, consumers):
    """WS_FWD_TILES picks the head-dim-64 tile: its Q box, grid, threads and module follow the consumer count."""
    change = {} if consumers == 2 else config.WS_FWD_ABLATIONS["wg3"]
    monkeypatch.setitem(config.WS_FWD_TILES, 64, change)
    n = config.SM90_WS_D64_MIN_SEQLEN_K
    q = torch.randn(2, 500, 4, 64, dtype=torch.bfloat16)
    k = torch.randn(2, n, 2, 64, dtype=torch.bfloat16)
    cb.CupyCudaBackend().forward(q, k, k, None, AttentionParams(softmax_scale=0.1, causal=True), None)
    (call,) = recorder
    cfg = config.Sm90WsFwdConfig(64, True, **change)
    assert cfg.consumers == consumers and config.sm90_ws_fwd_config(64, torch.bfloat16) == cfg
    assert call["spec"] == compiler.ModuleSpec.make("fwd_sm90_ws.cu", cfg.defines(), "sm_90a")
    assert call["grid"] == (math.ceil(500 / (64 * consumers)), 4, 2)
    assert call["threads"] == 128 * (1 + consumers) and call["smem"] == cfg.smem_bytes
    assert call["args"][0].box == (64, 64 * consumers, 1, 1) and call["args"][1].box == (64, cfg.block_n, 1, 1)


def test_size_one_dims_get_a_legal_stride(recorder):
    q = torch.randn(1, 40, 1, 128, dtype=torch.bfloat16)
    k = torch.randn(1, 40, 1, 256, dtype=torch.bfloat16)[..., :128]  # batch and head strides are irrelevant
    cb.CupyCudaBackend().forward(q, k, k, None, AttentionParams(softmax_scale=0.1), None)
    (call,) = recorder
    assert call["args"][1].strides_bytes == (256 * 2, 128 * 2, 40 * 128 * 2)


def test_head_dim_80_runs_on_the_128_kernel_unpadded(recorder):
    q = torch.randn(2, 64, 4, 80, dtype=torch.bfloat16)
    out, _ = cb.CupyCudaBackend().forward(q, q, q, None, AttentionParams(softmax_scale=0.1), None)
    (call,) = recorder
    assert dict(call["spec"].defines)["ATTNKIT_HEAD_DIM"] == 128
    # The map covers the 80 real columns; TMA zero-fills 80..127 of the second slab.
    assert call["args"][0].dims == (80, 64, 4, 2) and ints(call["args"], 17, 1) == [80]
    assert out.shape == q.shape


def test_varlen_and_odd_tensors_keep_fwd_sm90(recorder):
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    x = torch.randn(8, 2, 64, dtype=torch.bfloat16)
    cb.CupyCudaBackend().forward(x, x, x, None, AttentionParams(softmax_scale=0.1), VarlenInfo(cu, cu, 5, 5))
    q = torch.randn(2, 16, 4, 64, dtype=torch.bfloat16)
    k = torch.randn(2, 16, 1, 64, dtype=torch.bfloat16).expand(2, 16, 4, 64)  # stride-0 heads: not TMA-readable
    cb.CupyCudaBackend().forward(q, k, k, None, AttentionParams(softmax_scale=0.1), None)
    assert [c["name"] for c in recorder] == ["attnkit_fwd_sm90", "attnkit_fwd_sm90"]


def test_tma_switch_off_keeps_fwd_sm90(recorder, monkeypatch):
    monkeypatch.setenv("ATTNKIT_CUPY_TMA", "0")
    q = torch.randn(2, 16, 4, 128, dtype=torch.bfloat16)
    cb.CupyCudaBackend().forward(q, q, q, None, AttentionParams(softmax_scale=0.1), None)
    assert [c["name"] for c in recorder] == ["attnkit_fwd_sm90"]


def test_ws_source_builds_only_for_sm90a():
    from attnkit.errors import BackendCompileError

    with pytest.raises(BackendCompileError, match="sm_90a"):
        compiler.ModuleSpec.make("fwd_sm90_ws.cu", {}, "sm_90")
    assert "tma.cuh" in compiler.HEADERS and "fwd_sm90_ws.cu" in compiler.SM90A_SOURCES
