"""Forward commands: ``overhead`` (host time per call, fast path off and on), ``fwdsweep`` (every forward tile
and grid variant against SDPA and FlexAttention) and ``spread`` (where the spread of forward timings comes from)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import time
from collections.abc import Callable

from .common import HIDDEN, OUT, TOKENS, bench_shapes, do_bench_ms, flex_attention_op, fwd_flops, run_header, tile_name


def _sweep_tiles(d: int, warp_specialize: bool = False) -> list:
    """Every forward candidate for this head dim, extra tiles that the tables do not list, persistent grids and
    (``warp_specialize``) triton's warp-specialised loops."""
    from attnkit.backends.triton import configs, probes

    T = configs.Tile
    tiles = list(configs.candidates("fwd", "nvidia", d, 2, tma=True))
    if d <= 64:
        extra = [
            T(128, 128, 4, 3),
            T(64, 128, 4, 3),
            T(128, 64, 8, 3),
            T(128, 128, 8, 4),
            T(64, 64, 4, 4),
            T(64, 64, 4, 3, persistent=2),
            T(64, 64, 4, 3, persistent=4),
            T(128, 64, 8, 3, persistent=2),
        ]
    else:
        extra = [
            T(128, 128, 8, 3),
            T(128, 128, 8, 3, use_tma=True),
            T(128, 64, 8, 4),
            T(64, 128, 4, 3),
            T(64, 64, 4, 4, use_tma=True),
            T(64, 64, 4, 3, use_tma=True, persistent=2),
            T(64, 64, 4, 3, use_tma=True, persistent=4),
            T(64, 64, 4, 3, persistent=4),
        ]
    if warp_specialize and probes.has_warp_specialize():
        # Warp-specialised key loops (triton's own producer/consumer split), on the leading tiles of each class.
        base = (
            [T(128, 64, 8, 3), T(128, 64, 4, 3, use_tma=True)]
            if d <= 64
            else [
                T(128, 128, 8, 3, use_tma=True),
                T(128, 128, 8, 3),
                T(64, 64, 4, 3, use_tma=True),
                T(128, 64, 8, 3, use_tma=True),
            ]
        )
        extra += [dataclasses.replace(t, warp_specialize=True) for t in base]
    return tiles + [t for t in extra if t not in tiles]


def _forced_fwd_tile(tile):
    from attnkit.backends.triton import launch

    return launch.forced_tiles(fwd=tile)  # also keeps the host fast path off while the tile is forced


def _sweep_compile_worker(task: tuple[int, bool, int, bool]) -> str:
    d, causal, i, ws = task
    import torch

    import attnkit

    tile = _sweep_tiles(d, ws)[i]
    b, s, h = 2, 1024, HIDDEN // d
    q, k, v = (torch.randn(b, s, h, d, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    t = time.time()
    try:
        with _forced_fwd_tile(tile):
            attnkit.attention(q, k, v, causal=causal, backend="triton_cuda")
        torch.cuda.synchronize()
        return f"compiled d={d} causal={int(causal)} {tile_name(tile)}: {time.time() - t:.0f}s"
    except Exception as exc:
        return f"compiled d={d} causal={int(causal)} {tile_name(tile)}: {type(exc).__name__} {str(exc)[:120]}"


def _host_overhead() -> str:
    """Per-call host time (wall clock over back-to-back calls, no sync) vs device time, with the forward's fast
    launch path off and on; the tiny shape is CPU-bound, so its do_bench time is the host time."""
    import torch
    import torch.nn.functional as F
    from attnkit.backends.triton import fastpath, launch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import attnkit

    lines = []
    for b, s, h, d in ((1, 128, 2, 64), (8, 2048, 32, 64)):
        q, k, v = (torch.randn(b, s, h, d, dtype=torch.bfloat16, device="cuda") for _ in range(3))
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        params = attnkit.AttentionParams(softmax_scale=d**-0.5)
        calls = {
            "attnkit.attention": functools.partial(attnkit.attention, q, k, v, backend="triton_cuda"),
            "launch.forward": functools.partial(launch.forward, q, k, v, None, params, None, "nvidia"),
            "sdpa_flash": functools.partial(F.scaled_dot_product_attention, qt, kt, vt),
        }
        for fast in (False, True):
            fastpath.ENABLED = fast
            for name, fn in calls.items():
                if name == "sdpa_flash" and not fast:
                    continue
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    for _ in range(20):
                        fn()
                    torch.cuda.synchronize()
                    n = 200
                    t = time.perf_counter()
                    for _ in range(n):
                        fn()
                    host = (time.perf_counter() - t) / n * 1e6
                    torch.cuda.synchronize()
                    wall = (time.perf_counter() - t) / n * 1e6
                    dev = do_bench_ms(fn) * 1e3
                label = name if name == "sdpa_flash" else f"{name} fast={int(fast)}"
                lines.append(
                    f"B={b} S={s} H={h} d={d} {label:26s} host {host:6.1f} us/call, wall {wall:7.1f}, "
                    f"do_bench {dev:7.1f} us"
                )
    fastpath.ENABLED = True
    return "\n".join(lines)


def overhead(args: argparse.Namespace) -> None:
    text = _host_overhead()
    with open(os.path.join(OUT, "overhead.txt"), "w") as f:
        f.write(text + "\n")
    print(text)


def fwdsweep(args: argparse.Namespace) -> None:
    import multiprocessing as mp

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import attnkit

    start = time.time()
    header = run_header()
    print(header, flush=True)
    dims = [int(x) for x in args.dims.split(",")]
    tasks = [(d, c, i, args.ws) for d in dims for c in (False, True) for i in range(len(_sweep_tiles(d, args.ws)))]
    with mp.get_context("spawn").Pool(args.procs) as pool:
        for line in pool.imap_unordered(_sweep_compile_worker, tasks):
            print(line, flush=True)
    print(f"compiled {len(tasks)} variants in {time.time() - start:.0f}s", flush=True)
    if args.compile_only:
        return
    overhead = _host_overhead()
    print(overhead, flush=True)
    flex = torch.compile(flex_attention_op(), dynamic=False)
    seqlens = [int(x) for x in args.seqlens.split(",")]
    results = []
    for b, s, h, d, causal in sorted(bench_shapes(seqlens), key=lambda x: -x[1]):
        if d not in dims:
            continue
        gen = torch.Generator(device="cuda").manual_seed(s + d)
        q, k, v = (torch.randn(b, s, h, d, dtype=torch.bfloat16, device="cuda", generator=gen) for _ in range(3))
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        flops = fwd_flops(b, s, h, d, causal)
        row = {"seqlen": s, "d": d, "causal": causal, "variants": {}}
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            ref = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)
        for tile in _sweep_tiles(d, args.ws):
            name = tile_name(tile)
            try:
                with _forced_fwd_tile(tile):
                    fn = functools.partial(attnkit.attention, q, k, v, causal=causal, backend="triton_cuda")
                    err = float((fn() - ref).abs().max())
                    ms = do_bench_ms(fn)
                row["variants"][name] = (flops / ms / 1e9, err)
            except Exception as exc:
                row["variants"][name] = (0.0, f"{type(exc).__name__}")
        for label, kind in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            with sdpa_kernel(kind):
                sdpa = functools.partial(F.scaled_dot_product_attention, qt, kt, vt, is_causal=causal)
                row[label] = flops / do_bench_ms(sdpa) / 1e9
        if time.time() - start < args.budget_s:
            from torch.nn.attention.flex_attention import create_block_mask

            mask = create_block_mask(lambda b_, h_, i, j: i >= j, None, None, s, s, device="cuda") if causal else None
            try:
                row["flex"] = flops / do_bench_ms(functools.partial(flex, qt, kt, vt, block_mask=mask)) / 1e9
            except Exception as exc:
                print(f"flex failed: {type(exc).__name__}: {str(exc)[:200]}")
        results.append(row)
        best = max(row["variants"].items(), key=lambda kv: kv[1][0])
        print(
            f"S={s} d={d} causal={int(causal)} flash {row['flash']:.0f} cudnn {row['cudnn']:.0f} "
            f"flex {row.get('flex', 0):.0f} best {best[0]} {best[1][0]:.0f}",
            flush=True,
        )
        with open(os.path.join(OUT, "fwdsweep.json"), "w") as f:
            json.dump({"header": header, "overhead": overhead, "rows": results}, f, indent=1)
        torch.cuda.empty_cache()
    lines = [f"### Forward variants, TFLOP/s ({header})", "", "```", overhead, "```", ""]
    for row in results:
        lines.append(
            f"S={row['seqlen']} d={row['d']} causal={int(row['causal'])}: flash {row['flash']:.0f}, "
            f"cudnn {row['cudnn']:.0f}, flex {row.get('flex', 0):.0f}"
        )
        for name, (tf, err) in sorted(row["variants"].items(), key=lambda kv: -kv[1][0]):
            lines.append(f"    {name:24s} {tf:6.0f}  {tf / row['flash']:.2f}x flash  err {err}")
    text = "\n".join(lines)
    with open(os.path.join(OUT, "fwdsweep.md"), "w") as f:
        f.write(text + "\n")
    print(text)


def spread(args: argparse.Namespace) -> None:
    """Per-call CUDA-event times of several forwards on one shape, three ways: blocks of back-to-back calls (as
    `attnkit bench` times them), the same blocks each after an idle pause, and round-robin (one call of each
    implementation per round, so all see the same clocks and temperature). The autotuned triton tile is named.
    Run `nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active
    --format=csv -lms 50` beside it to line the times up with clocks; block start/end times are in the JSON."""
    import statistics

    import torch
    import torch.nn.functional as F
    import triton
    from attnkit.backends.triton import configs, tuning
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import attnkit

    T = configs.Tile
    s, d, causal = args.seqlen, args.dim, args.causal
    b, h = TOKENS // s, HIDDEN // d
    gen = torch.Generator(device="cuda").manual_seed(s)
    q, k, v = (torch.randn(b, s, h, d, dtype=torch.bfloat16, device="cuda", generator=gen) for _ in range(3))
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    flops = fwd_flops(b, s, h, d, causal)
    fns: dict[str, Callable[[], object]] = {}
    fns["triton auto"] = functools.partial(attnkit.attention, q, k, v, causal=causal, backend="triton_cuda")
    fns["triton auto"]()  # autotunes
    tuned = {str(key): tile_name(t) for key, t in tuning.tuned.items() if key[0] == "fwd"}
    forced = [
        T(64, 64, 4, 3, use_tma=True),
        T(64, 64, 4, 3, use_tma=True, persistent=2),
        T(128, 128, 8, 3, use_tma=True),
        T(128, 64, 8, 3),
    ]
    for tile in forced:

        def call(tile=tile):
            with _forced_fwd_tile(tile):
                return attnkit.attention(q, k, v, causal=causal, backend="triton_cuda")

        fns[f"triton {tile_name(tile)}"] = call
    flex = torch.compile(flex_attention_op(), dynamic=False)
    mask = None
    if causal:
        from torch.nn.attention.flex_attention import create_block_mask

        mask = create_block_mask(lambda b_, h_, i, j: i >= j, None, None, s, s, device="cuda")
    fns["flex"] = functools.partial(flex, qt, kt, vt, block_mask=mask)
    for label, kind in (("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION)):

        def sdpa(kind=kind):
            with sdpa_kernel(kind):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

        fns[label] = sdpa
    for fn in fns.values():  # compile / warm
        fn()
        fn()
    torch.cuda.synchronize()

    def one(fn) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        e.record()
        return a, e

    def tflops(ms: float) -> float:
        return flops / ms / 1e9

    results: dict[str, dict] = {"blocks": {}, "blocks_after_pause": {}, "round_robin": {}}
    for mode in ("blocks", "blocks_after_pause"):
        for name, fn in fns.items():
            if mode == "blocks_after_pause":
                time.sleep(args.pause)
            t0 = time.time()
            marks = [one(fn) for _ in range(args.calls)]
            torch.cuda.synchronize()
            results[mode][name] = {"t0": t0, "t1": time.time(), "ms": [a.elapsed_time(e) for a, e in marks]}
    rr: dict[str, list] = {name: [] for name in fns}
    t0 = time.time()
    for _ in range(args.calls):
        for name, fn in fns.items():
            rr[name].append(one(fn))
    torch.cuda.synchronize()
    for name, marks in rr.items():
        results["round_robin"][name] = {"t0": t0, "t1": time.time(), "ms": [a.elapsed_time(e) for a, e in marks]}
    header = (
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; B={b} H={h} S={s} D={d} "
        f"causal={int(causal)} bf16, {args.calls} calls per cell; autotuned: {tuned}"
    )
    lines = [
        f"### Forward timing spread ({header})",
        "",
        "TFLOP/s from per-call CUDA events: median / best / worst, and median of the first and last quarter",
        "",
        "| mode | implementation | median | best | worst | first 25% | last 25% |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, cells in results.items():
        for name, cell in cells.items():
            ms = cell["ms"]
            n = max(1, len(ms) // 4)
            lines.append(
                f"| {mode} | {name} | {tflops(statistics.median(ms)):.0f} | {tflops(min(ms)):.0f} | "
                f"{tflops(max(ms)):.0f} | {tflops(statistics.median(ms[:n])):.0f} | "
                f"{tflops(statistics.median(ms[-n:])):.0f} |"
            )
    text = "\n".join(lines)
    print(text, flush=True)
    with open(os.path.join(OUT, f"spread_{s}_{d}_{int(causal)}.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(OUT, f"spread_{s}_{d}_{int(causal)}.json"), "w") as f:
        json.dump({"header": header, "results": results}, f)
