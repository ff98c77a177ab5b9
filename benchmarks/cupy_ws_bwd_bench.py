"""Backward benchmark of the warp-specialized Hopper kernel (bwd_sm90_ws.cu) against bwd_sm90.cu and PyTorch SDPA.

One command on an H100/H200 (about two minutes, first run includes NVRTC compiles):

    PYTHONPATH=$PWD python benchmarks/cupy_ws_bwd_bench.py --out benchmarks/results/ws_bwd

1. correctness: a few large forward + backward cases through the new kernel against the float64 reference
   (flash-attn's rule: gradient error <= 3x plain low precision + atol), with a check that it actually ran;
2. timing: bf16, 16k tokens per batch, hidden 2048 (d 64 -> 32 heads, d 128 -> 16 heads), seqlen 2k/4k/8k/16k,
   causal and not: the backward alone (autograd.grad on a saved forward) of cupy_cuda with the new kernel (``ws``:
   its default schedule, FA3's order: dV issued before dS^T is formed, dK after dQ; ``ws_serial``: every product
   group waited for at once; ``ws_overlap``: P^T formed while dP^T runs, dV and dK issued together after dS^T;
   ``ws_early_dv``: dV early, dK before dQ), with
   ``ATTNKIT_CUPY_TMA_BWD=0`` (bwd_sm90.cu), triton_cuda, SDPA-cuDNN and SDPA-flash. CUDA events, warmup, median of
   rounds.
   TFLOP/s use 2.5x the forward's 4*B*H*S*S*D (halved when causal).

Writes a Markdown table and a JSON file (GPU, versions, date, every number) to ``--out``. Flags narrow the sweep
(``--seqlens``, ``--dims``, ``--causal``, ``--impls``) or skip the check (``--no-check``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from attnkit.backends.cupy import config as ws_config

import attnkit
from attnkit.bench.timing import median_batch_ms
from attnkit.testing import attention_ref, max_abs_error

DEV = "cuda"
TOKENS = 16 * 1024
HIDDEN = 2048
ATOL = 2e-3
# "ws": the default schedule; "ws_<ablation>": a row of config.WS_BWD_ABLATIONS ("ws_serial", "ws_overlap",
# "ws_early_dv", "ws_bm128"; "-" and "+" in the names become "_"), each with its change of Sm90WsBwdConfig fields;
# a row that config.ws_bwd_ablations(d) leaves out at a head dim is reported as not built there.
WS_SCHEDULES: dict[str, dict[str, object]] = {
    "ws": {},
    **{"ws_" + name.replace("-", "_").replace("+", "_"): change for name, change in ws_config.WS_BWD_ABLATIONS.items()},
}
WS_IMPLS = tuple(WS_SCHEDULES)
IMPLS = (*WS_IMPLS, "sm90", "triton", "sdpa_cudnn", "sdpa_flash")
KERNEL = "attnkit_bwd_sm90_ws"


@contextlib.contextmanager
def _env(name: str, value: str | None):
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextlib.contextmanager
def _schedule(impl: str):
    """The warp-specialized backward with its default schedule ("ws") or one of config.WS_BWD_ABLATIONS."""
    import dataclasses

    from attnkit.backends.cupy import ws_bwd

    change = WS_SCHEDULES[impl]
    real = ws_bwd.ws_backward_config

    def patched(*args, **kwargs):
        cfg = real(*args, **kwargs)
        return None if cfg is None else dataclasses.replace(cfg, **change)

    ws_bwd.ws_backward_config = patched
    try:
        yield
    finally:
        ws_bwd.ws_backward_config = real


class _Spy:
    """Records the kernel names the cupy backend launches (to prove which backward ran)."""

    def __init__(self) -> None:
        from attnkit.backends.cupy import launcher

        self.names: list[str] = []
        self._cls = launcher.Launcher
        self._real = launcher.Launcher.__call__
        spy = self

        def call(launcher, spec, name, grid, threads, smem, args):
            spy.names.append(name)
            return spy._real(launcher, spec, name, grid, threads, smem, args)

        self._cls.__call__ = call

    def close(self) -> None:
        self._cls.__call__ = self._real


def check(b: int, sq: int, sk: int, hq: int, hk: int, d: int, causal: bool) -> tuple[bool, str]:
    torch.manual_seed(sq + 3 * sk + d + causal)
    q, k, v = (torch.randn(b, s, h, d, device=DEV, dtype=torch.bfloat16) for s, h in ((sq, hq), (sk, hk), (sk, hk)))
    dout = torch.randn(b, sq, hq, d, device=DEV, dtype=torch.bfloat16)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    spy = _Spy()
    try:
        with _env("ATTNKIT_CUPY_TMA_BWD", "1"):
            out = attnkit.attention(qs, ks, vs, causal=causal, backend="cupy_cuda")
            out.backward(dout)
        torch.cuda.synchronize()
    finally:
        spy.close()
    ran = KERNEL in spy.names
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = attention_ref(q64, k64, v64, causal=causal)
    ref.backward(dout.double())
    ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
    plain = attention_ref(ql, kl, vl, causal=causal, upcast=False)
    plain.backward(dout)
    ok = ran
    parts = [f"b={b} sq={sq} sk={sk} hq={hq} hk={hk} d={d} causal={causal} ws_ran={ran}"]
    for name, fast, exact, low in (
        ("out", out, ref, plain),
        ("dq", qs.grad, q64.grad, ql.grad),
        ("dk", ks.grad, k64.grad, kl.grad),
        ("dv", vs.grad, v64.grad, vl.grad),
    ):
        err, allowed = max_abs_error(fast, exact), (2.0 if name == "out" else 3.0) * max_abs_error(low, exact) + ATOL
        ok &= err <= allowed and not bool(fast.isnan().any())
        parts.append(f"{name} {err:.2e}/{allowed:.2e}")
    del ref, q64, k64, v64
    torch.cuda.empty_cache()
    return ok, "  ".join(parts)


def _flops_bwd(b: int, h: int, s: int, d: int, causal: bool) -> float:
    fwd = 4.0 * b * h * s * s * d
    return 2.5 * (fwd / 2 if causal else fwd)


def _sdpa_backend(impl: str):
    from torch.nn.attention import SDPBackend

    return SDPBackend.CUDNN_ATTENTION if impl == "sdpa_cudnn" else SDPBackend.FLASH_ATTENTION


def time_impl(impl: str, s: int, d: int, causal: bool, warmup: int, rounds: int) -> float:
    b, h = TOKENS // s, HIDDEN // d
    if impl in WS_IMPLS and WS_SCHEDULES[impl] and WS_SCHEDULES[impl] not in ws_config.ws_bwd_ablations(d).values():
        raise ValueError(f"no ablation at d {d}: not built there, or the default")  # shown in the table
    torch.manual_seed(0)
    if impl.startswith("sdpa"):
        shape = (b, h, s, d)  # SDPA's native layout
    else:
        shape = (b, s, h, d)
    q, k, v = (torch.randn(shape, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(shape, device=DEV, dtype=torch.bfloat16)
    if impl.startswith("sdpa"):
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(_sdpa_backend(impl)):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        out = attnkit.attention(q, k, v, causal=causal, backend="triton_cuda" if impl == "triton" else "cupy_cuda")

    def bwd():
        torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)

    if impl not in WS_IMPLS:
        with _env("ATTNKIT_CUPY_TMA_BWD", "0"):
            return median_batch_ms(bwd, warmup, rounds, 3)
    spy = _Spy()
    try:
        with _env("ATTNKIT_CUPY_TMA_BWD", "1"), _schedule(impl):
            ms = median_batch_ms(bwd, warmup, rounds, 3)
    finally:
        spy.close()
    if KERNEL not in spy.names:
        raise RuntimeError("the warp-specialized backward did not run for the 'ws' timing")
    return ms


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    try:
        import cupy

        out["cupy"] = cupy.__version__
    except Exception as exc:  # reported, not fatal: the cupy timings then fail on their own
        out["cupy"] = f"unavailable ({exc})"
    out["cudnn"] = str(torch.backends.cudnn.version())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for results.md and results.json")
    ap.add_argument("--seqlens", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--causal", choices=["both", "0", "1"], default="both")
    ap.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-check", action="store_true", help="skip the correctness pass")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    t0 = time.time()
    lines: list[str] = []
    ok_all = True
    if not args.no_check:
        lines.append("## Correctness (bf16, error / allowed vs float64 reference)\n")
        for case in ((1, 4096, 4096, 4, 2, 128, False), (1, 2048, 8192, 4, 4, 128, True),
                     (1, 4096, 4096, 4, 4, 64, True), (2, 1000, 3000, 4, 1, 64, False)):  # fmt: skip
            ok, msg = check(*case)
            ok_all &= ok
            lines.append(f"- {'ok  ' if ok else 'FAIL'} {msg}")
            print(lines[-1], flush=True)
    causals = {"both": [False, True], "0": [False], "1": [True]}[args.causal]
    rows = []
    for d in args.dims:
        for causal in causals:
            for s in args.seqlens:
                row = {"seqlen": s, "d": d, "causal": causal, "batch": TOKENS // s, "heads": HIDDEN // d}
                for impl in args.impls:
                    try:
                        ms = time_impl(impl, s, d, causal, args.warmup, args.rounds)
                        row[impl] = {"ms": ms, "tflops": _flops_bwd(TOKENS // s, HIDDEN // d, s, d, causal) / ms / 1e9}
                    except Exception as exc:  # an unavailable SDPA backend is reported in the table
                        row[impl] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
                    torch.cuda.empty_cache()
                rows.append(row)
                print(row, flush=True)
    lines.append("\n## Backward TFLOP/s (bf16, 16k tokens, hidden 2048; median ms in parentheses)\n")
    lines.append("| d | causal | seqlen | " + " | ".join(args.impls) + " |")
    lines.append("|---|---|---|" + "---|" * len(args.impls))
    for r in rows:
        cells = []
        for impl in args.impls:
            v = r[impl]
            cells.append(f"{v['tflops']:.0f} ({v['ms']:.2f})" if "ms" in v else v["error"])
        lines.append(f"| {r['d']} | {int(r['causal'])} | {r['seqlen']} | " + " | ".join(cells) + " |")
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "correct": ok_all,
        "seconds": round(time.time() - t0, 1),
    }
    header = f"# bwd_sm90_ws benchmark: {meta['gpu']}, {meta['date']}, {json.dumps(meta['versions'])}\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(header + "\n".join(lines) + "\n")
    (args.out / "results.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    print(header + "\n".join(lines))
    print(f"{meta['seconds']} s; wrote {args.out}/results.md and results.json")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
