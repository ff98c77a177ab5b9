"""Development benchmark of the cupy_cuda backend: a correctness check, then timings against PyTorch SDPA-flash.

Usage (on a CUDA machine): ``python benchmarks/cupy_dev.py [--out results.md] [--variants] [--quick]``

* correctness: a few forward + backward cases against the float64 reference (flash-attn tolerance rule);
* timing: bf16, 16k tokens per batch, hidden 2048 (head dim 64 -> 32 heads, 128 -> 16 heads), seqlen 512..16k,
  forward and backward, medians of ``triton.testing.do_bench``; TFLOP/s use 4*B*H*Sq*Sk*D for the forward
  (halved when causal) and 2.5x that for the backward;
* ``--variants``: re-times seqlen 4k under alternative tile configurations (dev only: patches the tables in
  ``attnkit.backends.cupy.config``).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys

import torch
import torch.nn.functional as F
from attnkit.backends.cupy import config as cupy_config

import attnkit
from attnkit.testing import attention_ref, max_abs_error

DEV = "cuda"


def correctness() -> list[str]:
    rows = []
    cases = [
        (2, 300, 300, 16, 16, 128, True),
        (2, 257, 513, 8, 2, 64, False),
        (1, 513, 129, 4, 4, 96, True),
        (1, 200, 200, 4, 4, 256, True),
    ]
    for b, sq, sk, hq, hk, d, causal in cases:
        torch.manual_seed(sq + d)
        q = torch.randn(b, sq, hq, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(b, sk, hk, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(b, sk, hk, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        dout = torch.randn(b, sq, hq, d, device=DEV, dtype=torch.bfloat16)
        out = attnkit.attention(q, k, v, causal=causal, backend="cupy_cuda")
        out.backward(dout)
        got = [out, q.grad, k.grad, v.grad]
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = attention_ref(q64, k64, v64, causal=causal)
        ref.backward(dout.double())
        exact = [ref, q64.grad, k64.grad, v64.grad]
        ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k, v))
        plain = attention_ref(ql, kl, vl, causal=causal, upcast=False)
        plain.backward(dout)
        low = [plain, ql.grad, kl.grad, vl.grad]
        errs = []
        ok = True
        for i, name in enumerate(("out", "dq", "dk", "dv")):
            e, p = max_abs_error(got[i], exact[i]), max_abs_error(low[i], exact[i])
            ok &= e <= (2 if i == 0 else 3) * p + 2e-3
            errs.append(f"{name} {e:.2e}/{p:.2e}")
        case = f"{b}x{sq}x{sk} hq{hq} hk{hk} d{d} causal={causal}"
        rows.append(f"| {case} | {'ok' if ok else 'FAIL'} | {'; '.join(errs)} |")
    return rows


def _bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _flops(b: int, h: int, s: int, d: int, causal: bool) -> float:
    f = 4.0 * b * h * s * s * d
    return f / 2 if causal else f


def time_one(seqlen: int, d: int, causal: bool, tokens: int = 16384, hidden: int = 2048) -> dict[str, float]:
    h = hidden // d
    b = max(1, tokens // seqlen)
    q, k, v = (torch.randn(b, seqlen, h, d, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(b, seqlen, h, d, device=DEV, dtype=torch.bfloat16)
    res: dict[str, float] = {}

    def ours():
        return attnkit.attention(q, k, v, causal=causal, backend="cupy_cuda")

    def sdpa():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
            ).transpose(1, 2)

    flops = _flops(b, h, seqlen, d, causal)
    for name, fn in (("cupy", ours), ("sdpa", sdpa)):
        with torch.no_grad():
            ms = _bench(fn)
        res[f"{name}_fwd_ms"] = ms
        res[f"{name}_fwd_tflops"] = flops / ms / 1e9
        out = fn()
        ms = _bench(lambda out=out: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
        res[f"{name}_bwd_ms"] = ms
        res[f"{name}_bwd_tflops"] = 2.5 * flops / ms / 1e9
    return res


def variants() -> list[str]:
    rows = []
    fwd_opts = {
        64: [(2, 4, 64), (1, 4, 64), (1, 8, 64), (2, 4, 32)],
        128: [(1, 8, 64), (1, 4, 64), (2, 4, 64), (1, 8, 32)],
    }
    bwd_opts = {64: [(4, 1, 64), (8, 1, 64), (4, 1, 32)], 128: [(4, 1, 64), (4, 2, 64), (8, 1, 64), (4, 1, 32)]}
    for d in (64, 128):
        saved_f, saved_b = dict(cupy_config._FWD_TILES), dict(cupy_config._BWD_TILES)
        try:
            for i in range(max(len(fwd_opts[d]), len(bwd_opts[d]))):
                if i < len(fwd_opts[d]):
                    cupy_config._FWD_TILES[d] = [fwd_opts[d][i]]
                if i < len(bwd_opts[d]):
                    cupy_config._BWD_TILES[d] = [bwd_opts[d][i]]
                r = time_one(4096, d, False)
                rows.append(
                    f"| d{d} fwd{cupy_config._FWD_TILES[d][0]} bwd{cupy_config._BWD_TILES[d][0]} | "
                    f"{r['cupy_fwd_tflops']:.0f} | {r['cupy_bwd_tflops']:.0f} | {r['sdpa_fwd_tflops']:.0f} | "
                    f"{r['sdpa_bwd_tflops']:.0f} |"
                )
        finally:
            cupy_config._FWD_TILES.update(saved_f)
            cupy_config._BWD_TILES.update(saved_b)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--variants", action="store_true")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()

    import cupy
    import triton

    lines = [
        f"# cupy_cuda vs SDPA-flash ({datetime.date.today().isoformat()})",
        "",
        f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; CUDA {torch.version.cuda}; "
        f"cupy {cupy.__version__}; triton {triton.__version__}; python {platform.python_version()}",
        "",
        "## Correctness (bf16; max error vs fp64 reference / error of plain bf16 PyTorch)",
        "",
        "| case | rule | errors |",
        "| --- | --- | --- |",
        *correctness(),
        "",
        "## Timing (bf16, 16k tokens, hidden 2048; median ms and TFLOP/s)",
        "",
        "| hd | causal | seqlen | cupy fwd | sdpa fwd | ratio | cupy bwd | sdpa bwd | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    print("\n".join(lines), flush=True)
    seqlens = (1024, 4096, 16384) if args.quick else (512, 1024, 2048, 4096, 8192, 16384)
    for d in (64, 128):
        for causal in (False, True):
            for s in seqlens:
                r = time_one(s, d, causal)
                row = (
                    f"| {d} | {causal} | {s} | {r['cupy_fwd_ms']:.3f} ms {r['cupy_fwd_tflops']:.0f} | "
                    f"{r['sdpa_fwd_ms']:.3f} ms {r['sdpa_fwd_tflops']:.0f} | "
                    f"{r['sdpa_fwd_ms'] / r['cupy_fwd_ms']:.2f} | "
                    f"{r['cupy_bwd_ms']:.3f} ms {r['cupy_bwd_tflops']:.0f} | {r['sdpa_bwd_ms']:.3f} ms "
                    f"{r['sdpa_bwd_tflops']:.0f} | {r['sdpa_bwd_ms'] / r['cupy_bwd_ms']:.2f} |"
                )
                lines.append(row)
                print(row, flush=True)
    if args.variants:
        head = ["", "## Tile variants at seqlen 4096, non-causal (TFLOP/s)", "",
                "| config | cupy fwd | cupy bwd | sdpa fwd | sdpa bwd |",
                "| --- | --- | --- | --- | --- |"]  # fmt: skip
        print("\n".join(head), flush=True)
        lines += head
        for row in variants():
            lines.append(row)
            print(row, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
