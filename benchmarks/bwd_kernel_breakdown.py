"""Where a backward's GPU time goes, kernel by kernel: attnkit's cupy_cuda against SDPA-cuDNN.

One command on a CUDA machine (about a minute):

    PYTHONPATH=$PWD python benchmarks/bwd_kernel_breakdown.py --out benchmarks/results/<dir>/breakdown.md

For each head dim, mask and sequence length (bf16, 16k tokens, hidden 2048, as in cupy_ws_bwd_bench.py) it runs the
backward alone (autograd.grad on a saved forward) under torch.profiler and reports every GPU kernel's mean time per
backward, the sum of them, and the backward's time between CUDA events (the sum plus launch gaps). This separates
the attention kernel from the fixed per-call work around it (dQ accumulator zeroing, the delta pre-pass, dQ
conversion, copies), which weighs most at short sequences.
"""

from __future__ import annotations

import argparse
import collections
import datetime
from pathlib import Path

import torch
import torch.nn.functional as F

import attnkit

TOKENS = 16 * 1024
HIDDEN = 2048
ITERS = 10


def _backward(impl: str, s: int, d: int, causal: bool):
    b, h = TOKENS // s, HIDDEN // d
    torch.manual_seed(0)
    shape = (b, h, s, d) if impl == "sdpa_cudnn" else (b, s, h, d)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    if impl == "sdpa_cudnn":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        out = attnkit.attention(q, k, v, causal=causal, backend=impl)
    return lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)


def _event_ms(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(ITERS):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / ITERS


def breakdown(impl: str, s: int, d: int, causal: bool) -> tuple[float, dict[str, float]]:
    """(ms per backward between CUDA events, {kernel name: mean us per backward})."""
    from torch.profiler import ProfilerActivity, profile

    fn = _backward(impl, s, d, causal)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    event_ms = min(_event_ms(fn) for _ in range(3))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(ITERS):
            fn()
        torch.cuda.synchronize()
    kernels: dict[str, float] = collections.defaultdict(float)
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            kernels[evt.name[:60]] += evt.time_range.elapsed_us() / ITERS
    return event_ms, dict(sorted(kernels.items(), key=lambda kv: -kv[1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="Markdown file to write")
    ap.add_argument("--seqlens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--impls", nargs="+", default=["cupy_cuda", "sdpa_cudnn"])
    args = ap.parse_args(argv)
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    lines = [
        f"# Backward kernel breakdown: {torch.cuda.get_device_name()}, {when}, torch {torch.__version__}, "
        f"cuDNN {torch.backends.cudnn.version()}",
        "",
        f"bf16, {TOKENS} tokens, hidden {HIDDEN}; mean over {ITERS} backwards; times in us per backward.",
    ]
    for d in args.dims:
        for causal in (False, True):
            for s in args.seqlens:
                for impl in args.impls:
                    event_ms, kernels = breakdown(impl, s, d, causal)
                    total = sum(kernels.values())
                    lines += ["", f"## d {d}, {'causal' if causal else 'non-causal'}, seqlen {s}, {impl}: "
                              f"{1000 * event_ms:.0f} us between events, {total:.0f} us in kernels", "",
                              "| kernel | us | share |", "|---|---:|---:|"]  # fmt: skip
                    lines += [f"| `{name}` | {us:.1f} | {us / total:.1%} |" for name, us in kernels.items()]
                    print(lines[-len(kernels) - 4], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
