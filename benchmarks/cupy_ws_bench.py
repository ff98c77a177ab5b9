"""One-command GPU benchmark of the warp-specialised Hopper forward (fwd_sm90_ws.cu), with its ablations.

Usage (on an H100/H200): ``python benchmarks/cupy_ws_bench.py --out DIR [--quick] [--no-ablations]``

1. correctness: the WS kernel (and every ablation variant) on a few big shapes against the float64 reference,
   flash-attn's rule (max error <= 2x plain PyTorch's low-precision error + 2e-3); a failure is reported and the
   timings of that kernel are marked;
2. timing: forward TFLOP/s of fwd_sm90_ws vs fwd_sm90 (ATTNKIT_CUPY_TMA=0) vs SDPA-cuDNN vs SDPA-flash in the same
   run: bf16, 16k tokens (batch = 16k / seqlen), hidden 2048 (heads = 2048 / d), seqlen 2k/4k/8k/16k, d 64/128,
   causal and not. FLOPs 4*B*H*Sq*Sk*D (halved when causal). CUDA-event timing: warmup, then the median over
   rounds of the mean of a few back-to-back calls;
3. ablations at ``--ablation-seqlens`` (default 8k; d 64/128, causal and not), beside fwd_sm90: the variants of
   config.ws_fwd_ablations(d) (pipelining off, ping-pong off, both, other key-tile widths, three consumer
   warpgroups at d 64), each a -D macro set of the same source;
4. writes DIR/cupy_ws_bench.md and DIR/cupy_ws_bench.json; prints GPU, versions and the date.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from attnkit.backends.cupy import config

from attnkit.bench.timing import median_batch_ms

DEV = "cuda"
TOKENS = 16 * 1024
HIDDEN = 2048
ATOL = 2e-3


def _variants(d: int) -> dict[str, dict[str, object]]:
    """The default and every ablation that exists at (kernel) head dim ``d``."""
    return {"default": {}, **config.ws_fwd_ablations(d)}


def _flops(b: int, h: int, sq: int, sk: int, d: int, causal: bool) -> float:
    f = 4.0 * b * h * sq * sk * d
    return f / 2 if causal else f


def _inputs(b: int, sq: int, sk: int, h: int, d: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device=DEV).manual_seed(seed)
    return tuple(torch.randn(b, n, h, d, device=DEV, dtype=torch.bfloat16, generator=g) for n in (sq, sk, sk))


# ---- providers ----------------------------------------------------------------------------------------------------
def _ws(cfg_kwargs: dict[str, object]) -> Callable:
    from attnkit.backends.cupy import ws_fwd

    from attnkit.params import AttentionParams

    def run(q, k, v, causal):
        d = q.shape[-1]
        cfg = dataclasses.replace(config.sm90_ws_fwd_config(d, q.dtype), **cfg_kwargs)
        params = AttentionParams(softmax_scale=d**-0.5, causal=causal, window_right=0 if causal else -1)
        return ws_fwd.ws_forward(q, k, v, params, cfg)[0]

    return run


def _attnkit(tma: bool) -> Callable:
    """cupy_cuda through ``attnkit.attention`` with the warp-specialised forward on (at every length: the head-dim
    64 rule that keeps short calls on fwd_sm90 is lifted, so the column times the kernel it names) or off."""
    import attnkit

    def run(q, k, v, causal):
        return attnkit.attention(q, k, v, causal=causal, backend="cupy_cuda")

    def wrapped(q, k, v, causal):
        old = os.environ.get("ATTNKIT_CUPY_TMA")
        old_min = config.SM90_WS_D64_MIN_SEQLEN_K
        os.environ["ATTNKIT_CUPY_TMA"] = "1" if tma else "0"
        config.SM90_WS_D64_MIN_SEQLEN_K = 0
        try:
            return run(q, k, v, causal)
        finally:
            config.SM90_WS_D64_MIN_SEQLEN_K = old_min
            if old is None:
                del os.environ["ATTNKIT_CUPY_TMA"]
            else:
                os.environ["ATTNKIT_CUPY_TMA"] = old

    return wrapped


def _sdpa(backend_name: str) -> Callable:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = getattr(SDPBackend, backend_name)

    def run(q, k, v, causal):
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        with sdpa_kernel(which):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    return run


# ---- correctness --------------------------------------------------------------------------------------------------
CHECK_SHAPES = [  # (b, sq, sk, h, d, causal)
    (1, 4096, 4096, 4, 128, False),
    (1, 4096, 4096, 4, 128, True),
    (1, 2048, 6000, 4, 128, True),
    (1, 6000, 2048, 4, 64, True),
    (2, 4096, 4096, 4, 64, False),
]


def check(fn: Callable, shapes: list[tuple]) -> tuple[bool, list[str]]:
    from attnkit.testing import attention_ref, max_abs_error

    ok, lines = True, []
    for i, (b, sq, sk, h, d, causal) in enumerate(shapes):
        q, k, v = _inputs(b, sq, sk, h, d, seed=100 + i)
        torch.full((1 << 26,), float("nan"), device=DEV)  # poison the allocator's free blocks
        out = fn(q, k, v, causal)
        ref = attention_ref(q.double(), k.double(), v.double(), causal=causal)
        plain = attention_ref(q, k, v, causal=causal, upcast=False)
        err, allowed = max_abs_error(out, ref), 2 * max_abs_error(plain, ref) + ATOL
        good = bool(not out.isnan().any()) and err <= allowed
        ok &= good
        lines.append(
            f"{b}x{sq}x{sk}x{h}x{d} causal={causal}: err {err:.2e} allowed {allowed:.2e} {'ok' if good else 'FAIL'}"
        )
        del ref, plain
    return ok, lines


# ---- main ---------------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for cupy_ws_bench.md / .json")
    ap.add_argument("--quick", action="store_true", help="seqlens 4k/8k only, fewer rounds")
    ap.add_argument("--no-ablations", action="store_true", help="skip the ablation variants")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--dims", default="64,128", help="comma list of head dims (64, 128) to time")
    ap.add_argument(
        "--ablation-seqlens",
        default="8192",
        help="comma list of sequence lengths the ablation variants run at (default 8192)",
    )
    args = ap.parse_args()
    ablation_seqlens = [int(x) for x in args.ablation_seqlens.split(",")]
    dims = [int(x) for x in args.dims.split(",")]
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    t0 = time.time()
    import cupy

    import attnkit

    cap = torch.cuda.get_device_capability()
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "capability": f"sm_{cap[0]}{cap[1]}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": str(torch.backends.cudnn.version()),
        "cupy": cupy.__version__,
        "attnkit": getattr(attnkit, "__version__", "?"),
        "python": platform.python_version(),
    }
    print(" | ".join(f"{k} {v}" for k, v in meta.items()), flush=True)
    if cap != (9, 0):
        print("fwd_sm90_ws needs an sm_90 GPU", file=sys.stderr)
        return 2

    variants = {"default": {}} if args.no_ablations else {k: v for d in (64, 128) for k, v in _variants(d).items()}
    # 1. correctness (also compiles every module before any timing), on the shapes whose head dim has the variant.
    checks: dict[str, dict] = {}
    for name, kw in variants.items():
        shapes = [s for s in CHECK_SHAPES if name in _variants(s[4])]
        ok, lines = check(_ws(kw), shapes if name == "default" else [s for s in CHECK_SHAPES[1:4] if s in shapes])
        checks[f"ws:{name}"] = {"ok": ok, "lines": lines}
        print(f"check ws:{name}: {'ok' if ok else 'FAIL'}", *lines, sep="\n  ", flush=True)
    ok, lines = check(_attnkit(tma=True), CHECK_SHAPES[:2])
    checks["attnkit auto (WS path)"] = {"ok": ok, "lines": lines}
    print(f"check attnkit auto: {'ok' if ok else 'FAIL'}", flush=True)

    # 2. main table.
    providers = {
        "fwd_sm90_ws": _attnkit(tma=True),
        "fwd_sm90": _attnkit(tma=False),
        "sdpa_cudnn": _sdpa("CUDNN_ATTENTION"),
        "sdpa_flash": _sdpa("FLASH_ATTENTION"),
    }
    seqlens = (4096, 8192) if args.quick else (2048, 4096, 8192, 16384)
    rounds = 3 if args.quick else args.rounds
    rows = []
    for d in dims:
        for causal in (False, True):
            for s in seqlens:
                b, h = TOKENS // s, HIDDEN // d
                q, k, v = _inputs(b, s, s, h, d, seed=s + d)
                flops = _flops(b, h, s, s, d, causal)
                row = {"d": d, "causal": causal, "seqlen": s, "batch": b, "heads": h}
                for name, fn in providers.items():
                    try:
                        ms = median_batch_ms(
                            lambda fn=fn, q=q, k=k, v=v, c=causal: fn(q, k, v, c), warmup=3, rounds=rounds, iters=5
                        )
                        row[name] = {"ms": ms, "tflops": flops / ms / 1e9}
                    except Exception as exc:  # a provider missing on this build (e.g. cuDNN attention)
                        row[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
                rows.append(row)
                print(_row_text(row, list(providers)), flush=True)

    # 3. ablations.
    ablations = []
    if not args.no_ablations:
        # fwd_sm90 (the wgmma kernel without warp specialisation) as the reference column.
        for d, causal, s in itertools.product(dims, (False, True), ablation_seqlens):
            variant_fns = {name: _ws(kw) for name, kw in _variants(d).items()} | {"fwd_sm90": _attnkit(tma=False)}
            b, h = TOKENS // s, HIDDEN // d
            q, k, v = _inputs(b, s, s, h, d, seed=7 + d)
            flops = _flops(b, h, s, s, d, causal)
            row = {"d": d, "causal": causal, "seqlen": s}
            for name, fn in variant_fns.items():
                ms = median_batch_ms(
                    lambda fn=fn, q=q, k=k, v=v, c=causal: fn(q, k, v, c), warmup=3, rounds=rounds, iters=5
                )
                row[name] = {"ms": ms, "tflops": flops / ms / 1e9}
            ablations.append(row)
            print(_row_text(row, list(variant_fns)), flush=True)

    elapsed = time.time() - t0
    meta["elapsed_s"] = round(elapsed, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"meta": meta, "checks": checks, "forward": rows, "ablations": ablations}
    (args.out / "cupy_ws_bench.json").write_text(json.dumps(result, indent=1))
    (args.out / "cupy_ws_bench.md").write_text(_markdown(result, list(providers)))
    print(f"wrote {args.out}/cupy_ws_bench.md and .json in {elapsed:.0f} s")
    return 0 if all(c["ok"] for c in checks.values()) else 1


def _cell(entry: dict) -> str:
    return f"{entry['tflops']:.0f}" if "tflops" in entry else "n/a"


def _row_text(row: dict, names: list[str]) -> str:
    head = f"d{row['d']} {'causal' if row['causal'] else 'full'} {row['seqlen']}"
    return head + ": " + ", ".join(f"{n} {_cell(row[n])}" for n in names)


def _markdown(result: dict, providers: list[str]) -> str:
    m = result["meta"]
    lines = [
        "# fwd_sm90_ws forward benchmark",
        "",
        f"{m['gpu']} ({m['capability']}), torch {m['torch']}, CUDA {m['cuda']}, cuDNN {m['cudnn']}, cupy {m['cupy']}; "
        f"{m['date']}; {m['elapsed_s']} s. bf16, 16k tokens, hidden 2048; TFLOP/s (4*B*H*S*S*D, halved causal), "
        "median over rounds of CUDA-event timings.",
        "",
        "## Correctness (float64 reference, flash-attn rule)",
        "",
    ]
    for name, c in result["checks"].items():
        lines.append(f"- {name}: {'ok' if c['ok'] else '**FAIL**'}")
        lines += [f"  - {line}" for line in c["lines"]]
    lines += ["", "## Forward TFLOP/s", ""]
    lines.append("| d | mask | seqlen | " + " | ".join(providers) + " | ws / cuDNN |")
    lines.append("|---" * (len(providers) + 4) + "|")
    for r in result["forward"]:
        ratio = "n/a"
        if "tflops" in r["fwd_sm90_ws"] and "tflops" in r["sdpa_cudnn"]:
            ratio = f"{r['fwd_sm90_ws']['tflops'] / r['sdpa_cudnn']['tflops']:.2f}x"
        cells = " | ".join(_cell(r[p]) for p in providers)
        lines.append(f"| {r['d']} | {'causal' if r['causal'] else 'full'} | {r['seqlen']} | {cells} | {ratio} |")
    if result["ablations"]:
        names = list(dict.fromkeys(n for r in result["ablations"] for n in r if n not in ("d", "causal", "seqlen")))
        lines += ["", "## Ablations (fwd_sm90_ws variants and fwd_sm90, TFLOP/s; ratio to default)", ""]
        lines.append("| d | mask | seqlen | " + " | ".join(names) + " |")
        lines.append("|---" * (len(names) + 3) + "|")
        for r in result["ablations"]:
            base = r["default"]["tflops"]
            cells = " | ".join(f"{r[n]['tflops']:.0f} ({r[n]['tflops'] / base:.2f})" if n in r else "-" for n in names)
            lines.append(f"| {r['d']} | {'causal' if r['causal'] else 'full'} | {r['seqlen']} | {cells} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
