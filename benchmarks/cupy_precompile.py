"""Compile the CuPy backend's kernel modules into the on-disk cache in parallel processes, before a GPU run.

NVRTC builds one module at a time per process, and the warp-specialised Hopper kernels take tens of seconds each;
a GPU session that starts cold would spend minutes compiling inside timed or time-limited jobs. This script builds
every module the CuPy tests and benchmarks use on an sm_90 GPU (forward and backward, each kernel head dim, fp16
and bf16, the warp-specialised forward's ablation variants, the fp8 forward) in ``--procs`` processes. Later
processes load them from ``ATTNKIT_CUPY_CACHE_DIR`` (the cache key hashes source, headers and options, so nothing
stale is loaded).

    python benchmarks/cupy_precompile.py [--procs 16] [--arch sm_90] [--smem 232448]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch


def module_specs(arch: str, smem: int) -> list:
    from attnkit.backends.cupy import backend as cb
    from attnkit.backends.cupy import compiler, config, ws_fwd

    specs = set()
    for dtype in (torch.float16, torch.bfloat16):
        for d in config.KERNEL_HEAD_DIMS:
            for pick in (cb.forward_kernel, cb.backward_kernel):
                source, _, cfg = pick(d, dtype, arch, smem)
                specs.add(compiler.ModuleSpec.make(source, cfg.defines(), cb._module_arch(source, arch)))
            # The backward pre-pass and the mma.sync kernels the wgmma ones fall back to.
            specs.add(compiler.ModuleSpec.make("bwd.cu", config.bwd_config(d, dtype, smem).defines(), arch))
            specs.add(compiler.ModuleSpec.make("fwd.cu", config.fwd_config(d, dtype, smem).defines(), arch))
        if arch != "sm_90":
            continue
        for d in (64, 128):
            base = config.sm90_ws_fwd_config(d, dtype, smem)
            for change in ({}, *config.ws_fwd_ablations(base.head_dim).values()):
                cfg = dataclasses.replace(base, **change)
                specs.add(compiler.ModuleSpec.make(ws_fwd.SOURCE, cfg.defines(), "sm_90a"))
            bwd = config.sm90_ws_bwd_config(d, dtype, smem)
            if bwd is not None:
                from attnkit.backends.cupy import ws_bwd

                for change in ({}, *config.ws_bwd_ablations(bwd.head_dim).values()):  # the default and its ablations
                    cfg = dataclasses.replace(bwd, **change)
                    specs.add(compiler.ModuleSpec.make(ws_bwd.SOURCE, cfg.defines(), "sm_90a"))
    if arch == "sm_90":  # the fp8 forward, per output dtype, and its V^T pass
        for out_dtype in (torch.bfloat16, torch.float16, torch.float32):
            cfg = config.fp8_ws_fwd_config(128, out_dtype, smem)
            specs.add(compiler.ModuleSpec.make(ws_fwd.SOURCE, cfg.defines(), "sm_90a"))
        for change in config.fp8_ws_ablations().values():
            cfg = dataclasses.replace(config.fp8_ws_fwd_config(128, torch.bfloat16, smem), **change)
            specs.add(compiler.ModuleSpec.make(ws_fwd.SOURCE, cfg.defines(), "sm_90a"))
        specs.add(compiler.ModuleSpec.make(ws_fwd.VT_SOURCE, {}, arch))
    return sorted(specs, key=lambda s: (s.source, s.defines))


def _build(spec) -> tuple[str, float]:
    from attnkit.backends.cupy import compiler

    t = time.perf_counter()
    compiler.binary_path(spec)
    return f"{spec.source} {dict(spec.defines)}", time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=16)
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--smem", type=int, default=232448, help="shared-memory opt-in limit (H100/H200: 232448)")
    args = ap.parse_args()
    specs = module_specs(args.arch, args.smem)
    start = time.perf_counter()
    failed = 0
    with ProcessPoolExecutor(args.procs) as pool:
        futures = {pool.submit(_build, s): s for s in specs}
        for f in as_completed(futures):
            try:
                name, seconds = f.result()
                print(f"{seconds:6.1f} s  {name}")
            except Exception as exc:  # a module that fails to build is reported; the run compiles it again lazily
                failed += 1
                print(f"FAILED {futures[f].source}: {type(exc).__name__}: {str(exc)[:300]}")
    print(f"{len(specs)} modules in {time.perf_counter() - start:.0f} s, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
