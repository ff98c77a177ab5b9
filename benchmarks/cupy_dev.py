"""Development benchmark of the cupy_cuda backend: a correctness check, then timings against PyTorch SDPA-flash.

Usage (on a CUDA machine): ``python benchmarks/cupy_dev.py [--out results.md] [--variants] [--quick]``

* correctness: a few forward + backward cases against the float64 reference (flash-attn tolerance rule);
* timing: bf16, 16k tokens per batch, hidden 2048 (head dim 64 -> 32 heads, 128 -> 16 heads), seqlen 512..16k,
  forward and backward, medians of ``triton.testing.do_bench``; TFLOP/s use 4*B*H*Sq*Sk*D for the forward
  (halved when causal) and 2.5x that for the backward;
* ``--variants``: first checks and times the forward under alternative tile configurations at 4k/16k (dev only:
  patches the tables in ``attnkit.backends.cupy.config``);
* ``--sm90``: the Hopper wgmma forward's tile variants, each checked first, timed next to the mma.sync forward
  (``ATTNKIT_CUPY_WGMMA=0``) and SDPA-flash at 2k/8k/16k, causal and not.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time

import torch
import torch.nn.functional as F
from attnkit.backends.cupy import config as cupy_config

import attnkit
from attnkit.testing import attention_ref, max_abs_error

DEV = "cuda"


def _poison_allocator() -> None:
    """Fill freed blocks of the caching allocator with NaN so an output element the kernel never writes shows up."""
    junk = torch.full((64 << 20,), float("nan"), device=DEV, dtype=torch.float32)
    del junk


def check_case(b, sq, sk, hq, hk, d, causal, **kw) -> tuple[bool, str]:
    torch.manual_seed(sq * 7 + sk + d)
    q = torch.randn(b, sq, hq, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, sk, hk, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, sk, hk, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(b, sq, hq, d, device=DEV, dtype=torch.bfloat16)
    _poison_allocator()
    out = attnkit.attention(q, k, v, causal=causal, backend="cupy_cuda", **kw)
    _poison_allocator()
    out.backward(dout)
    got = [out, q.grad, k.grad, v.grad]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_ref(q64, k64, v64, causal=causal, **kw)
    ref.backward(dout.double())
    exact = [ref, q64.grad, k64.grad, v64.grad]
    ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k, v))
    plain = attention_ref(ql, kl, vl, causal=causal, upcast=False, **kw)
    plain.backward(dout)
    low = [plain, ql.grad, kl.grad, vl.grad]
    errs = []
    ok = True
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        e, p = max_abs_error(got[i], exact[i]), max_abs_error(low[i], exact[i])
        ok &= bool(torch.isfinite(got[i]).all()) and e <= (2 if i == 0 else 3) * p + 2e-3
        errs.append(f"{name} {e:.2e}/{p:.2e}")
    extra = "".join(f" {k}={v}" for k, v in kw.items())
    case = f"{b}x{sq}x{sk} hq{hq} hk{hk} d{d} causal={causal}{extra}"
    return ok, f"| {case} | {'ok' if ok else 'FAIL'} | {'; '.join(errs)} |"


def correctness() -> list[str]:
    cases = [
        ((2, 300, 300, 16, 16, 128, True), {}),
        ((2, 257, 513, 8, 2, 64, False), {}),
        ((1, 513, 129, 4, 4, 96, True), {}),
        ((1, 200, 200, 4, 4, 256, True), {}),
        ((1, 700, 700, 4, 2, 64, False), {"window_size": (100, 30)}),
        ((1, 333, 400, 4, 1, 128, True), {"softcap": 5.0}),
    ]
    return [check_case(*c, **kw)[1] for c, kw in cases]


def variant_correctness(d: int) -> tuple[bool, list[str]]:
    """Forward tiles under test, at shapes with partial blocks, causal, GQA and a window."""
    rows, all_ok = [], True
    for c in ((2, 1031, 1031, 8, 2, d, True), (1, 517, 1300, 4, 4, d, False), (1, 2048, 2048, 4, 1, d, True)):
        ok, row = check_case(*c)
        all_ok &= ok
        rows.append(row)
    ok, row = check_case(1, 900, 900, 4, 2, d, False, window_size=(200, 0))
    return all_ok and ok, [*rows, row]


def _bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _flops(b: int, h: int, s: int, d: int, causal: bool) -> float:
    f = 4.0 * b * h * s * s * d
    return f / 2 if causal else f


def time_one(
    seqlen: int, d: int, causal: bool, tokens: int = 16384, hidden: int = 2048, backward: bool = True
) -> dict[str, float]:
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
        if not backward:
            continue
        out = fn()
        ms = _bench(lambda out=out: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
        res[f"{name}_bwd_ms"] = ms
        res[f"{name}_bwd_tflops"] = 2.5 * flops / ms / 1e9
    return res


# Forward (m_tiles, warps, block_n) alternatives checked and timed by --variants.
FWD_VARIANTS = {
    64: [(2, 4, 64), (1, 4, 64), (2, 4, 32)],
    128: [(2, 4, 64), (1, 4, 64), (2, 4, 32)],
}


def _compile(spec) -> str:
    from attnkit.backends.cupy import compiler

    compiler.binary_path(spec)
    return spec.source


def precompile(with_variants: bool) -> None:
    """Build every module this script loads in parallel processes (NVRTC is single-threaded per program)."""
    from concurrent.futures import ProcessPoolExecutor

    from attnkit.backends.cupy import compiler

    cap = torch.cuda.get_device_capability()
    arch = compiler.pick_arch(cap, compiler.nvrtc_supported_archs())
    specs = set()
    for hd in cupy_config.KERNEL_HEAD_DIMS:
        specs.add(compiler.ModuleSpec.make("fwd.cu", cupy_config.fwd_config(hd, torch.bfloat16).defines(), arch))
        specs.add(compiler.ModuleSpec.make("bwd.cu", cupy_config.bwd_config(hd, torch.bfloat16).defines(), arch))
    if with_variants:
        for hd, tiles in FWD_VARIANTS.items():
            for t in tiles:
                specs.add(compiler.ModuleSpec.make("fwd.cu", cupy_config.FwdConfig(hd, True, *t).defines(), arch))
    import multiprocessing

    with ProcessPoolExecutor(max_workers=16, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_compile, sorted(specs, key=str)))


def variants() -> list[str]:
    """Forward tile variants at seqlen 4k and 16k (non-causal and causal), each checked for correctness first."""
    rows = []
    for d in (64, 128):
        saved = dict(cupy_config._FWD_TILES)
        try:
            for t in FWD_VARIANTS[d]:
                cupy_config._FWD_TILES[d] = [t]
                ok, checks = variant_correctness(d)
                if not ok:
                    print("\n".join(checks), flush=True)
                cells = []
                for s, causal in ((4096, False), (4096, True), (16384, False)):
                    r = time_one(s, d, causal, backward=False)
                    cells.append(f"{r['cupy_fwd_tflops']:.0f} ({r['sdpa_fwd_ms'] / r['cupy_fwd_ms']:.2f}x)")
                rows.append(f"| d{d} fwd{t} | {'ok' if ok else 'FAIL'} | " + " | ".join(cells) + " |")
                print(rows[-1], flush=True)
        finally:
            cupy_config._FWD_TILES.update(saved)
    return rows


# Hopper wgmma forward (warpgroups, block_n) alternatives checked and timed by --sm90.
SM90_VARIANTS = {
    64: [(1, 128), (1, 64), (2, 128), (3, 128)],
    128: [(1, 64), (1, 128), (2, 128), (3, 64)],
}


def _fwd_ms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, sdpa: bool = False) -> float:
    def run():
        if not sdpa:
            return attnkit.attention(q, k, v, causal=causal, backend="cupy_cuda")
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
            )

    with torch.no_grad():
        return _bench(run)


def sm90_variants() -> list[str]:
    """Each wgmma tile variant: correctness (bf16: GQA, causal, window, softcap), then forward TFLOP/s vs mma.sync
    and SDPA-flash."""
    import os

    shapes = [(s, causal) for s in (2048, 8192, 16384) for causal in (False, True)]
    rows = []
    for d in (64, 128):
        base: dict[tuple[int, bool], tuple[float, float]] = {}
        for s, causal in shapes:
            h, b = 2048 // d, max(1, 16384 // s)
            q, k, v = (torch.randn(b, s, h, d, device=DEV, dtype=torch.bfloat16) for _ in range(3))
            os.environ["ATTNKIT_CUPY_WGMMA"] = "0"
            mma = _fwd_ms(q, k, v, causal)
            os.environ.pop("ATTNKIT_CUPY_WGMMA")
            base[(s, causal)] = (mma, _fwd_ms(q, k, v, causal, sdpa=True))
        saved = dict(cupy_config.SM90_FWD_TILES)
        try:
            for t in SM90_VARIANTS[d]:
                cupy_config.SM90_FWD_TILES[d] = [t]
                ok, checks = variant_correctness(d)
                for kw in ({"softcap": 5.0}, {"window_size": (300, 40)}):
                    good, row = check_case(1, 777, 1029, 4, 2, d, False, **kw)
                    ok &= good
                    checks.append(row)
                if not ok:
                    print("\n".join(checks), flush=True)
                cells = []
                for s, causal in shapes:
                    h, b = 2048 // d, max(1, 16384 // s)
                    q, k, v = (torch.randn(b, s, h, d, device=DEV, dtype=torch.bfloat16) for _ in range(3))
                    ms = _fwd_ms(q, k, v, causal)
                    mma, sdpa_ms = base[(s, causal)]
                    tf = _flops(b, h, s, d, causal) / ms / 1e9
                    cells.append(f"{tf:.0f} ({sdpa_ms / ms:.2f}x sdpa, {mma / ms:.2f}x mma)")
                rows.append(f"| d{d} wg{t[0]} bn{t[1]} | {'ok' if ok else 'FAIL'} | " + " | ".join(cells) + " |")
                print(rows[-1], flush=True)
        finally:
            cupy_config.SM90_FWD_TILES.clear()
            cupy_config.SM90_FWD_TILES.update(saved)
        cells = []
        for s, causal in shapes:
            h, b = 2048 // d, max(1, 16384 // s)
            mma, sdpa_ms = base[(s, causal)]
            f = _flops(b, h, s, d, causal)
            cells.append(f"mma {f / mma / 1e9:.0f}, sdpa {f / sdpa_ms / 1e9:.0f}")
        rows.append(f"| d{d} baselines | - | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return rows


def _bwd_ms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, sdpa: bool = False) -> float:
    dout = torch.randn_like(q)
    if sdpa:
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
            ).transpose(1, 2)
    else:
        out = attnkit.attention(q, k, v, causal=causal, backend="cupy_cuda")
    return _bench(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))


def sm90_backward() -> list[str]:
    """Backward TFLOP/s of the wgmma kernel next to the mma.sync one and SDPA-flash (correctness: the checks of
    ``correctness()`` and the GPU tests run the wgmma backward on sm_90)."""
    import os

    rows = []
    for d in (64, 128):
        for causal in (False, True):
            for s in (2048, 4096, 8192, 16384):
                h, b = 2048 // d, max(1, 16384 // s)
                q, k, v = (
                    torch.randn(b, s, h, d, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
                )
                wg = _bwd_ms(q, k, v, causal)
                os.environ["ATTNKIT_CUPY_WGMMA"] = "0"
                mma = _bwd_ms(q, k, v, causal)
                os.environ.pop("ATTNKIT_CUPY_WGMMA")
                sd = _bwd_ms(q, k, v, causal, sdpa=True)
                f = 2.5 * _flops(b, h, s, d, causal) / 1e9
                rows.append(
                    f"| {d} | {causal} | {s} | {f / wg:.0f} | {f / mma:.0f} | {f / sd:.0f} | {sd / wg:.2f} | "
                    f"{mma / wg:.2f} |"
                )
                print(rows[-1], flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--variants", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sm90", action="store_true")
    ap.add_argument("--sm90-bwd", action="store_true")
    ap.add_argument("--no-table", action="store_true", help="skip the full timing table")
    args = ap.parse_args()

    import cupy
    import triton

    t0 = time.time()
    try:
        precompile(args.variants)
        print(f"precompiled in {time.time() - t0:.0f} s", flush=True)
    except Exception as exc:  # modules then compile lazily on first use
        print(f"precompile failed ({type(exc).__name__}: {exc}); compiling lazily", flush=True)
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
    if args.sm90:
        head = ["", "## Hopper wgmma forward variants: TFLOP/s (vs SDPA-flash, vs the mma.sync forward)", "",
                "| config | correct | 2k | 2k causal | 8k | 8k causal | 16k | 16k causal |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        print("\n".join(head), flush=True)
        lines += head + sm90_variants()
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")
    if args.sm90_bwd:
        head = ["", "## Hopper wgmma backward: TFLOP/s", "",
                "| hd | causal | seqlen | wgmma | mma.sync | sdpa-flash | wgmma/sdpa | wgmma/mma |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        print("\n".join(head), flush=True)
        lines += head + sm90_backward()
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")
    if args.no_table:
        return 0
    if args.variants:
        head = ["", "## Forward tile variants: (m_tiles, warps, block_n); TFLOP/s (ratio to SDPA-flash)", "",
                "| config | correct | 4k | 4k causal | 16k |",
                "| --- | --- | --- | --- | --- |"]  # fmt: skip
        print("\n".join(head), flush=True)
        var_lines = head + variants()
        print("\n".join(lines[-4:]), flush=True)  # the timing table's header again
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
        lines += var_lines
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
