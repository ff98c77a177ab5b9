"""``decodesweep``: the split-KV decoding kernel's key block, warps, stages and split count against SDPA flash
and cuDNN, in rounds, outputs checked."""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable

from .common import run_header, sweep_report

# (key block, warps, stages, waves of programs, TMA); the first is the shipped setting. With TMA the stages are
# those of the TMA loop (kvcache_launch._TMA_STAGES); the pointer loop keeps its 2.
_DECODE_VARIANTS = [
    (64, 4, 3, 2, 1),
    (64, 4, 2, 2, 0),
    (64, 4, 3, 2, 0),
    (64, 4, 2, 2, 1),
    (64, 4, 4, 2, 1),
    (64, 4, 3, 3, 1),
    (64, 4, 3, 4, 1),
    (64, 4, 4, 4, 1),
    (128, 4, 2, 2, 1),
    (128, 4, 3, 2, 1),
    (128, 8, 3, 2, 1),
    (32, 4, 4, 4, 1),
    (32, 4, 6, 4, 1),
]


@contextlib.contextmanager
def _decode_setting(block_n: int, warps: int, stages: int, waves: int, use_tma: int):
    from attnkit.backends.triton import kvcache_launch as kl

    names = ("_BLOCK_N", "_NUM_WARPS", "_NUM_STAGES" if not use_tma else "_TMA_STAGES", "_WAVES", "_TMA")
    saved = [getattr(kl, n) for n in names]
    for n, value in zip(names, (block_n, warps, stages, waves, bool(use_tma))):
        setattr(kl, n, value)
    try:
        yield
    finally:
        for n, value in zip(names, saved):
            setattr(kl, n, value)


def _decode_case(batch: int, kv: int, budget_s: float, seqlen_q: int = 1, page: int = 0) -> dict:
    """One KV length of `decodesweep`. Every setting is checked against SDPA-flash, captured in a CUDA graph and
    its replays timed in rounds with SDPA flash's and cuDNN's (GPU time alone: a decode step is shorter than the
    host time of an eager call). The host time of eager calls (wall clock per call, synchronised at the end of
    100 back-to-back calls) is measured too. ``page``: attnkit reads the cache from a shuffled pool of pages of that
    many keys (a block table); SDPA reads the contiguous cache it was copied from."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import attnkit
    from attnkit.bench.providers import shuffled_pages
    from attnkit.bench.timing import CudaClock, measure_interleaved

    b, hq, hk, d = batch, 32, 8, 128
    gen = torch.Generator(device="cuda").manual_seed(kv)
    q = torch.randn(b, seqlen_q, hq, d, dtype=torch.bfloat16, device="cuda", generator=gen)
    k, v = (torch.randn(b, kv, hk, d, dtype=torch.bfloat16, device="cuda", generator=gen) for _ in range(2))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    # seqlen_q > 1: queries at the cache's end (bottom-right causal, as attention_with_kvcache(causal=True)); flash
    # takes no mask, so the reference is then PyTorch's pick
    mask = None
    if seqlen_q > 1:
        mask = torch.ones(seqlen_q, kv, dtype=torch.bool, device="cuda").tril(kv - seqlen_q)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if mask is None else contextlib.nullcontext():
        ref = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True).transpose(1, 2)
    k_in, v_in, paging = k, v, {}
    if page:
        table, to_pool = shuffled_pages(b, kv, page, torch.device("cuda"))
        k_in, v_in, paging = to_pool(k), to_pool(v), {"block_table": table}
    eager: dict[str, Callable[[], object]] = {}
    errors: dict[str, float] = {}
    for setting in _DECODE_VARIANTS:

        def call(setting=setting):
            with _decode_setting(*setting):
                return attnkit.attention_with_kvcache(q, k_in, v_in, backend="triton_cuda", causal=seqlen_q > 1,
                                                      **paging)  # fmt: skip

        name = "x".join(map(str, setting))
        try:
            errors[name] = float((call() - ref).abs().max())
            eager[name] = call
        except Exception as exc:
            print(f"kv={kv} {name}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
    for label, kind in (("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION)):

        def sdpa_call(kind=kind):
            with sdpa_kernel(kind):
                return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True)

        eager[label] = sdpa_call
    steps: dict[str, Callable[[int], object]] = {}
    for name, fn in eager.items():
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            steps[name] = lambda _i, graph=graph: graph.replay()
        except Exception as exc:
            print(f"kv={kv} {name}: no graph: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
    timings = measure_interleaved(steps, 1, CudaClock(torch.device("cuda")), warmup=3, min_repeats=20,
                                  max_repeats=400, budget_s=budget_s)  # fmt: skip
    kv_bytes = 2 * k.numel() * k.element_size()
    gbs = {n: kv_bytes / t.median_ms / 1e6 for n, t in timings.items() if not isinstance(t, Exception)}
    host_us = {}
    for name in ("x".join(map(str, _DECODE_VARIANTS[0])), "sdpa flash", "sdpa cudnn"):
        fn = eager[name]
        try:
            fn()
        except Exception:  # flash with a mask
            continue
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(100):
            fn()
        torch.cuda.synchronize()
        host_us[name] = (time.perf_counter() - t0) / 100 * 1e6
    return {"kv": kv, "batch": b, "seqlen_q": seqlen_q, "page": page, "gbs": gbs, "err": errors,
            "eager_us_per_call": host_us}  # fmt: skip


def decodesweep(args: argparse.Namespace) -> None:
    """One query token per sequence against a full cache (GQA 32/8, head dim 128, batch = 131072 / KV length, the
    benchmark's decode case): each setting of the split kernel checked against SDPA-flash, then CUDA-graph replays
    timed in rounds with SDPA flash's and cuDNN's (GB/s of K/V read), and the eager wall time per call."""
    import torch

    header = run_header()
    lines = [f"### Decode settings (key block x warps x stages x waves), GB/s in rounds ({header})", ""]
    print(lines[0], flush=True)
    results = []
    for cell in args.kv_lens.split(","):
        batch, _, kv = cell.rpartition("x")  # BxL fixes the batch, a bare L takes 131072 // L rows
        row = _decode_case(int(batch) if batch else 131072 // int(kv), int(kv), args.budget_per_case, args.seqlen_q,
                           args.page)  # fmt: skip
        results.append(row)
        gbs, errors = row["gbs"], row["err"]
        eager = ", ".join(f"{n} {us:.0f} us" for n, us in row["eager_us_per_call"].items())
        case = [
            f"kv={row['kv']} batch={row['batch']} seqlen_q={row['seqlen_q']} page={row['page']}: graph replays, flash "
            f"{gbs.get('sdpa flash', 0):.0f}, cudnn "
            f"{gbs.get('sdpa cudnn', 0):.0f}; eager wall per call: {eager}"
        ]
        for name in sorted(errors, key=lambda n: -gbs.get(n, 0)):
            case.append(f"    {name:12s} {gbs.get(name, 0):6.0f}  err {errors[name]:.3g}")
        sweep_report("decodesweep", header, case, lines, results)
        torch.cuda.empty_cache()
