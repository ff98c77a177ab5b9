"""Run-time compilation of the CUDA sources with NVRTC (through CuPy), with an in-process and an on-disk cache.

Each (source file, macro set, architecture) becomes one module. The kernels take their configuration from
``-D`` macros rather than C++ templates instantiated by name, so the exported names stay plain ``extern "C"``
symbols and the CI test can build exactly the same translation units with ``nvcc``.

The disk cache lives in :func:`attnkit.env.cupy_cache_dir`; its key hashes the source and header texts, the
options and the NVRTC version, so editing a kernel or upgrading CUDA never loads a stale binary.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnkit import env
from attnkit.errors import BackendCompileError

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
SOURCES = ("fwd.cu", "fwd_sm90.cu", "fwd_sm90_ws.cu", "bwd.cu", "bwd_sm90.cu", "bwd_sm90_ws.cu", "fp8_vt.cu")
HEADERS = ("common.cuh", "softmax.cuh", "sw128.cuh", "tma.cuh", "wgmma.cuh")
# Sources that use sm_90a-only instructions (wgmma, setmaxnreg); they are built for that target alone.
SM90A_SOURCES = ("fwd_sm90.cu", "fwd_sm90_ws.cu", "bwd_sm90.cu", "bwd_sm90_ws.cu")

# Options shared by NVRTC and the nvcc CI build; the architecture and -D macros are added per module.
BASE_OPTIONS = ("-std=c++17", "-lineinfo")

# Bumped when the cache layout or the meaning of the key changes.
_CACHE_FORMAT = "1"


def read_kernel_text(name: str) -> str:
    return (KERNEL_DIR / name).read_text()


@dataclass(frozen=True)
class ModuleSpec:
    """One compilation unit: a source file, its macros and the target architecture (``sm_90``, ``sm_90a`` or
    ``compute_90``)."""

    source: str
    defines: tuple[tuple[str, int], ...]
    arch: str

    @staticmethod
    def make(source: str, defines: Mapping[str, int], arch: str) -> ModuleSpec:
        if source not in SOURCES:
            raise BackendCompileError(f"unknown CuPy kernel source {source!r}; known: {', '.join(SOURCES)}")
        if source in SM90A_SOURCES and arch != "sm_90a":
            raise BackendCompileError(f"{source} uses wgmma and builds only for sm_90a, not {arch!r}")
        return ModuleSpec(source, tuple(sorted(defines.items())), arch)

    def options(self) -> tuple[str, ...]:
        return (*BASE_OPTIONS, f"--gpu-architecture={self.arch}", *(f"-D{k}={v}" for k, v in self.defines))

    def cache_key(self, nvrtc_version: tuple[int, int]) -> str:
        h = hashlib.sha256()
        for part in (_CACHE_FORMAT, self.source, read_kernel_text(self.source)):
            h.update(part.encode())
            h.update(b"\0")
        for name in HEADERS:
            h.update(name.encode() + b"\0" + read_kernel_text(name).encode() + b"\0")
        h.update("\0".join(self.options()).encode())
        h.update(f"nvrtc{nvrtc_version[0]}.{nvrtc_version[1]}".encode())
        return h.hexdigest()[:32]


def pick_arch(capability: tuple[int, int], supported: tuple[int, ...]) -> str:
    """``sm_XY`` when NVRTC can emit machine code for the device, else PTX for the newest arch it knows.

    ``supported`` is NVRTC's list (e.g. ``(75, 80, ..., 120)``). PTX for an older virtual arch runs on newer
    GPUs through the driver's JIT, so a GPU newer than the installed NVRTC still works.
    """
    cc = capability[0] * 10 + capability[1]
    if cc in supported:
        return f"sm_{cc}"
    older = [a for a in supported if a <= cc]
    if not older:
        raise BackendCompileError(f"NVRTC supports no architecture <= sm_{cc} (supports {sorted(supported)})")
    return f"compute_{max(older)}"


def _nvrtc() -> Any:
    from cupy_backends.cuda.libs import nvrtc

    return nvrtc


def nvrtc_version() -> tuple[int, int]:
    return tuple(_nvrtc().getVersion())  # type: ignore[return-value]


def nvrtc_supported_archs() -> tuple[int, ...]:
    return tuple(int(a) for a in _nvrtc().getSupportedArchs())


def compile_binary(spec: ModuleSpec) -> bytes:
    """Compile with NVRTC; returns a cubin (``sm_``) or PTX (``compute_``). Raises BackendCompileError with the log."""
    nvrtc = _nvrtc()
    # CuPy's binding takes the program text as str but header texts and names as bytes.
    headers = tuple(read_kernel_text(h).encode() for h in HEADERS)
    prog = nvrtc.createProgram(read_kernel_text(spec.source), spec.source, headers, tuple(h.encode() for h in HEADERS))
    try:
        try:
            nvrtc.compileProgram(prog, list(spec.options()))
        except nvrtc.NVRTCError as exc:
            log = nvrtc.getProgramLog(prog)
            raise BackendCompileError(
                f"NVRTC failed to compile attnkit CuPy kernel {spec.source} with options "
                f"{' '.join(spec.options())}: {exc}\n{log}"
            ) from exc
        if spec.arch.startswith("sm_"):
            return nvrtc.getCUBIN(prog)
        ptx = nvrtc.getPTX(prog)
        return ptx.encode() if isinstance(ptx, str) else ptx
    finally:
        nvrtc.destroyProgram(prog)


def cache_path(spec: ModuleSpec, version: tuple[int, int]) -> Path:
    suffix = ".cubin" if spec.arch.startswith("sm_") else ".ptx"
    stem = Path(spec.source).stem
    return Path(env.cupy_cache_dir()) / f"{stem}-{spec.arch}-{spec.cache_key(version)}{suffix}"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # concurrent processes race harmlessly: both write the same bytes
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def binary_path(spec: ModuleSpec) -> Path:
    """Path of the compiled module on disk, compiling it first when the cache has none."""
    path = cache_path(spec, nvrtc_version())
    if not path.is_file():
        data = compile_binary(spec)
        try:
            _write_atomic(path, data)
        except OSError:
            # An unwritable cache directory must not break attention: fall back to a private temp file.
            fd, tmp = tempfile.mkstemp(suffix=path.suffix)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return Path(tmp)
    return path


class ModuleCache:
    """Loaded modules and their kernels per (device, module spec); thread-safe, one compile per key."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._modules: dict[tuple[int, ModuleSpec], Any] = {}
        self._kernels: dict[tuple[int, ModuleSpec, str, int], Any] = {}

    def clear(self) -> None:
        with self._lock:
            self._modules.clear()
            self._kernels.clear()

    def kernel(self, device: int, spec: ModuleSpec, name: str, smem_bytes: int) -> Any:
        key = (device, spec, name, smem_bytes)
        kern = self._kernels.get(key)
        if kern is not None:
            return kern
        import cupy

        with self._lock:
            kern = self._kernels.get(key)
            if kern is not None:
                return kern
            with cupy.cuda.Device(device):
                mod = self._modules.get((device, spec))
                if mod is None:
                    mod = cupy.RawModule(path=str(binary_path(spec)))
                    self._modules[(device, spec)] = mod
                kern = mod.get_function(name)
                if smem_bytes > 48 * 1024:
                    # Dynamic shared memory beyond 48 KB must be opted into per kernel.
                    kern.max_dynamic_shared_size_bytes = smem_bytes
            self._kernels[key] = kern
            return kern


MODULES = ModuleCache()
