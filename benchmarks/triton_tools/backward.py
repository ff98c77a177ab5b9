"""``bwdsweep``: backward dK/dV and dQ tile variants against the SDPA and FlexAttention backwards, in rounds,
gradients checked."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

from .common import bench_shapes, flex_attention_op, fwd_flops, run_header, sweep_report, tile_name, training_inputs


def _bwd_sweep_tiles(d: int) -> dict[str, list]:
    """Every dK/dV and dQ candidate for this head dim plus tiles the tables do not list: the larger tiles of
    FlexAttention's Hopper backward (64 queries x 128 keys, 8 warps), TMA and 8-warp variants that compile
    without spills for triton 3.6 on sm_90 (`xcompile`), and one more pipeline stage."""
    from attnkit.backends.triton import configs

    T = configs.Tile
    tiles = {kind: list(configs.candidates(kind, "nvidia", d, 2, tma=True)) for kind in ("dkdv", "dq")}
    if d <= 64:
        extra = {
            "dkdv": [T(64, 128, 8, 3), T(64, 128, 8, 3, True), T(64, 128, 8, 4, True), T(64, 64, 8, 3, True)],
            "dq": [T(128, 64, 8, 3), T(128, 64, 8, 3, True), T(128, 32, 8, 3, True), T(64, 64, 4, 4)],
        }
    else:
        extra = {
            "dkdv": [T(64, 128, 8, 4, True), T(64, 128, 8, 2, True), T(32, 64, 4, 4)],
            "dq": [T(128, 64, 8, 3, True), T(128, 32, 8, 3), T(64, 32, 4, 4), T(128, 64, 8, 4, True)],
        }
    for kind, more in extra.items():
        tiles[kind] += [t for t in more if t not in tiles[kind]]
    return tiles


def _bwd_variants(d: int) -> list[tuple[str, object, object]]:
    """(name, dkdv tile, dq tile): each dK/dV tile with the default dQ tile, each dQ tile with the default dK/dV."""
    from attnkit.backends.triton import configs

    tiles = _bwd_sweep_tiles(d)
    dkdv0, dq0 = configs.default("dkdv", "nvidia", d, 2, True), configs.default("dq", "nvidia", d, 2, True)
    variants = [("default", dkdv0, dq0)]
    variants += [(f"dkdv {tile_name(t)}", t, dq0) for t in tiles["dkdv"] if t != dkdv0]
    variants += [(f"dq {tile_name(t)}", dkdv0, t) for t in tiles["dq"] if t != dq0]
    return variants


def _forced_bwd_tiles(dkdv, dq):
    from attnkit.backends.triton import launch

    return launch.forced_tiles(**{k: t for k, t in (("dkdv", dkdv), ("dq", dq)) if t is not None})


def _bwd_compile_worker(task: tuple[int, bool, int]) -> str:
    d, causal, i = task
    os.environ["ATTNKIT_TRITON_AUTOTUNE"] = "0"
    import torch

    import attnkit

    name, dkdv, dq = _bwd_variants(d)[i]
    q, k, v = (torch.randn(1, 1024, 2, d, dtype=torch.bfloat16, device="cuda", requires_grad=True) for _ in range(3))
    t = time.time()
    try:
        with _forced_bwd_tiles(dkdv, dq):
            attnkit.attention(q, k, v, causal=causal, backend="triton_cuda").sum().backward()
        torch.cuda.synchronize()
        return f"compiled d={d} causal={int(causal)} {name}: {time.time() - t:.0f}s"
    except Exception as exc:
        return f"compiled d={d} causal={int(causal)} {name}: {type(exc).__name__} {str(exc)[:120]}"


def _bwd_sweep_case(b: int, s: int, h: int, d: int, causal: bool, flex, budget_s: float) -> dict:
    """One shape of `bwdsweep`: gradients of every variant checked against SDPA-flash's, then all timed."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import attnkit
    from attnkit.bench.timing import CudaClock, measure_interleaved

    q, k, v, dout, qt, kt, vt, dot = training_inputs(b, s, h, d)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        ref_out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    ref = [g.transpose(1, 2) for g in torch.autograd.grad(ref_out, (qt, kt, vt), dot, retain_graph=True)]
    out = attnkit.attention(q, k, v, causal=causal, backend="triton_cuda")
    steps: dict[str, Callable[[int], object]] = {}
    errors: dict[str, float] = {}
    for name, dkdv, dq in _bwd_variants(d):

        def step(_i: int, dkdv=dkdv, dq=dq):
            with _forced_bwd_tiles(dkdv, dq):
                return torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)

        try:
            errors[name] = max(float((g - r).abs().max()) for g, r in zip(step(0), ref))
            steps[name] = step
        except Exception as exc:
            errors[name] = float("nan")
            print(f"S={s} d={d} causal={int(causal)} {name}: {type(exc).__name__}: {str(exc)[:160]}")
    for label, kind in (("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION)):
        # The backward kernel is fixed when the forward runs: each SDPA backend needs its own forward output.
        with sdpa_kernel(kind):
            sdpa_out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        steps[label] = lambda _i, o=sdpa_out: torch.autograd.grad(o, (qt, kt, vt), dot, retain_graph=True)
    mask = None
    if causal:
        from torch.nn.attention.flex_attention import create_block_mask

        mask = create_block_mask(lambda b_, h_, i, j: i >= j, None, None, s, s, device="cuda")
    flex_out = flex(qt, kt, vt, block_mask=mask)
    steps["flex"] = lambda _i: torch.autograd.grad(flex_out, (qt, kt, vt), dot, retain_graph=True)
    timings = measure_interleaved(steps, 1, CudaClock(torch.device("cuda")), warmup=2, min_repeats=10,
                                  max_repeats=60, budget_s=budget_s)  # fmt: skip
    bwd_flops = 2.5 * fwd_flops(b, s, h, d, causal)
    tflops = {n: bwd_flops / t.median_ms / 1e9 if not isinstance(t, Exception) else 0.0 for n, t in timings.items()}
    return {"seqlen": s, "d": d, "causal": causal, "tflops": tflops, "err": errors, "kernels": _kernel_split(steps)}


def _kernel_split(steps: dict) -> dict[str, dict[str, float]]:
    """GPU time per kernel (microseconds per call, from the profiler) of triton's default backward and of
    FlexAttention's, so that the dK/dV and dQ shares are known."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    split = {}
    for name in ("default", "flex"):
        if name not in steps:
            continue
        calls = 5
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                steps[name](0)
            torch.cuda.synchronize()
        split[name] = {
            e.key[:60]: round(e.device_time_total / calls, 1) for e in prof.key_averages() if e.device_time_total > 0
        }
    return split


def bwdsweep(args: argparse.Namespace) -> None:
    """Backward tile variants of triton_cuda (the other kernel at its default tile) and the backwards of SDPA
    flash / cuDNN and FlexAttention, timed together in rounds (attnkit.bench.timing.measure_interleaved), each
    variant's gradients checked against SDPA-flash's. The difference between a variant and `default` is the
    change in its own kernel's time."""
    import multiprocessing as mp

    import torch

    os.environ["ATTNKIT_TRITON_AUTOTUNE"] = "0"
    start = time.time()
    header = run_header()
    print(header, flush=True)
    dims = [int(x) for x in args.dims.split(",")]
    tasks = [(d, c, i) for d in dims for c in (False, True) for i in range(len(_bwd_variants(d)))]
    with mp.get_context("spawn").Pool(args.procs) as pool:
        for line in pool.imap_unordered(_bwd_compile_worker, tasks):
            print(line, flush=True)
    print(f"compiled {len(tasks)} variants in {time.time() - start:.0f}s", flush=True)
    flex = torch.compile(flex_attention_op(), dynamic=False)
    results = []
    lines = [f"### Backward variants, TFLOP/s in rounds ({header})", ""]
    for b, s, h, d, causal in bench_shapes([int(x) for x in args.seqlens.split(",")]):
        if d not in dims:
            continue
        row = _bwd_sweep_case(b, s, h, d, causal, flex, args.budget_per_case)
        results.append(row)
        tf, errors = row["tflops"], row["err"]
        case = [
            f"S={s} d={d} causal={int(causal)}: flash {tf['sdpa flash']:.0f}, cudnn {tf['sdpa cudnn']:.0f}, "
            f"flex {tf['flex']:.0f}, default {tf.get('default', 0):.0f}"
        ]
        for name in sorted((n for n in errors if n in tf), key=lambda n: -tf[n]):
            case.append(f"    {name:28s} {tf[name]:6.0f}  {tf[name] / tf['flex']:.2f}x flex  err {errors[name]:.3g}")
        for name, kernels in row["kernels"].items():
            case.append(f"    {name} kernels (us/call): " + ", ".join(f"{k} {us:.0f}" for k, us in kernels.items()))
        sweep_report("bwdsweep", header, case, lines, results)
        torch.cuda.empty_cache()
