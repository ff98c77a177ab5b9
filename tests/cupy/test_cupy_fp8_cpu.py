"""CPU tests of the CuPy fp8 forward's Python side (fwd_sm90_ws.cu with ATTNKIT_FP8, and the V^T pass fp8_vt.cu):
its configuration, where the backend offers it, the arguments and tensor maps of its two launches, and the key
permutation that lets P go from the S accumulators into e4m3 A fragments in place. The kernels themselves run in
tests/cupy/test_cupy_fp8_gpu.py."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from attnkit.backends.cupy import backend as cb
from attnkit.backends.cupy import compiler, config, ws_fwd
from helpers import H200_SMEM, ints, record_cupy_tma_launches

from attnkit.errors import BackendUnsupportedError, InvalidArgumentError
from attnkit.fp8 import FP8_DTYPE, Fp8Scales
from attnkit.params import AttentionParams, VarlenInfo
from attnkit.spec import AttentionSpec


# ---- configuration ------------------------------------------------------------------------------------------------
def test_fp8_config_numbers():
    cfg = config.fp8_ws_fwd_config(128, torch.bfloat16, H200_SMEM)
    assert cfg == config.Sm90WsFwdConfig(128, True, fp8=True)
    # Q 16 KB + 2 stages of K and V^T at 16 KB each (one byte per value) + 9 barriers + 1 KB alignment slack.
    assert cfg.smem_bytes == (128 + 4 * 128) * 128 + 72 + 1024
    assert cfg.defines()["ATTNKIT_FP8"] == 1 and cfg.defines()["ATTNKIT_OUT_F32"] == 0
    f32 = config.fp8_ws_fwd_config(64, torch.float32)
    assert f32.out_f32 and f32.head_dim == 128 and f32.defines()["ATTNKIT_OUT_F32"] == 1
    assert config.fp8_ws_fwd_config(16, torch.float16).defines()["ATTNKIT_BF16"] == 0
    # The 16-bit kernels keep their macro set (and so their module keys and disk caches).
    assert "ATTNKIT_FP8" not in config.Sm90WsFwdConfig(128, True).defines()


@pytest.mark.parametrize("head_dim", [8, 72, 120, 144, 256])
def test_fp8_config_covers_multiples_of_16_up_to_128(head_dim):
    assert config.fp8_ws_fwd_config(head_dim, torch.bfloat16) is None


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"head_dim": 64, "fp8": True}, "head_dim=64"),
        ({"block_n": 64, "fp8": True}, "block_n=64"),
        ({"out_f32": True}, "out_f32 applies to the fp8 forward only"),
    ],
)
def test_bad_fp8_configs_are_refused(kwargs, needle):
    with pytest.raises(InvalidArgumentError, match=needle):
        config.Sm90WsFwdConfig(**{"head_dim": 128, "bf16": True, **kwargs})


def test_vt_padding_and_grid():
    assert [config.fp8_vt_keys(n) for n in (1, 32, 33, 203)] == [32, 32, 64, 224]
    assert config.fp8_vt_grid(224, 3, 2) == (4, 3, 2)


# ---- the key permutation ------------------------------------------------------------------------------------------
def test_vt_permutation_matches_the_kernel_source():
    """The Python mirror of fp8_vt.cu's key_of_slot is the source's formula."""
    text = compiler.read_kernel_text("fp8_vt.cu")
    assert "return (slot & 16) + 2 * t + (j & 1) + 8 * (j >> 1);" in text
    assert sorted(ws_fwd.vt_key_of_slot(s) for s in range(32)) == list(range(32))


def _packed_p_times_vt(s_tile: torch.Tensor, vt: torch.Tensor) -> torch.Tensor:
    """P V of one warp's 16 rows as the fp8 kernel forms it: P leaves the m64nN accumulator layout through
    pack_p's indexing (FwdWsKernel::pack_p, FP8) into e4m3 A fragments (PTX's layout for k32 8-bit A), which meet
    V^T's columns slot by slot."""
    rows, keys = s_tile.shape
    a = torch.zeros(rows, keys, dtype=s_tile.dtype)  # A operand: row x k-slot
    for lane in range(32):
        g_row, t = lane // 4, lane % 4

        def acc(group: int, e: int, g_row: int = g_row, t: int = t) -> float:  # accumulator s[group][e]
            return s_tile[g_row + 8 * (e >= 2), 8 * group + 2 * t + (e & 1)]

        for kk in range(keys // 32):
            for r in range(4):
                g, e = 4 * kk + 2 * (r >> 1), 2 * (r & 1)
                packed = (acc(g, e), acc(g, e + 1), acc(g + 1, e), acc(g + 1, e + 1))  # pack4_e4m3, byte 0 first
                for byte, value in enumerate(packed):
                    a[g_row + 8 * (r & 1), 32 * kk + 16 * (r >> 1) + 4 * t + byte] = value
    return a @ vt.T  # slots of A against slots of V^T's rows


def test_p_fragments_meet_their_keys_in_vt():
    gen = torch.Generator().manual_seed(0)
    s_tile = torch.randn(16, 128, generator=gen, dtype=torch.float64)
    v = torch.randn(128, 24, generator=gen, dtype=torch.float64)
    order = [s - s % 32 + ws_fwd.vt_key_of_slot(s % 32) for s in range(128)]
    vt = v[order].T  # channel x slot, as transposed_v lays it out
    torch.testing.assert_close(_packed_p_times_vt(s_tile, vt), s_tile @ v)


def test_transposed_v_reference_pads_and_permutes():
    v = torch.arange(2 * 37 * 3 * 16, dtype=torch.float32).view(2, 37, 3, 16).remainder(200).to(FP8_DTYPE)
    vt = ws_fwd.transposed_v_reference(v)
    assert vt.shape == (2, 3, 16, 64) and vt.dtype == FP8_DTYPE and vt.is_contiguous()
    raw, src = vt.view(torch.uint8), v.view(torch.uint8)
    for slot in range(64):
        key = slot - slot % 32 + ws_fwd.vt_key_of_slot(slot % 32)
        # raw[b, h, c, slot] is v[b, key, h, c]; keys 37..63 are padding and read as zeros.
        expected = src[:, key] if key < 37 else torch.zeros_like(src[:, 0])
        assert torch.equal(raw[..., slot], expected), slot


# ---- where the backend offers it ----------------------------------------------------------------------------------
def _spec(**kw) -> AttentionSpec:
    base = dict(op="attention", device_type="cuda", compute_capability=(9, 0), is_hip=False, dtype=FP8_DTYPE,
                head_dim=128, head_dim_v=128, num_heads_q=8, num_heads_k=2, batch=2, seqlen_q=4096, seqlen_k=4096,
                features=frozenset({"fp8", "gqa"}))  # fmt: skip
    return AttentionSpec(**{**base, **kw})


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"op": "varlen"}, "dense attention calls only"),
        ({"compute_capability": (8, 9)}, "needs a Hopper GPU"),
        ({"compute_capability": (10, 0)}, "needs a Hopper GPU"),
        ({"head_dim": 72, "head_dim_v": 72}, "head_dim=72"),
        ({"head_dim": 256, "head_dim_v": 256}, "head_dim=256"),
    ],
)
def test_fp8_reasons(change, needle):
    reasons = cb.CupyCudaBackend._fp8_why_not(_spec(**change))
    assert any(needle in r for r in reasons), reasons
    assert cb.CupyCudaBackend._fp8_why_not(_spec()) == []


def test_fp8_reasons_follow_the_kernel_switches(monkeypatch):
    monkeypatch.setenv("ATTNKIT_CUPY_TMA", "0")
    assert any("ATTNKIT_CUPY_TMA" in r for r in cb.CupyCudaBackend._fp8_why_not(_spec()))


def test_capabilities_declare_fp8():
    caps = cb.CupyCudaBackend.capabilities
    assert FP8_DTYPE in caps.dtypes and "fp8" in caps.features


# ---- the two launches ---------------------------------------------------------------------------------------------
@pytest.fixture
def recorder(monkeypatch):
    return record_cupy_tma_launches(monkeypatch)


def _scales(b: int, hk: int, out_dtype=torch.bfloat16) -> Fp8Scales:
    return Fp8Scales(*(torch.rand(b, hk) + 0.5 for _ in range(3)), out_dtype=out_dtype)


def _fp8(*shape) -> torch.Tensor:
    return torch.randn(*shape).to(FP8_DTYPE)


def test_fp8_forward_launches_the_vt_pass_then_the_kernel(recorder):
    q, k, v = _fp8(2, 37, 4, 128), _fp8(2, 203, 2, 128), _fp8(2, 203, 2, 128)
    scales = _scales(2, 2)
    params = AttentionParams(softmax_scale=0.125, causal=True)
    out, lse = cb.CupyCudaBackend().forward_fp8(q, k, v, None, params, None, scales)
    assert out.shape == q.shape and out.dtype == torch.bfloat16 and lse.shape == (2, 4, 37)
    vt_call, ws_call = recorder
    # V^T pass: 224 padded keys in CTAs of 64, per (KV head, batch).
    assert vt_call["name"] == "attnkit_fp8_vt" and vt_call["spec"].source == "fp8_vt.cu"
    assert vt_call["spec"].arch == "sm_90" and vt_call["grid"] == (4, 2, 2) and vt_call["threads"] == 256
    va = vt_call["args"]
    assert int(va[0]) == v.data_ptr() and ints(va, 2, 3) == list(v.stride()[:3]) and ints(va, 5, 3) == [203, 224, 128]
    # The forward: fp8 module, 128-byte boxes of 128 values, V^T's map, the descales' addresses.
    cfg = config.Sm90WsFwdConfig(128, True, fp8=True)
    assert ws_call["spec"] == compiler.ModuleSpec.make("fwd_sm90_ws.cu", cfg.defines(), "sm_90a")
    assert ws_call["smem"] == cfg.smem_bytes and ws_call["grid"] == (1, 4, 2)
    a = ws_call["args"]
    assert a[0].box == (128, 128, 1, 1) and a[0].dims == (128, 37, 4, 2) and a[0].data_type == 0
    assert a[1].strides_bytes == (2 * 128, 128, 203 * 2 * 128)
    assert a[2].address == int(va[1]) and a[2].dims == (224, 128, 2, 2) and a[2].box == (128, 128, 1, 1)
    assert a[2].strides_bytes == (224, 128 * 224, 2 * 128 * 224)
    assert [int(x) for x in a[6:9]] == [s.data_ptr() for s in (scales.q_descale, scales.k_descale, scales.v_descale)]
    assert ints(a, 14, 5) == [37, 203, 2, 128, 0]


def test_fp8_float32_output_and_small_head_dim(recorder):
    q = _fp8(1, 64, 2, 48)
    out, _ = cb.CupyCudaBackend().forward_fp8(q, q, q, None, AttentionParams(softmax_scale=0.1), None,
                                              _scales(1, 2, torch.float32))  # fmt: skip
    assert out.dtype == torch.float32 and out.shape == q.shape
    ws_call = recorder[1]
    defines = dict(ws_call["spec"].defines)
    assert defines["ATTNKIT_OUT_F32"] == 1 and defines["ATTNKIT_HEAD_DIM"] == 128
    # 48 real columns; TMA zero-fills the rest of each 128-byte box row, and V^T's map has 48 channel rows.
    assert ws_call["args"][0].dims == (48, 64, 2, 1) and ws_call["args"][2].dims == (64, 48, 2, 1)


def test_fp8_strided_v_is_read_in_place_and_unaligned_v_copied(recorder):
    kv = _fp8(1, 100, 2, 2, 64)
    q = _fp8(1, 100, 2, 64)
    cb.CupyCudaBackend().forward_fp8(q, kv[:, :, 0], kv[:, :, 1], None, AttentionParams(softmax_scale=0.1), None,
                                     _scales(1, 2))  # fmt: skip
    assert int(recorder[0]["args"][0]) == kv[:, :, 1].data_ptr()
    recorder.clear()
    odd = _fp8(1, 100, 2, 65)[..., 1:]  # base one byte past 16-byte alignment
    cb.CupyCudaBackend().forward_fp8(q, q, odd, None, AttentionParams(softmax_scale=0.1), None, _scales(1, 2))
    assert int(recorder[0]["args"][0]) != odd.data_ptr()


def test_fp8_contiguous_but_misaligned_inputs_are_copied(recorder):
    flat = _fp8(1 + 100 * 2 * 64)
    odd = flat[1:].view(1, 100, 2, 64)  # contiguous, one byte past 16-byte alignment
    assert odd.is_contiguous() and odd.data_ptr() % 16
    cb.CupyCudaBackend().forward_fp8(odd, odd, odd, None, AttentionParams(softmax_scale=0.1), None, _scales(1, 2))
    vt_call, ws_call = recorder
    assert int(vt_call["args"][0]) % 16 == 0 and int(vt_call["args"][0]) != odd.data_ptr()
    assert ws_call["args"][0].address % 16 == 0 and ws_call["args"][1].address % 16 == 0


def test_fp8_refuses_varlen_and_uncovered_head_dims(recorder):
    q = _fp8(1, 8, 2, 72)
    with pytest.raises(BackendUnsupportedError, match="head_dim=72"):
        cb.CupyCudaBackend().forward_fp8(q, q, q, None, AttentionParams(softmax_scale=0.1), None, _scales(1, 2))
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    packed = _fp8(8, 2, 64)
    with pytest.raises(BackendUnsupportedError, match="varlen"):
        cb.CupyCudaBackend().forward_fp8(packed, packed, packed, None, AttentionParams(softmax_scale=0.1),
                                         VarlenInfo(cu, cu, 5, 5), _scales(2, 2))  # fmt: skip
    assert recorder == []


def test_16bit_arguments_refuse_descales_and_fp8_needs_them():
    cfg = config.Sm90WsFwdConfig(128, True)
    x = torch.randn(1, 8, 1, 128, dtype=torch.bfloat16)
    with pytest.raises(InvalidArgumentError, match="descales"):
        ws_fwd.ws_forward_args(x, x, x, x, x, None, 0, AttentionParams(softmax_scale=0.1), cfg, _scales(1, 1))


def test_vt_kernel_parameters_match_the_arguments():
    text = compiler.read_kernel_text("fp8_vt.cu")
    sig = re.search(r"attnkit_fp8_vt\(([^)]*)\)", text, re.S)
    params = [p.strip() for p in sig.group(1).split(",")]
    v = _fp8(1, 40, 1, 32)
    args = ws_fwd.transposed_v_args(v, ws_fwd.transposed_v_reference(v))
    assert len(params) == len(args) == 8
    kinds = [np.uint64] * 2 + [np.int64] * 3 + [np.int32] * 3
    assert [type(a) for a in args] == kinds
    assert all(("*" in p) == (kind is np.uint64) for p, kind in zip(params, kinds))


# ---- the polynomial exponential (poly_exp2, common.cuh) -----------------------------------------------------------
def _poly_exp2_from_source():
    """poly_exp2's arithmetic in float32 numpy, with the constants read from common.cuh (so the shipped
    coefficients are what is checked)."""
    text = compiler.read_kernel_text("common.cuh")
    body = text[text.index("float poly_exp2(float x)") :]
    body = body[: body.index("\n}\n")]
    coeffs = [np.float32(c) for c in re.findall(r"fmaf\(fmaf\(fmaf\(([-\d.e]+)f, f, ([-\d.e]+)f\), f, ([-\d.e]+)f\), "
                                                r"f, ([-\d.e]+)f\)", body)[0]]  # fmt: skip
    assert "0fC2FC0000" in body and "12582912.f" in body and "<< 23) + 0x3F800000" in body
    c3, c2, c1, c0 = coeffs
    shifter = np.float32(12582912.0)

    def poly(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32)
        x = np.where(np.isnan(x), x, np.maximum(x, np.float32(-126.0)))  # max.NaN
        t = (x + shifter).astype(np.float32)
        f = (x - (t - shifter)).astype(np.float32)
        p = ((c3 * f + c2) * f + c1) * f + c0
        with np.errstate(over="ignore"):
            bits = ((t.view(np.uint32).astype(np.uint64) << 23) + 0x3F800000) & 0xFFFFFFFF
        return (p * bits.astype(np.uint32).view(np.float32)).astype(np.float32)

    return poly


def test_poly_exp2_is_within_its_stated_error():
    poly = _poly_exp2_from_source()
    x = np.concatenate([np.linspace(-126, 8.5, 400001), np.arange(-126, 9, 0.5)]).astype(np.float32)
    got = poly(x).astype(np.float64)
    exact = np.exp2(x.astype(np.float64))
    assert np.max(np.abs(got / exact - 1)) < 1e-4  # the comment says 7.5e-5
    # Below -126 it stops at 2^-126 (a probability that small is 0 to every use); NaN stays NaN.
    low = poly(np.array([-127.0, -1e6, -np.inf], dtype=np.float32))
    assert np.all(low <= np.float32(2.0**-126) * 1.001) and np.all(low > 0)
    assert np.isnan(poly(np.array([np.nan], dtype=np.float32)))[0]


def test_poly_exp_variants_are_configured_and_listed():
    cfg = config.Sm90WsFwdConfig(128, True, fp8=True, poly_exp=2)
    assert cfg.defines()["ATTNKIT_WS_POLY_EXP"] == 2
    assert "ATTNKIT_WS_POLY_EXP" not in config.Sm90WsFwdConfig(128, True).defines()
    with pytest.raises(InvalidArgumentError, match="poly_exp=5"):
        config.Sm90WsFwdConfig(128, True, poly_exp=5)
    # The fp8 forward takes every ablation but the other key-tile width.
    assert set(config.fp8_ws_ablations()) == set(config.WS_FWD_ABLATIONS) - {"bn64", "wg3", "wg2"}
