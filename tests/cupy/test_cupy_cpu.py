"""CPU tests of the cupy_cuda backend's Python side: availability, capabilities, tile configs, the NVRTC cache
and the arguments every kernel launch receives. The GPU launch itself is replaced by a recorder."""

from __future__ import annotations

import math
import re
from typing import ClassVar

import numpy as np
import pytest
import torch
from attnkit.backends.cupy import args, compiler, config
from attnkit.backends.cupy import backend as cb
from helpers import make_spec

import attnkit
from attnkit.errors import BackendCompileError, InvalidArgumentError
from attnkit.params import AttentionParams, VarlenInfo
from attnkit.spec import AttentionSpec


def _spec(**kw) -> AttentionSpec:
    hopper = dict(compute_capability=(9, 0), dtype=torch.bfloat16, head_dim=128, head_dim_v=128)
    return make_spec(**{**hopper, **kw})


# ---- availability and capabilities ---------------------------------------------------------------------------
def test_unavailable_without_cupy(monkeypatch):
    real = cb.importlib.util.find_spec
    monkeypatch.setattr(cb.importlib.util, "find_spec", lambda name, *a: None if name == "cupy" else real(name, *a))
    cb._cupy_problem.cache_clear()
    try:
        reason = cb.CupyCudaBackend().unavailable_reason()
        assert reason == cb.CUPY_MISSING
        assert "pip install 'attnkit[cupy]'" in reason and "cupy-cuda12x" in reason and "cupy-cuda13x" in reason
        assert cb.CupyCudaBackend().why_not(_spec()) == [reason]
        assert cb.CupyCudaBackend().info() == {"status": reason}
    finally:
        cb._cupy_problem.cache_clear()


def test_registered_and_skipped_by_auto_on_cpu():
    from attnkit.registry import REGISTRY

    backend = REGISTRY.get("cupy_cuda")
    assert isinstance(backend, cb.CupyCudaBackend)
    assert backend.name == "cupy_cuda" and backend.priority == 20
    if not torch.cuda.is_available():
        assert backend.unavailable_reason()
        q = torch.randn(1, 4, 2, 8)
        out = attnkit.attention(q, q, q)  # auto must not pick cupy_cuda without a GPU
        assert out.shape == q.shape


@pytest.fixture
def available(monkeypatch):
    """Pretend CuPy and a GPU are present so why_not reaches the capability table."""
    monkeypatch.setattr(cb.CupyCudaBackend, "unavailable_reason", lambda self: None)
    monkeypatch.setattr(cb.torch.cuda, "is_available", lambda: False)  # skip the live shared-memory query
    return cb.CupyCudaBackend()


def test_capabilities_accept_supported_calls(available):
    for feats in ({"causal"}, {"window"}, {"alibi", "softcap", "gqa"}, set()):
        for dtype in (torch.float16, torch.bfloat16):
            for d in (32, 40, 64, 96, 128, 200, 256):
                spec = _spec(dtype=dtype, head_dim=d, head_dim_v=d, features=frozenset(feats), requires_grad=True)
                assert available.why_not(spec) == [], spec.describe()
    assert available.why_not(_spec(op="varlen", requires_grad=True)) == []


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"features": frozenset({"dropout"})}, "dropout"),
        ({"features": frozenset({"deterministic"})}, "deterministic"),
        ({"head_dim_v": 64}, "head_dim_v"),
        ({"dtype": torch.float32}, "dtype float32"),
        ({"compute_capability": (7, 5)}, "compute capability 7.5"),
        ({"is_hip": True}, "amd"),
        ({"device_type": "cpu", "compute_capability": None}, "device type 'cpu'"),
        ({"head_dim": 512, "head_dim_v": 512}, "head_dim=512"),
        ({"op": "kvcache"}, "kvcache"),
        ({"op": "piecewise"}, "piecewise"),
    ],
)
def test_capabilities_reject_with_reason(available, change, needle):
    reasons = available.why_not(_spec(**change))
    assert reasons and any(needle in r for r in reasons), reasons


def test_shared_memory_limit_is_a_reason(monkeypatch, available):
    monkeypatch.setattr(cb.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cb.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(cb, "max_smem_optin", lambda dev: 48 * 1024)
    reasons = available.why_not(_spec(head_dim=256, head_dim_v=256, requires_grad=True))
    assert any("shared memory" in r and "49152" in r for r in reasons), reasons
    assert available.why_not(_spec(head_dim=32, head_dim_v=32, requires_grad=True)) == []
    monkeypatch.setattr(cb, "max_smem_optin", lambda dev: 99 * 1024)  # consumer Ampere/Ada
    assert available.why_not(_spec(head_dim=256, head_dim_v=256, requires_grad=True)) == []
    assert config.bwd_config(128, torch.float16, 99 * 1024).block_m == 32  # smaller tiles on 99 KB devices


def test_tile_fallback_for_small_shared_memory():
    for hd in config.KERNEL_HEAD_DIMS:
        f = config.fwd_config(hd, torch.float16, 99 * 1024)
        b = config.bwd_config(hd, torch.float16, 99 * 1024)
        assert f.smem_bytes <= 99 * 1024 and b.smem_bytes <= 99 * 1024, hd
        assert config.fwd_config(hd, torch.float16, 227 * 1024) == config.fwd_config(hd, torch.float16)


# ---- tile configs ------------------------------------------------------------------------------------------------
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
    assert config.pre_grid(10, 3, 2) == (math.ceil(30 / config.PRE_ROWS_PER_CTA), 2, 1)


# ---- compiler and caches -------------------------------------------------------------------------------------------
def test_module_spec_options_and_key():
    spec = compiler.ModuleSpec.make("fwd.cu", {"B": 1, "A": 2}, "sm_90")
    assert spec.options() == ("-std=c++17", "-lineinfo", "--gpu-architecture=sm_90", "-DA=2", "-DB=1")
    k = spec.cache_key((13, 0))
    assert k == compiler.ModuleSpec.make("fwd.cu", {"A": 2, "B": 1}, "sm_90").cache_key((13, 0))
    assert k != spec.cache_key((12, 8))
    assert k != compiler.ModuleSpec.make("fwd.cu", {"A": 3, "B": 1}, "sm_90").cache_key((13, 0))
    assert k != compiler.ModuleSpec.make("fwd.cu", {"A": 2, "B": 1}, "sm_80").cache_key((13, 0))
    assert k != compiler.ModuleSpec.make("bwd.cu", {"A": 2, "B": 1}, "sm_90").cache_key((13, 0))
    with pytest.raises(BackendCompileError, match="unknown CuPy kernel source"):
        compiler.ModuleSpec.make("nope.cu", {}, "sm_90")


def test_cache_key_tracks_kernel_text(monkeypatch):
    spec = compiler.ModuleSpec.make("fwd.cu", {}, "sm_90")
    before = spec.cache_key((13, 0))
    real = compiler.read_kernel_text
    monkeypatch.setattr(compiler, "read_kernel_text", lambda n: real(n) + ("// edit\n" if n == "common.cuh" else ""))
    assert spec.cache_key((13, 0)) != before


def test_pick_arch():
    assert compiler.pick_arch((9, 0), (75, 80, 86, 89, 90)) == "sm_90"
    assert compiler.pick_arch((8, 6), (75, 80, 86, 89, 90)) == "sm_86"
    assert compiler.pick_arch((12, 1), (75, 80, 90)) == "compute_90"  # newer GPU than NVRTC: PTX JIT
    with pytest.raises(BackendCompileError):
        compiler.pick_arch((7, 0), (75, 80))


def test_disk_cache_under_env_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNKIT_CUPY_CACHE_DIR", str(tmp_path / "kc"))
    monkeypatch.setattr(compiler, "nvrtc_version", lambda: (13, 0))
    calls = []
    monkeypatch.setattr(compiler, "compile_binary", lambda spec: calls.append(spec) or b"CUBIN")
    spec = compiler.ModuleSpec.make("bwd.cu", {"ATTNKIT_HEAD_DIM": 64}, "sm_80")
    p1 = compiler.binary_path(spec)
    p2 = compiler.binary_path(spec)
    assert p1 == p2 and p1.read_bytes() == b"CUBIN" and len(calls) == 1
    assert p1.parent == tmp_path / "kc" and p1.name.startswith("bwd-sm_80-") and p1.suffix == ".cubin"
    ptx = compiler.binary_path(compiler.ModuleSpec.make("bwd.cu", {"ATTNKIT_HEAD_DIM": 64}, "compute_90"))
    assert ptx.suffix == ".ptx" and len(calls) == 2


class _FakeNvrtc:
    class NVRTCError(Exception):
        pass

    def __init__(self, fail: bool):
        self.fail, self.destroyed, self.options = fail, 0, None

    def createProgram(self, src, name, headers, include_names):
        assert isinstance(src, str) and all(isinstance(h, bytes) for h in headers)
        assert include_names == tuple(h.encode() for h in compiler.HEADERS)
        return 7

    def compileProgram(self, prog, options):
        self.options = options
        if self.fail:
            raise self.NVRTCError("NVRTC_ERROR_COMPILATION (6)")

    def getProgramLog(self, prog):
        return 'fwd.cu(12): error: identifier "oops" is undefined'

    def getCUBIN(self, prog):
        return b"\x7fELF"

    def getPTX(self, prog):
        return ".version 8.0"

    def destroyProgram(self, prog):
        self.destroyed += 1


def test_compile_error_carries_the_log(monkeypatch):
    fake = _FakeNvrtc(fail=True)
    monkeypatch.setattr(compiler, "_nvrtc", lambda: fake)
    spec = compiler.ModuleSpec.make("fwd.cu", {"ATTNKIT_HEAD_DIM": 64}, "sm_90")
    with pytest.raises(BackendCompileError, match=r'(?s)fwd\.cu.*-DATTNKIT_HEAD_DIM=64.*identifier "oops"'):
        compiler.compile_binary(spec)
    assert fake.destroyed == 1
    ok = _FakeNvrtc(fail=False)
    monkeypatch.setattr(compiler, "_nvrtc", lambda: ok)
    assert compiler.compile_binary(spec) == b"\x7fELF" and ok.options == list(spec.options())
    assert compiler.compile_binary(compiler.ModuleSpec.make("fwd.cu", {}, "compute_90")) == b".version 8.0"


# ---- launch plumbing -----------------------------------------------------------------------------------------------
class _Recorder:
    calls: ClassVar[list[dict]] = []

    def __init__(self, device):
        self.index = 0

    def smem_limit(self):
        return 227 * 1024

    def __call__(self, spec, name, grid, threads, smem, args):
        _Recorder.calls.append(dict(spec=spec, name=name, grid=grid, threads=threads, smem=smem, args=args))


@pytest.fixture
def recorder(monkeypatch):
    _Recorder.calls = []
    monkeypatch.setattr(cb, "Launcher", _Recorder)
    monkeypatch.setattr(cb, "_arch", lambda dev: "sm_90")
    return _Recorder.calls


def _ints(args, start, n):
    return [int(a) for a in args[start : start + n]]


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
    assert _ints(a, 8, 14) == [*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], 4 * 37, 37]
    assert _ints(a, 22, 5) == [37, 53, 2, 64, 0]
    floats = [float(x) for x in a[27:30]]
    assert floats == pytest.approx([0.125 * math.log2(math.e), 0.125 / 5.0, 5.0 * math.log2(math.e)])
    assert _ints(a, 30, 4) == [1, 1, -1, 0]
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
    assert _ints(a, 8, 3) == [0, 6 * 40, 40]  # q copied with its head dim padded to 40
    assert _ints(a, 20, 2) == [0, 8]  # lse (Hq, total_q)
    assert _ints(a, 22, 5) == [5, 6, 2, 40, 6]  # max lens, GQA group, padded dim, alibi batch stride
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
    assert pre["grid"] == config.pre_grid(37, 4, 2) and pre["threads"] == config.PRE_THREADS
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
    assert _ints(a, 12, 3) == list(q.stride()[:3]) and _ints(a, 24, 2) == [4 * 37, 37]
    assert _ints(a, 32, 5) == [37, 50, 4, 128, 0]
    assert float(a[37]) == pytest.approx(0.1)
    assert _ints(a, 41, 4) == [0, 0, 8, 3]


def test_rejects_what_it_does_not_implement():
    q = torch.randn(1, 4, 2, 16, dtype=torch.float16)
    with pytest.raises(attnkit.BackendUnsupportedError, match="dropout"):
        cb.CupyCudaBackend().forward(q, q, q, None, AttentionParams(softmax_scale=1.0, dropout_p=0.1), None)
    with pytest.raises(attnkit.BackendUnsupportedError, match="head dim"):
        cb.CupyCudaBackend().forward(q, q, q[..., :8], None, AttentionParams(softmax_scale=1.0), None)


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


def test_kernel_sources_have_no_cuda_includes():
    """NVRTC gets no include path: the sources may only include each other."""
    for name in (*compiler.SOURCES, *compiler.HEADERS):
        for inc in re.findall(r'#include\s+[<"]([^>"]+)[>"]', compiler.read_kernel_text(name)):
            assert inc in compiler.HEADERS, f"{name} includes {inc}"


# ---- Hopper wgmma forward ------------------------------------------------------------------------------------------
def test_wgmma_header_matches_its_generator():
    from attnkit.backends.cupy import gen_wgmma

    assert gen_wgmma.HEADER_PATH.read_text() == gen_wgmma.render(), "run python -m attnkit.backends.cupy.gen_wgmma"


@pytest.mark.parametrize("hd", sorted(config.SM90_FWD_TILES))
def test_sm90_tiles_fit_and_keep_the_swizzle_phase(hd):
    for t in config.SM90_FWD_TILES[hd]:
        for bf16 in (False, True):
            cfg = config.Sm90FwdConfig(hd, bf16, *t)
            assert cfg.smem_bytes <= 227 * 1024 and cfg.threads <= 1024
            # Mirrors load_sw128's static_assert: a thread's rows step by a multiple of 8.
            assert (cfg.threads // (hd // 8)) % 8 == 0 and cfg.threads % (hd // 8) == 0
            assert cfg.block_n in (64, 128) and cfg.block_m == 64 * cfg.warpgroups


@pytest.mark.parametrize(
    "head_dim, arch, env_value, smem, expected",
    [
        (128, "sm_90", None, 227 * 1024, "fwd_sm90.cu"),
        (64, "sm_90", "1", 227 * 1024, "fwd_sm90.cu"),
        (40, "sm_90", None, 227 * 1024, "fwd_sm90.cu"),  # padded to the 64 kernel
        (96, "sm_90", None, 227 * 1024, "fwd.cu"),  # no wgmma kernel for 96
        (256, "sm_90", None, 227 * 1024, "fwd.cu"),
        (32, "sm_90", None, 227 * 1024, "fwd.cu"),
        (128, "sm_90", "0", 227 * 1024, "fwd.cu"),  # ATTNKIT_CUPY_WGMMA=0
        (128, "sm_80", None, 163 * 1024, "fwd.cu"),
        (128, "sm_89", None, 99 * 1024, "fwd.cu"),
        (128, "compute_90", None, 227 * 1024, "fwd.cu"),  # PTX fallback: no sm_90a machine code
        (128, "sm_90", None, 99 * 1024, "fwd_sm90.cu"),  # the smaller wgmma tile (1, 64) fits
        (128, "sm_90", None, 60 * 1024, "fwd.cu"),  # no wgmma tile fits
    ],
)
def test_forward_kernel_choice(monkeypatch, head_dim, arch, env_value, smem, expected):
    if env_value is None:
        monkeypatch.delenv("ATTNKIT_CUPY_WGMMA", raising=False)
    else:
        monkeypatch.setenv("ATTNKIT_CUPY_WGMMA", env_value)
    source, name, cfg = cb.forward_kernel(head_dim, torch.float16, arch, smem)
    assert source == expected and cfg.smem_bytes <= smem
    assert name == ("attnkit_fwd_sm90" if expected == "fwd_sm90.cu" else "attnkit_fwd")


def test_bad_wgmma_switch_is_rejected(monkeypatch):
    from attnkit.errors import EnvironmentVariableError

    monkeypatch.setenv("ATTNKIT_CUPY_WGMMA", "maybe")
    with pytest.raises(EnvironmentVariableError, match="ATTNKIT_CUPY_WGMMA='maybe'"):
        cb.forward_kernel(128, torch.float16, "sm_90", 227 * 1024)


def test_wgmma_sources_build_only_for_sm90a():
    for source in ("fwd_sm90.cu", "bwd_sm90.cu"):
        with pytest.raises(BackendCompileError, match="sm_90a"):
            compiler.ModuleSpec.make(source, {}, "sm_90")
        assert compiler.ModuleSpec.make(source, {}, "sm_90a").arch == "sm_90a"


@pytest.mark.parametrize(
    "head_dim, arch, env_value, expected",
    [
        (128, "sm_90", None, "bwd_sm90.cu"),
        (64, "sm_90", None, "bwd_sm90.cu"),
        (48, "sm_90", None, "bwd_sm90.cu"),
        (96, "sm_90", None, "bwd.cu"),
        (256, "sm_90", None, "bwd.cu"),
        (128, "sm_90", "0", "bwd.cu"),
        (128, "sm_80", None, "bwd.cu"),
    ],
)
def test_backward_kernel_choice(monkeypatch, head_dim, arch, env_value, expected):
    if env_value is None:
        monkeypatch.delenv("ATTNKIT_CUPY_WGMMA", raising=False)
    else:
        monkeypatch.setenv("ATTNKIT_CUPY_WGMMA", env_value)
    source, name, cfg = cb.backward_kernel(head_dim, torch.bfloat16, arch, 227 * 1024)
    assert source == expected and cfg.smem_bytes <= 227 * 1024
    assert name == ("attnkit_bwd_sm90" if expected == "bwd_sm90.cu" else "attnkit_bwd")
    assert cb.backward_kernel(head_dim, torch.bfloat16, arch, 40 * 1024)[0] == "bwd.cu"  # does not fit: fallback
