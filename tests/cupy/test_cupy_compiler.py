"""CPU tests of backends/cupy/compiler.py and the kernel sources it reads: module specs, cache keys, the NVRTC
disk cache and error log (NVRTC faked), the architecture choice, includes and the generated wgmma header."""

from __future__ import annotations

import re

import pytest
from attnkit.backends.cupy import compiler

from attnkit.errors import BackendCompileError


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


def test_kernel_sources_have_no_cuda_includes():
    """NVRTC gets no include path: the sources may only include each other."""
    for name in (*compiler.SOURCES, *compiler.HEADERS):
        for inc in re.findall(r'#include\s+[<"]([^>"]+)[>"]', compiler.read_kernel_text(name)):
            assert inc in compiler.HEADERS, f"{name} includes {inc}"


def test_wgmma_header_matches_its_generator():
    from attnkit.backends.cupy import gen_wgmma

    assert gen_wgmma.HEADER_PATH.read_text() == gen_wgmma.render(), "run python -m attnkit.backends.cupy.gen_wgmma"


def test_wgmma_sources_build_only_for_sm90a():
    for source in ("fwd_sm90.cu", "bwd_sm90.cu"):
        with pytest.raises(BackendCompileError, match="sm_90a"):
            compiler.ModuleSpec.make(source, {}, "sm_90")
        assert compiler.ModuleSpec.make(source, {}, "sm_90a").arch == "sm_90a"
