"""CPU tests of the arguments every cp.async / wgmma kernel launch receives (backends/cupy/args.py, through
CupyCudaBackend.forward/backward with the GPU launch replaced by a recorder)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from attnkit.backends.cupy import args, compiler, config, tma, ws_bwd, ws_fwd
from attnkit.backends.cupy import backend as cb
from helpers import ints, record_cupy_launches

from attnkit.fp8 import Fp8Scales
from attnkit.params import AttentionParams, VarlenInfo


@pytest.fixture
def recorder(monkeypatch):
    calls = record_cupy_launches(monkeypatch)
    return calls


@pytest.mark.parametrize("wgmma", [True, False])
def test_forward_dense_arguments(recorder, monkeypatch, wgmma):
    monkeypatch.setenv("ATTNKIT_CUPY_WGMMA", "1" if wgmma else "0")
    monkeypatch.setenv("ATTNKIT_CUPY_TMA", "0")  # the TMA kernel's arguments: test_cupy_ws_cpu.py
    q = torch.randn(2, 37, 4, 64, dtype=torch.bfloat16)
    k = torch.randn(2, 53, 2, 64, dtype=torch.bfloat16)
    v = torch.randn(2, 53, 2, 64, dtype=torch.bfloat16)
    slopes = torch.rand(4)
    params = AttentionParams(softmax_scale=0.125, causal=True, window_left=-1, window_right=0, softcap=5.0)
    out, lse = cb.CupyCudaBackend().forward(q, k, v, slopes, params, None)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (2, 4, 37) and lse.dtype == torch.float32
    (call,) = recorder
    if wgmma:  # sm_90 with head dim 64: the Hopper kernel, built for the arch-specific target
        cfg = config.sm90_fwd_config(64, torch.bfloat16)
        assert call["name"] == "attnkit_fwd_sm90" and call["spec"].source == "fwd_sm90.cu"
        assert dict(call["spec"].defines) == cfg.defines() and call["spec"].arch == "sm_90a"
    else:
        cfg = config.fwd_config(64, torch.bfloat16)
        assert call["name"] == "attnkit_fwd" and call["spec"].source == "fwd.cu"
        assert dict(call["spec"].defines) == cfg.defines() and call["spec"].arch == "sm_90"
    assert call["grid"] == (math.ceil(37 / cfg.block_m), 4, 2) and call["threads"] == cfg.threads
    assert call["smem"] == cfg.smem_bytes
    a = call["args"]
    assert all(isinstance(x, np.uint64) for x in a[:8])
    assert [int(x) for x in a[:3]] == [q.data_ptr(), k.data_ptr(), v.data_ptr()]
    assert int(a[3]) == out.data_ptr() and int(a[4]) == lse.data_ptr()
    assert int(a[5]) == 0 and int(a[6]) == 0  # no cu_seqlens
    assert all(isinstance(x, np.int64) for x in a[8:22])
    assert ints(a, 8, 14) == [*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], 4 * 37, 37]
    assert ints(a, 22, 5) == [37, 53, 2, 64, 0]
    floats = [float(x) for x in a[27:30]]
    assert floats == pytest.approx([0.125 * math.log2(math.e), 0.125 / 5.0, 5.0 * math.log2(math.e)])
    assert ints(a, 30, 4) == [1, 1, -1, 0]
    assert len(a) == 34  # the kernel's parameter count


def test_forward_varlen_and_padding(recorder):
    lens_q, lens_k = [3, 0, 5], [4, 2, 6]
    cu_q = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 6, 12], dtype=torch.int32)
    q = torch.randn(sum(lens_q), 6, 36, dtype=torch.float16)  # head dim 36 -> padded to 40
    k = torch.randn(sum(lens_k), 3, 36, dtype=torch.float16)
    v = torch.randn(sum(lens_k), 3, 36, dtype=torch.float16)
    slopes = torch.rand(3, 6)
    info = VarlenInfo(cu_q, cu_k, 5, 6)
    out, lse = cb.CupyCudaBackend().forward(q, k, v, slopes, AttentionParams(softmax_scale=0.2), info)
    assert out.shape == q.shape and out.is_contiguous() and lse.shape == (6, 8)
    assert bool(lse.isneginf().all())  # allocated as -inf: tokens outside every sequence stay that way
    (call,) = recorder
    a = call["args"]
    assert int(a[5]) == cu_q.data_ptr() and int(a[6]) == cu_k.data_ptr()
    assert ints(a, 8, 3) == [0, 6 * 40, 40]  # q copied with its head dim padded to 40
    assert ints(a, 20, 2) == [0, 8]  # lse (Hq, total_q)
    assert ints(a, 22, 5) == [5, 6, 2, 40, 6]  # max lens, GQA group, padded dim, alibi batch stride
    assert call["grid"][1:] == (6, 3)


@pytest.mark.parametrize("wgmma", [True, False])
def test_backward_arguments(recorder, monkeypatch, wgmma):
    monkeypatch.setenv("ATTNKIT_CUPY_WGMMA", "1" if wgmma else "0")
    monkeypatch.setenv("ATTNKIT_CUPY_TMA_BWD", "0")  # the warp-specialized kernel: test_cupy_ws_bwd_cpu.py
    q = torch.randn(2, 37, 4, 128, dtype=torch.float16)
    k = torch.randn(2, 50, 1, 128, dtype=torch.float16)
    v = torch.randn(2, 50, 1, 128, dtype=torch.float16)
    out = torch.randn_like(q)
    dout = torch.randn_like(q)
    lse = torch.randn(2, 4, 37)
    params = AttentionParams(softmax_scale=0.1, window_left=8, window_right=3)
    dq, dk, dv = cb.CupyCudaBackend().backward(dout, q, k, v, out, lse, None, params, None)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert dq.dtype == dk.dtype == dv.dtype == torch.float16
    pre, main = recorder
    assert pre["name"] == "attnkit_bwd_pre" and pre["smem"] == 0
    assert pre["spec"].source == "bwd.cu" and pre["spec"].arch == "sm_90"
    assert pre["grid"] == config.pre_grid(37, 4, 2, 128) and pre["threads"] == config.PRE_THREADS
    # The pre-pass zeroes the float32 dQ accumulator (37 rows x 4 heads x 128 columns per batch) that main adds to.
    assert int(pre["args"][3]) == int(main["args"][6]) != 0
    assert [int(x) for x in pre["args"][12:15]] == [37 * 4 * 128, 4 * 128, 128]
    assert [int(x) for x in pre["args"][15:19]] == [37, 4, 128, 16]
    if wgmma:
        cfg = config.sm90_bwd_config(128, torch.float16)
        assert main["name"] == "attnkit_bwd_sm90" and main["spec"].source == "bwd_sm90.cu"
        assert main["spec"].arch == "sm_90a" and main["threads"] == 128
    else:
        cfg = config.bwd_config(128, torch.float16)
        assert main["name"] == "attnkit_bwd" and pre["spec"] == main["spec"]
    assert main["grid"] == (math.ceil(50 / cfg.block_n), 1, 2) and main["smem"] == cfg.smem_bytes
    a = main["args"]
    assert len(a) == 12 + 20 + 5 + 4 + 4
    assert ints(a, 12, 3) == list(q.stride()[:3]) and ints(a, 24, 2) == [4 * 37, 37]
    assert ints(a, 32, 5) == [37, 50, 4, 128, 0]
    assert float(a[37]) == pytest.approx(0.1)
    assert ints(a, 41, 4) == [0, 0, 8, 3]


def test_kernel_ready_keeps_aligned_views_and_copies_others():
    x = torch.randn(2, 8, 16, 64, dtype=torch.float16)
    view = x.transpose(1, 2)  # strides are multiples of 8 elements: passed as is
    assert args.kernel_ready(view, 64).data_ptr() == view.data_ptr()
    odd = torch.randn(2, 5, 3, 70, dtype=torch.float16)[..., 1:65]  # misaligned start and strides
    fixed = args.kernel_ready(odd, 64)
    assert fixed.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in fixed.stride()[:-1])
    assert torch.equal(fixed, odd)
    padded = args.kernel_ready(torch.ones(1, 2, 3, 36, dtype=torch.float16), 40)
    assert padded.shape[-1] == 40 and bool((padded[..., 36:] == 0).all())


# ---- every argument list against its kernel's parameter list, read from the .cu source ----------------------------
def _entry_points() -> dict[str, list[tuple[str, str]]]:
    """Kernel name -> [(kind, parameter name)] of every ``extern "C"`` entry point of every source."""
    kernels = {}
    for source in compiler.SOURCES:
        text = compiler.read_kernel_text(source)
        for name, params in re.findall(r'extern "C" __global__ void[^\n]*\n\s*(attnkit_\w+)\(([^)]*)\)', text):
            decls = [" ".join(p.split()) for p in params.split(",")]
            kernels[name] = [(_param_kind(p), p.split()[-1].lstrip("*")) for p in decls]
    return kernels


def _param_kind(decl: str) -> str:
    if "TmaMap" in decl:
        return "map"
    if "*" in decl:
        return "ptr"
    kinds = {"ak::i64": "i64", "int": "i32", "float": "f32"}
    kind = kinds.get(decl.rsplit(" ", 1)[0])
    assert kind, f"unknown kernel parameter type in {decl!r}"
    return kind


def _arg_kind(x) -> str:
    if isinstance(x, tma.TiledArguments):  # what the encoder would turn into the 128-byte map
        return "map"
    kinds = {np.uint64: "ptr", np.int64: "i64", np.int32: "i32", np.float32: "f32"}
    return kinds[type(x)]


def _t(*shape, dtype=torch.float16) -> torch.Tensor:
    return torch.randn(*shape).to(dtype)


def _built_arguments(monkeypatch) -> dict[str, tuple[list, dict[str, torch.Tensor | None]]]:
    """Kernel name -> (its argument list from the builder the backend uses, the tensor each pointer must carry)."""
    monkeypatch.setattr(tma, "encode", lambda description: description)
    params = AttentionParams(softmax_scale=0.1, window_left=3, window_right=0, softcap=2.0)
    b, sq, sk, hq, hk, d = 2, 37, 53, 4, 2, 64
    q, out, dout = _t(b, sq, hq, d), _t(b, sq, hq, d), _t(b, sq, hq, d)
    k, v = _t(b, sk, hk, d), _t(b, sk, hk, d)
    lse, delta = torch.randn(b, hq, sq), torch.randn(b, hq, sq)
    dq_acc = torch.zeros(b, sq, hq, d)
    dk, dv = _t(b, sk, hk, d), _t(b, sk, hk, d)
    alibi = torch.rand(hq)
    cu_q, cu_k = torch.tensor([0, 3], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32)
    fwd = args.forward_args(q, k, v, out, lse, (hq * sq, sq), None, None, alibi, 0, sq, sk, d, params)
    fwd_ptrs = dict(q=q, k=k, v=v, o=out, lse=lse, cu_q=None, cu_k=None, alibi=alibi)
    var = args.forward_args(q[0], k[0], v[0], out[0], lse[0], (0, sq), cu_q, cu_k, None, 0, 3, 5, d, params)
    var_ptrs = dict(q=q[0], k=k[0], v=v[0], o=out[0], lse=lse[0], cu_q=cu_q, cu_k=cu_k, alibi=None)
    pre = args.backward_pre_args(out, dout, delta, dq_acc, False, (hq * sq, sq), sq, hq, d)
    bwd = args.backward_args(
        q, k, v, dout, lse, delta, (hq * sq, sq), dq_acc, dk, dv, None, None, alibi, 0, sq, sk, d, params
    )
    bwd_ptrs = dict(
        q=q, k=k, v=v, dout=dout, lse=lse, delta=delta, dq_acc=dq_acc, dk=dk, dv=dv, cu_q=None, cu_k=None, alibi=alibi
    )
    bf = torch.bfloat16
    wq, wk = _t(b, sq, hq, 128, dtype=bf), _t(b, sk, hk, 128, dtype=bf)
    wout = torch.empty(b, sq, hq, 128, dtype=bf)
    # The forward's fp8 form (its descale pointers set; tests/cupy/test_cupy_ws_cpu.py checks the 16-bit form's nulls).
    f8 = torch.float8_e4m3fn
    q8, k8, v8 = wq.to(f8), wk.to(f8), wk.to(f8)
    vt = ws_fwd.transposed_v_reference(v8)
    scales = Fp8Scales(*(torch.rand(b, hk) for _ in range(3)), out_dtype=bf)
    fcfg = config.fp8_ws_fwd_config(128, bf)
    ws_f = ws_fwd.ws_forward_args(q8, k8, vt, wout, lse, alibi, 0, params, fcfg, scales)
    ws_f_ptrs = dict(o=wout, lse=lse, alibi=alibi, q_descale=scales.q_descale, k_descale=scales.k_descale,
                     v_descale=scales.v_descale)  # fmt: skip
    wcfg = config.Sm90WsBwdConfig(128, True)
    maps = ws_bwd.tensor_maps(wcfg, wq, wk, wk, wq, torch.zeros(b, sq, hq, 128))
    lse_p, delta_p = ws_bwd.padded_rows(wcfg, lse)
    wdk, wdv = torch.empty_like(wk), torch.empty_like(wk)
    ws_b = ws_bwd.kernel_arguments(
        list(maps.all()), lse_p, delta_p, wdk, wdv, alibi, 0, sq, sk, hq, hk, 128, 0.1, args.score_args(params, alibi),
        (3, 0),
    )  # fmt: skip
    return {
        "attnkit_fwd": (fwd, fwd_ptrs),
        "attnkit_fwd_sm90": (var, var_ptrs),  # the same signature: the varlen form is checked on this one
        "attnkit_bwd_pre": (pre, dict(o=out, dout=dout, delta=delta, dq_acc=dq_acc)),
        "attnkit_bwd": (bwd, bwd_ptrs),
        "attnkit_bwd_sm90": (bwd, bwd_ptrs),
        "attnkit_fwd_sm90_ws": (ws_f, ws_f_ptrs),
        "attnkit_fp8_vt": (ws_fwd.transposed_v_args(v8, vt), dict(v=v8, vt=vt)),
        "attnkit_bwd_sm90_ws": (ws_b, dict(lse=lse_p, delta=delta_p, dk=wdk, dv=wdv, alibi=alibi)),
    }


def test_every_argument_list_matches_its_kernels_parameters(monkeypatch):
    kernels = _entry_points()
    built = _built_arguments(monkeypatch)
    assert set(built) == set(kernels), "an entry point without a checked argument builder (or a stale name)"
    for name, (arg_list, pointers) in built.items():
        params = kernels[name]
        assert [_arg_kind(x) for x in arg_list] == [kind for kind, _ in params], name
        ptr_names = [p for kind, p in params if kind == "ptr"]
        assert ptr_names == list(pointers), name  # every pointer parameter named, in order
        for (kind, pname), x in zip(params, arg_list):
            if kind == "ptr":
                t = pointers[pname]
                assert int(x) == (0 if t is None else t.data_ptr()), (name, pname)


def test_parameter_reader_sees_every_entry_point():
    kernels = _entry_points()
    assert len(kernels["attnkit_fwd"]) == 34 and len(kernels["attnkit_bwd"]) == 45
    assert len(kernels["attnkit_bwd_pre"]) == 19 and kernels["attnkit_fwd_sm90_ws"][0] == ("map", "tq")
    assert kernels["attnkit_bwd_sm90_ws"][:5] == [("map", n) for n in ("tq", "tk", "tv", "tdo", "tdq")]
