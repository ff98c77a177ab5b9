"""Build every CuPy kernel source with nvcc for sm_80 and sm_90 (sm_90a for the wgmma one), with the options and
macros NVRTC gets at run time.

CI has no GPU but has nvcc: this catches C++/PTX errors before they reach a user's first call. Each source is
built for every kernel head dim on each architecture (both dtypes across the set). Without nvcc the test fails
when ``CI`` is set and is skipped otherwise.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from attnkit.backends.cupy import compiler, config

ARCHS = ("sm_80", "sm_90")
# The warp-specialised forward's ablation switches by kernel head dim (benchmarks/cupy_ws_bench.py times each).
WS_VARIANTS = {hd: tuple(config.ws_fwd_ablations(hd).values()) for hd in config.SM90_WS_HEAD_DIMS}


def _nvcc() -> str:
    found = shutil.which("nvcc") or next(
        (p for p in ("/usr/local/bin/nvcc", "/usr/local/cuda/bin/nvcc") if Path(p).exists()), None
    )
    if found is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("nvcc not found but CI is set: the CuPy kernel sources must be compiled in CI")
        pytest.skip("nvcc not found (set CI=true to make this a failure)")
    return found


def _units() -> list[compiler.ModuleSpec]:
    specs = []
    for arch in ARCHS:
        for i, hd in enumerate(config.KERNEL_HEAD_DIMS):
            # Alternate the dtype per head dim and per arch so both appear for every source and arch.
            dtype = torch.bfloat16 if (i + (arch == "sm_90")) % 2 else torch.float16
            specs.append(compiler.ModuleSpec.make("fwd.cu", config.fwd_config(hd, dtype).defines(), arch))
            specs.append(compiler.ModuleSpec.make("bwd.cu", config.bwd_config(hd, dtype).defines(), arch))
    # The Hopper wgmma forward exists only for sm_90a; every tile it may pick, in both dtypes.
    for hd, tiles in config.SM90_FWD_TILES.items():
        for t in tiles:
            for bf16 in (False, True):
                defines = config.Sm90FwdConfig(hd, bf16, *t).defines()
                specs.append(compiler.ModuleSpec.make("fwd_sm90.cu", defines, "sm_90a"))
    # The warp-specialised TMA forward: its default per head dim and dtype, plus every ablation switch once.
    for hd in config.SM90_WS_HEAD_DIMS:
        for bf16 in (False, True):
            dtype = torch.bfloat16 if bf16 else torch.float16
            defines = config.sm90_ws_fwd_config(hd, dtype).defines()
            specs.append(compiler.ModuleSpec.make("fwd_sm90_ws.cu", defines, "sm_90a"))
    # The fp8 forward: each output dtype; and its V^T pass, built for the plain targets like the mma.sync sources.
    for out_dtype in (torch.bfloat16, torch.float16, torch.float32):
        defines = config.fp8_ws_fwd_config(128, out_dtype).defines()
        specs.append(compiler.ModuleSpec.make("fwd_sm90_ws.cu", defines, "sm_90a"))
    for variant in config.fp8_ws_ablations().values():
        defines = dataclasses.replace(config.fp8_ws_fwd_config(128, torch.bfloat16), **variant).defines()
        specs.append(compiler.ModuleSpec.make("fwd_sm90_ws.cu", defines, "sm_90a"))
    for arch in ARCHS:
        specs.append(compiler.ModuleSpec.make("fp8_vt.cu", {}, arch))
    # Every switch at head dim 128; at 64 the ones 128 lacks (three consumer warpgroups).
    for hd, variants in WS_VARIANTS.items():
        for variant in variants:
            if hd == 128 or variant not in WS_VARIANTS[128]:
                defines = dataclasses.replace(config.sm90_ws_fwd_config(hd, torch.bfloat16), **variant).defines()
                specs.append(compiler.ModuleSpec.make("fwd_sm90_ws.cu", defines, "sm_90a"))
    for hd in config.SM90_BWD_HEAD_DIMS:
        for bf16 in (False, True):
            specs.append(compiler.ModuleSpec.make("bwd_sm90.cu", config.Sm90BwdConfig(hd, bf16).defines(), "sm_90a"))
    # The warp-specialized backward (sm_90a only): both head dims, both dtypes, each head dim's default tiles and
    # schedule and its ablations.
    for hd in config.SM90_BWD_HEAD_DIMS:
        for dtype in (torch.float16, torch.bfloat16):
            default = config.sm90_ws_bwd_config(hd, dtype)
            for change in ({}, *config.ws_bwd_ablations(hd).values()):
                defines = dataclasses.replace(default, **change).defines()
                specs.append(compiler.ModuleSpec.make("bwd_sm90_ws.cu", defines, "sm_90a"))
    # The smaller-tile fallbacks chosen on 99 KB shared-memory GPUs (sm_86/89), built once for sm_80.
    for hd in config.KERNEL_HEAD_DIMS:
        for t in config._FWD_TILES[hd][1:]:
            specs.append(compiler.ModuleSpec.make("fwd.cu", config.FwdConfig(hd, False, *t).defines(), "sm_80"))
        for t in config._BWD_TILES[hd][1:]:
            specs.append(compiler.ModuleSpec.make("bwd.cu", config.BwdConfig(hd, True, *t).defines(), "sm_80"))
    return specs


def _build(nvcc: str, spec: compiler.ModuleSpec, out_dir: Path) -> tuple[compiler.ModuleSpec, int, str]:
    out = out_dir / f"{Path(spec.source).stem}-{spec.arch}-{abs(hash(spec.defines))}.cubin"
    cmd = [nvcc, *spec.options(), "--cubin", "-Xptxas", "-v", "-o", str(out), str(compiler.KERNEL_DIR / spec.source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return spec, proc.returncode, " ".join(cmd) + "\n" + proc.stdout + proc.stderr


def test_every_source_builds_with_nvcc(tmp_path):
    nvcc = _nvcc()
    specs = _units()
    assert {s.source for s in specs} == set(compiler.SOURCES)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(lambda s: _build(nvcc, s, tmp_path), specs))
    failures = [log for _, rc, log in results if rc != 0]
    assert not failures, "\n\n".join(failures)
    for spec, _, log in results:
        # Every extern "C" entry point of the source must be in the binary under its plain name.
        names = re.findall(r"^\s*(attnkit_\w+)\(", compiler.read_kernel_text(spec.source), re.M)
        assert names
        for name in names:
            assert f"Compiling entry function '{name}' for '{spec.arch}'" in log, log
        # ptxas falls back to serialised wgmma (a large slowdown, still correct) when it cannot keep the
        # accumulators in place across an async group; that must not ship unnoticed.
        assert "wgmma.mma_async instructions are serialized" not in log, log
        if spec.source == "bwd_sm90_ws.cu":
            # Its consumers hold dK, dV, S and dP in registers under setmaxnreg 240: ptxas must accept the
            # register reconfiguration (C7508 says it ignored it) and must not spill.
            assert "C7508" not in log and "setmaxnreg ignored" not in log and "C7519" not in log, log
            assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", log), log
        if spec.source == "fwd_sm90_ws.cu":
            # The register hand-over must be honoured (C7508: setmaxnreg ignored) and the consumers must not spill;
            # ptxas inserting its own wgmma fence (C7519) means a register operand was touched in flight.
            assert "C7508" not in log and "C7519" not in log, log
            assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", log), log


def test_macros_used_by_python_exist_in_sources():
    """Every -D the Python side passes is a macro the source reads (a typo would silently use the default)."""
    pairs = (
        ("fwd.cu", config.fwd_config(64, torch.float16)),
        ("fwd_sm90.cu", config.sm90_fwd_config(64, torch.float16)),
        ("fwd_sm90_ws.cu", config.sm90_ws_fwd_config(64, torch.float16)),
        ("bwd.cu", config.bwd_config(64, torch.float16)),
        ("bwd_sm90.cu", config.sm90_bwd_config(64, torch.float16)),
        ("bwd_sm90_ws.cu", config.sm90_ws_bwd_config(64, torch.float16)),
        ("fwd_sm90_ws.cu", config.fp8_ws_fwd_config(128, torch.float32)),
        ("fwd_sm90_ws.cu", config.Sm90WsFwdConfig(64, True, consumers=3, consumer_regs=160)),
    )
    for source, cfg in pairs:
        text = compiler.read_kernel_text(source)
        for name in cfg.defines():
            assert f"#ifndef {name}" in text, f"{source} does not read {name}"
