"""Development driver for the Triton backend: what runs on the GPU machine, plus a CPU-only compile report.

Subcommands
  xcompile [--dims 64,128] [--dtypes bf16,fp32]   compile every tile for sm_90 WITHOUT a GPU (fake driver) and
                                                  print registers / stack (spills) / shared memory / TMA use
  gputests [--procs N]                            run every GPU test but tests/cupy's in N parallel shards
  precompile [--procs N]                          fill triton's cache with every autotune candidate of the
                                                  benchmark shapes, in parallel (the autotuner then only times)
  fastcheck                                       CPU only: the forward's host fast path hands the launcher what
                                                  triton's JIT dispatch does (fake sm_90 driver), and host times
  overhead                                        host time per forward call, fast launch path off / on
  fwdsweep [--seqlens ...] [--dims ...] [--ws]    forward tile / persistent-grid variants vs SDPA flash, cuDNN,
                                                  FlexAttention (all checked against SDPA), host overhead
  spread [--seqlen 8192 --dim 128 --causal]       per-call times of triton (autotuned and forced tiles), SDPA
                                                  flash / cuDNN and FlexAttention: back-to-back blocks, blocks
                                                  after a pause, round-robin
  bwdsweep [--seqlens ...] [--dims ...]          backward dK/dV and dQ tile variants vs the SDPA flash / cuDNN and
                                                  FlexAttention backwards, in rounds, gradients checked
  decodesweep [--kv-lens ...]                     the split-KV decoding kernel's key block / warps / stages / split
                                                  count vs SDPA flash and cuDNN, in rounds, outputs checked
  bench [--seqlens ...] [--flex-seqlens ...] [--out FILE]
                                                  check, then time triton_cuda against SDPA flash / cuDNN and
                                                  FlexAttention on flash-attn's shapes (16k tokens, 2048 hidden)

FLOPs follow flash-attn's benchmark: forward 4*B*H*Sq*Sk*D (halved when causal), backward 2.5x forward.
Times are triton.testing.do_bench medians.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.environ.get("OUT", os.path.join(ROOT, "benchmarks", "results"))
TOKENS, HIDDEN = 16384, 2048


# ---------------------------------------------------------------------------------------------------------------
# xcompile: sm_90 compile report on a machine without a GPU
# ---------------------------------------------------------------------------------------------------------------
def xcompile(args: argparse.Namespace) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["ATTNKIT_TRITON_AUTOTUNE"] = "0"
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import jit as jitmod
    from triton.runtime.driver import driver

    class FakeDriver:  # just enough of a driver for JITFunction.run(warmup=True) to compile
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    driver.set_active(FakeDriver())
    compiled: list[tuple[str, dict, object, str | None]] = []
    original_run = jitmod.JITFunction.run

    def compile_only(self, *a, grid, warmup, **kw):
        try:
            compiled.append((self.fn.__name__, kw, original_run(self, *a, grid=grid, warmup=True, **kw), None))
        except Exception as exc:
            compiled.append((self.fn.__name__, kw, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"))

    jitmod.JITFunction.run = compile_only
    from attnkit.backends.triton import configs, launch

    from attnkit.params import AttentionParams

    launch._tma_eligible = lambda prob, tensors: True
    launch._tma_scratch = lambda enabled: contextlib.nullcontext()
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

    def resources(kernel) -> str:
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(kernel.asm["cubin"])
        text = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        fields = next(line for line in text.splitlines() if "REG:" in line).split()
        ptx = kernel.asm["ptx"]
        return " ".join(x for x in fields if x.startswith(("REG", "STACK"))) + (
            f" smem={kernel.metadata.shared} wgmma={ptx.count('wgmma.mma_async')}"
            f" tma={ptx.count('cp.async.bulk.tensor')}"
        )

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    print(f"triton {triton.__version__}, target sm_90")
    for d, dname in itertools.product([int(x) for x in args.dims.split(",")], args.dtypes.split(",")):
        dtype = dtypes[dname]
        cands = {kind: configs.candidates(kind, "nvidia", d, dtype.itemsize, tma=True) for kind in configs.KINDS}
        original_default = configs.default
        for i in range(max(len(c) for c in cands.values())):
            configs.default = lambda kind, vendor, bd, eb, tma=False, i=i, c=cands: c[kind][min(i, len(c[kind]) - 1)]
            launch.FAST_LAUNCH = False  # every candidate must go through the JIT (and compile)
            compiled.clear()
            q, k, v = (torch.randn(1, 256, 2, d, dtype=dtype) for _ in range(3))
            params = AttentionParams(softmax_scale=0.1, causal=True, window_right=0)
            out, lse = launch.forward(q, k, v, None, params, None, "nvidia")
            launch.backward(out, q, k, v, out, lse, None, params, None, "nvidia")
            for name, kw, kernel, err in compiled:
                kind = {"attn_fwd": "fwd", "attn_bwd_dkdv": "dkdv", "attn_bwd_dq": "dq"}.get(name)
                if kind is None or i >= len(cands[kind]):
                    continue
                tile = (
                    f"d={d} {dname} {kind:4s} BM={kw['BLOCK_M']:<3} BN={kw['BLOCK_N']:<3} "
                    f"w={kw['num_warps']} s={kw['num_stages']} tma={int(kw['USE_TMA'])}"
                )
                print(tile, err if err else resources(kernel))
        configs.default = original_default


# ---------------------------------------------------------------------------------------------------------------
# fastcheck: the forward's host fast path against triton's own JIT dispatch, on a machine without a GPU
# ---------------------------------------------------------------------------------------------------------------
def fastcheck(args: argparse.Namespace) -> int:
    """Compile for sm_90 through a fake driver, stub the launcher, and check that the fast path hands it exactly
    the arguments triton's JIT path does (the real JIT of the installed triton); then time both on the host."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["ATTNKIT_TRITON_AUTOTUNE"] = "0"
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compiler
    from triton.runtime.driver import driver

    class FakeDriver:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    driver.set_active(FakeDriver())
    launches: list[tuple] = []
    compiler.CompiledKernel.run = property(lambda self: lambda *a: launches.append(a))  # the launcher, stubbed
    compiler.CompiledKernel._init_handles = lambda self: None  # no module load: nothing runs
    compiler.CompiledKernel.function = None
    from attnkit.backends.triton import launch

    from attnkit.params import AttentionParams

    launch._tma_eligible = lambda prob, tensors: False  # CPU tensors
    print(f"triton {triton.__version__}, fast path supported: {launch._FAST_LAUNCH_SUPPORTED}")
    cases = [
        ((8, 2048, 32, 64), None, AttentionParams(softmax_scale=0.125)),
        ((1, 128, 2, 64), None, AttentionParams(softmax_scale=0.125, causal=True, window_right=0)),
        (
            (2, 300, 4, 96),
            torch.rand(4),
            AttentionParams(softmax_scale=0.1, window_left=50, window_right=0, softcap=5.0),
        ),
    ]
    rc = 0
    for shape, alibi, params in cases:
        q, k, v = (torch.randn(*shape, dtype=torch.bfloat16) for _ in range(3))
        launch.FAST_LAUNCH = True
        launch._fwd_plans.clear()
        launches.clear()
        o1, l1 = launch.forward(q, k, v, alibi, params, None, "nvidia")  # triton's JIT dispatch
        o2, l2 = launch.forward(q, k, v, alibi, params, None, "nvidia")  # the plan
        same = len(launches) == 2 and len(launches[0]) == len(launches[1])
        for i, (a, b) in enumerate(zip(*launches)) if same else ():
            if isinstance(a, torch.Tensor):
                same &= a is b or (a is o1 and b is o2) or (a is l1 and b is l2)
            elif i not in (6, 7, 8):  # launch metadata and hooks: per call objects
                same &= a == b and type(a) is type(b)
        rc |= not same
        times = {}
        for fast in (False, True):
            launch.FAST_LAUNCH = fast
            reps = []
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(300):
                    launch.forward(q, k, v, alibi, params, None, "nvidia")
                reps.append((time.perf_counter() - t) / 300 * 1e6)
            times[fast] = sorted(reps)[2]
        print(
            f"{shape} alibi={alibi is not None} {params}: launcher arguments identical: {same} "
            f"({len(launches[0])}); host us/call full {times[False]:.1f}, fast {times[True]:.1f}"
        )
    return rc


# ---------------------------------------------------------------------------------------------------------------
# gputests: the GPU test module in parallel shards (compilation dominates; the GPU is mostly idle)
# ---------------------------------------------------------------------------------------------------------------
def gputests(args: argparse.Namespace) -> int:
    # PYTHONSAFEPATH: `python -m pytest` from the repository root must not import ./attnkit (which lacks
    # attnkit.backends) instead of the installed package.
    env = {**os.environ, "ATTNKIT_TRITON_AUTOTUNE": "0", "PYTHONUNBUFFERED": "1", "PYTHONSAFEPATH": "1"}
    # Every GPU test but the CuPy module's (gpu_validate.sh runs that one beside): the Triton kernels, every
    # autotune tile, the full grid, the KV cache, and the GPU tests of the frontend (compile, integrations...).
    test_dir = os.path.join(ROOT, "tests")
    listed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "-q",
            "--collect-only",
            test_dir,
            f"--ignore={os.path.join(test_dir, 'cupy')}",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    ).stdout
    ids = [line.strip() for line in listed.splitlines() if "::" in line]
    big = [i for i in ids if "int64" in i]  # tens of GB each: run alone, after the shards
    small = [i for i in ids if i not in big]
    if not ids:
        print(f"no GPU tests collected from {test_dir}:\n{listed}")
        return 1
    shards = [small[i :: args.procs] for i in range(args.procs)]
    procs = []
    for n, shard in enumerate(s for s in shards if s):
        log = open(os.path.join(OUT, f"gputests_{n}.log"), "w")
        # No -x: a failure must not hide the tests after it in the shard.
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfE", "-p", "no:cacheprovider", *shard]
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT), log))
    rc = 0
    for p, log in procs:
        rc |= p.wait()
        log.close()
    if big:
        with open(os.path.join(OUT, "gputests_big.log"), "w") as log:
            rc |= subprocess.run(
                [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *big],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
            ).returncode
    for name in sorted(os.listdir(OUT)):
        if name.startswith("gputests_"):
            tail = open(os.path.join(OUT, name)).read().strip().splitlines()[-12:]
            print(f"--- {name}\n" + "\n".join(tail))
    return rc


# ---------------------------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------------------------
def _shapes(seqlens: list[int]) -> list[tuple[int, int, int, int, bool]]:
    """(batch, seqlen, heads, headdim, causal) with 16k tokens and hidden 2048, as in flash-attn's benchmark."""
    return [(TOKENS // s, s, HIDDEN // d, d, causal) for d in (64, 128) for causal in (False, True) for s in seqlens]


def _flops(b: int, s: int, h: int, d: int, causal: bool) -> float:
    return 4 * b * h * s * s * d / (2 if causal else 1)


def _precompile_worker(task: tuple[int, bool, int]) -> str:
    """Compile candidate ``i`` of every kernel kind for one (head dim, causal) at a benchmark-like shape."""
    d, causal, i = task
    os.environ["ATTNKIT_TRITON_AUTOTUNE"] = "0"
    import torch
    from attnkit.backends.triton import configs, launch

    from attnkit.params import AttentionParams

    def pick(kind, vendor, block_d, elem_bytes, tma=False):
        cands = configs.candidates(kind, vendor, block_d, elem_bytes, tma)
        return cands[min(i, len(cands) - 1)]

    configs.default = pick
    launch.FAST_LAUNCH = False  # a pool process runs several candidates of one shape: no remembered tile
    b, s, h = 1, 1024, HIDDEN // d
    q, k, v = (torch.randn(b, s, h, d, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    params = AttentionParams(softmax_scale=d**-0.5, causal=causal, window_right=0 if causal else -1)
    t = time.time()
    try:
        out, lse = launch.forward(q, k, v, None, params, None, "nvidia")
        launch.backward(out, q, k, v, out, lse, None, params, None, "nvidia")
        torch.cuda.synchronize()
        return f"d={d} causal={causal} cand={i}: ok {time.time() - t:.1f}s"
    except Exception as exc:
        return f"d={d} causal={causal} cand={i}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def precompile(args: argparse.Namespace) -> None:
    import multiprocessing as mp

    from attnkit.backends.triton import configs

    tasks = []
    for d, causal in itertools.product((64, 128), (False, True)):
        n = max(len(configs.candidates(kind, "nvidia", d, 2, tma=True)) for kind in configs.KINDS)
        tasks += [(d, causal, i) for i in range(n)]
    t = time.time()
    with mp.get_context("spawn").Pool(args.procs) as pool:
        for line in pool.imap_unordered(_precompile_worker, tasks):
            print(line, flush=True)
    print(f"precompiled {len(tasks)} tasks in {time.time() - t:.0f}s")


def _bench(fn: Callable[[], object]) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def bench(args: argparse.Namespace) -> None:
    import torch
    from attnkit.backends.triton import launch

    start = time.time()
    seqlens = [int(x) for x in args.seqlens.split(",")]
    flex_seqlens = {int(x) for x in args.flex_seqlens.split(",") if x}
    flex = torch.compile(_flex_attention(), dynamic=False) if flex_seqlens else None
    header = _run_header()
    print(header, flush=True)
    rows = []
    for b, s, h, d, causal in _shapes(seqlens):
        use_flex = flex if s in flex_seqlens and time.time() - start < args.budget_s else None
        rows.append(_bench_shape(b, s, h, d, causal, use_flex))
        print(_row_line(rows[-1]), flush=True)
        torch.cuda.empty_cache()
        _save(args, header, rows, launch)  # after every row: a run cut short still leaves its numbers
    print(_table(header, rows))


def _flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def _run_header() -> str:
    """GPU, versions and UTC time: the first line of every GPU report."""
    import torch
    import triton

    return (
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    )


def _training_inputs(b: int, s: int, h: int, d: int) -> tuple:
    """q, k, v, dout in attnkit's (B, S, H, D) layout and contiguous (B, H, S, D) copies for SDPA and
    FlexAttention; the q/k/v of both need grad. Seeded by shape, so every run sees the same numbers."""
    import torch

    gen = torch.Generator(device="cuda").manual_seed(s + d)
    q, k, v, dout = (torch.randn(b, s, h, d, dtype=torch.bfloat16, device="cuda", generator=gen) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    qt, kt, vt, dot = (t.detach().transpose(1, 2).contiguous() for t in (q, k, v, dout))
    for t in (qt, kt, vt):
        t.requires_grad_(True)
    return q, k, v, dout, qt, kt, vt, dot


def _bench_shape(b: int, s: int, h: int, d: int, causal: bool, flex) -> dict:
    """Check triton_cuda against SDPA-flash on one shape, then time every implementation (TFLOP/s)."""
    import torch
    import torch.nn.functional as F
    from attnkit.backends.triton import launch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import attnkit

    q, k, v, dout, qt, kt, vt, dot = _training_inputs(b, s, h, d)
    row: dict = {"seqlen": s, "d": d, "causal": causal, "batch": b, "heads": h}

    def tri_fwd():
        return attnkit.attention(q, k, v, causal=causal, backend="triton_cuda")

    def sdpa_fwd():
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    out = tri_fwd()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        ref = sdpa_fwd()
    row["check_fwd"] = float((out.detach().transpose(1, 2) - ref.detach()).abs().max())
    g_tri = torch.autograd.grad(out, (q, k, v), dout)
    g_ref = torch.autograd.grad(ref, (qt, kt, vt), dot)
    row["check_bwd"] = max(float((a.transpose(1, 2) - r).abs().max()) for a, r in zip(g_tri, g_ref))
    row["ok"] = row["check_fwd"] < 0.05 and row["check_bwd"] < 0.25

    def timed(label: str, fwd: Callable[[], torch.Tensor], inputs, grad_out) -> None:
        try:
            row[f"{label}_fwd"] = _bench(fwd)
            o = fwd()
            row[f"{label}_bwd"] = _bench(lambda: torch.autograd.grad(o, inputs, grad_out, retain_graph=True))
        except Exception as exc:
            row[f"{label}_err"] = f"{type(exc).__name__}: {str(exc)[:80]}"

    timed("triton", tri_fwd, (q, k, v), dout)
    # Repeated calls ran the host fast path (launch.FAST_LAUNCH): it must give the first call's bits.
    row["fast_bitwise"] = bool(torch.equal(tri_fwd().detach(), out.detach()))
    row["ok"] = row["ok"] and row["fast_bitwise"]
    launch.FAST_LAUNCH = False
    try:
        row["triton_slow_fwd"] = _bench(tri_fwd)
    finally:
        launch.FAST_LAUNCH = True
    os.environ["ATTNKIT_TRITON_AUTOTUNE"] = "0"
    timed("triton_default", tri_fwd, (q, k, v), dout)
    del os.environ["ATTNKIT_TRITON_AUTOTUNE"]
    for label, kind in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        with sdpa_kernel(kind):
            timed(label, sdpa_fwd, (qt, kt, vt), dot)
    if flex is not None:
        from torch.nn.attention.flex_attention import create_block_mask

        mask = create_block_mask(lambda b_, h_, i, j: i >= j, None, None, s, s, device="cuda") if causal else None
        timed("flex", lambda: flex(qt, kt, vt, block_mask=mask), (qt, kt, vt), dot)
    fwd_flops = _flops(b, s, h, d, causal)
    for key in list(row):
        if key.endswith("_fwd") and not key.startswith("check"):
            row[key.replace("_fwd", "_fwd_tflops")] = fwd_flops / row[key] / 1e9
        if key.endswith("_bwd") and not key.startswith("check"):
            row[key.replace("_bwd", "_bwd_tflops")] = 2.5 * fwd_flops / row[key] / 1e9
    return row


def _save(args: argparse.Namespace, header: str, rows: list[dict], launch) -> None:
    tuned = {" ".join(map(str, key)): str(tile) for key, tile in launch._tuned.items()}
    path = args.out or os.path.join(OUT, "triton_bench.md")
    with open(path, "w") as f:
        f.write(
            _table(header, rows)
            + "\n\nAutotuned configs:\n\n"
            + "\n".join(f"- `{k}`: {v}" for k, v in sorted(tuned.items()))
            + "\n"
        )
    with open(os.path.join(OUT, "triton_bench.json"), "w") as f:
        json.dump({"header": header, "rows": rows, "tuned": tuned}, f, indent=1)


def _row_line(row: dict) -> str:
    parts = [f"S={row['seqlen']:<5} d={row['d']:<3} causal={int(row['causal'])} ok={int(row['ok'])}"]
    for label in ("triton", "triton_slow", "triton_default", "flash", "cudnn", "flex"):
        if f"{label}_fwd_tflops" in row:
            parts.append(f"{label} {row[f'{label}_fwd_tflops']:.0f}/{row.get(f'{label}_bwd_tflops', 0):.0f}")
        elif f"{label}_err" in row:
            parts.append(f"{label} ERR")
    return " | ".join(parts)


def _table(header: str, rows: list[dict]) -> str:
    cols = ("triton", "triton_slow", "triton_default", "flash", "cudnn", "flex")
    lines = [
        f"### Triton backend vs baselines: TFLOP/s fwd / bwd ({header})",
        "",
        "bf16, 16k tokens, hidden 2048. `triton` = autotuned, `triton_slow` = the same with the forward's host "
        "fast path off (forward only), `triton_default` = ATTNKIT_TRITON_AUTOTUNE=0. "
        "ok = output and grads agree with SDPA-flash, and the fast path's output is bitwise the first call's.",
        "",
        "| seqlen | d | causal | ok | " + " | ".join(cols) + " | fwd vs flash | bwd vs flash | fwd vs flex |",
        "|---|---|---|---|" + "---|" * len(cols) + "---|---|---|",
    ]
    for r in rows:
        cells = []
        for c in cols:
            if f"{c}_fwd_tflops" in r:
                cells.append(f"{r[f'{c}_fwd_tflops']:.0f} / {r.get(f'{c}_bwd_tflops', float('nan')):.0f}")
            else:
                cells.append("err" if f"{c}_err" in r else "-")
        vs_f = r.get("triton_fwd_tflops", 0) / r["flash_fwd_tflops"] if "flash_fwd_tflops" in r else float("nan")
        vs_b = r.get("triton_bwd_tflops", 0) / r["flash_bwd_tflops"] if "flash_bwd_tflops" in r else float("nan")
        lines.append(
            f"| {r['seqlen']} | {r['d']} | {int(r['causal'])} | {'yes' if r['ok'] else 'NO'} | "
            + " | ".join(cells)
            + f" | {vs_f:.2f}x | {vs_b:.2f}x | "
            + (f"{r['triton_fwd_tflops'] / r['flex_fwd_tflops']:.2f}x |" if "flex_fwd_tflops" in r else "- |")
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# fwdsweep: forward tile / grid variants against SDPA flash, cuDNN and FlexAttention, plus host overhead
# ---------------------------------------------------------------------------------------------------------------
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


def _tile_name(t) -> str:
    return (
        f"{t.block_m}x{t.block_n} w{t.num_warps} s{t.num_stages}{' tma' if t.use_tma else ''}"
        + (f" p{t.persistent}" if t.persistent else "")
        + (" ws" if t.warp_specialize else "")
    )


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
        return f"compiled d={d} causal={int(causal)} {_tile_name(tile)}: {time.time() - t:.0f}s"
    except Exception as exc:
        return f"compiled d={d} causal={int(causal)} {_tile_name(tile)}: {type(exc).__name__} {str(exc)[:120]}"


def _host_overhead() -> str:
    """Per-call host time (wall clock over back-to-back calls, no sync) vs device time, with the forward's fast
    launch path off and on; the tiny shape is CPU-bound, so its do_bench time is the host time."""
    import torch
    import torch.nn.functional as F
    from attnkit.backends.triton import launch
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
            launch.FAST_LAUNCH = fast
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
                    dev = _bench(fn) * 1e3
                label = name if name == "sdpa_flash" else f"{name} fast={int(fast)}"
                lines.append(
                    f"B={b} S={s} H={h} d={d} {label:26s} host {host:6.1f} us/call, wall {wall:7.1f}, "
                    f"do_bench {dev:7.1f} us"
                )
    launch.FAST_LAUNCH = True
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
    header = _run_header()
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
    flex = torch.compile(_flex_attention(), dynamic=False)
    seqlens = [int(x) for x in args.seqlens.split(",")]
    results = []
    for b, s, h, d, causal in sorted(_shapes(seqlens), key=lambda x: -x[1]):
        if d not in dims:
            continue
        gen = torch.Generator(device="cuda").manual_seed(s + d)
        q, k, v = (torch.randn(b, s, h, d, dtype=torch.bfloat16, device="cuda", generator=gen) for _ in range(3))
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        flops = _flops(b, s, h, d, causal)
        row = {"seqlen": s, "d": d, "causal": causal, "variants": {}}
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            ref = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)
        for tile in _sweep_tiles(d, args.ws):
            name = _tile_name(tile)
            try:
                with _forced_fwd_tile(tile):
                    fn = functools.partial(attnkit.attention, q, k, v, causal=causal, backend="triton_cuda")
                    err = float((fn() - ref).abs().max())
                    ms = _bench(fn)
                row["variants"][name] = (flops / ms / 1e9, err)
            except Exception as exc:
                row["variants"][name] = (0.0, f"{type(exc).__name__}")
        for label, kind in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            with sdpa_kernel(kind):
                sdpa = functools.partial(F.scaled_dot_product_attention, qt, kt, vt, is_causal=causal)
                row[label] = flops / _bench(sdpa) / 1e9
        if time.time() - start < args.budget_s:
            from torch.nn.attention.flex_attention import create_block_mask

            mask = create_block_mask(lambda b_, h_, i, j: i >= j, None, None, s, s, device="cuda") if causal else None
            try:
                row["flex"] = flops / _bench(functools.partial(flex, qt, kt, vt, block_mask=mask)) / 1e9
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


# ---------------------------------------------------------------------------------------------------------------
# spread: where the run-to-run spread of the forward timings comes from
# ---------------------------------------------------------------------------------------------------------------
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
    from attnkit.backends.triton import configs, launch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import attnkit

    T = configs.Tile
    s, d, causal = args.seqlen, args.dim, args.causal
    b, h = TOKENS // s, HIDDEN // d
    gen = torch.Generator(device="cuda").manual_seed(s)
    q, k, v = (torch.randn(b, s, h, d, dtype=torch.bfloat16, device="cuda", generator=gen) for _ in range(3))
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    flops = _flops(b, s, h, d, causal)
    fns: dict[str, Callable[[], object]] = {}
    fns["triton auto"] = functools.partial(attnkit.attention, q, k, v, causal=causal, backend="triton_cuda")
    fns["triton auto"]()  # autotunes
    tuned = {str(key): _tile_name(t) for key, t in launch._tuned.items() if key[0] == "fwd"}
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

        fns[f"triton {_tile_name(tile)}"] = call
    flex = torch.compile(_flex_attention(), dynamic=False)
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


# ---------------------------------------------------------------------------------------------------------------
# bwdsweep: backward tile variants, timed in rounds with the peers' backwards
# ---------------------------------------------------------------------------------------------------------------
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
    variants += [(f"dkdv {_tile_name(t)}", t, dq0) for t in tiles["dkdv"] if t != dkdv0]
    variants += [(f"dq {_tile_name(t)}", dkdv0, t) for t in tiles["dq"] if t != dq0]
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


def _sweep_report(name: str, header: str, case: list[str], lines: list[str], results: list[dict]) -> None:
    """After each case of a sweep: its lines to stdout and to ``lines``, then OUT/<name>.md and .json rewritten,
    so a run cut short still leaves complete files."""
    print("\n".join(case), flush=True)
    lines += case
    with open(os.path.join(OUT, f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump({"header": header, "rows": results}, f, indent=1)


def _bwd_sweep_case(b: int, s: int, h: int, d: int, causal: bool, flex, budget_s: float) -> dict:
    """One shape of `bwdsweep`: gradients of every variant checked against SDPA-flash's, then all timed."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import attnkit
    from attnkit.bench.timing import CudaClock, measure_interleaved

    q, k, v, dout, qt, kt, vt, dot = _training_inputs(b, s, h, d)
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
    bwd_flops = 2.5 * _flops(b, s, h, d, causal)
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
    header = _run_header()
    print(header, flush=True)
    dims = [int(x) for x in args.dims.split(",")]
    tasks = [(d, c, i) for d in dims for c in (False, True) for i in range(len(_bwd_variants(d)))]
    with mp.get_context("spawn").Pool(args.procs) as pool:
        for line in pool.imap_unordered(_bwd_compile_worker, tasks):
            print(line, flush=True)
    print(f"compiled {len(tasks)} variants in {time.time() - start:.0f}s", flush=True)
    flex = torch.compile(_flex_attention(), dynamic=False)
    results = []
    lines = [f"### Backward variants, TFLOP/s in rounds ({header})", ""]
    for b, s, h, d, causal in _shapes([int(x) for x in args.seqlens.split(",")]):
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
        _sweep_report("bwdsweep", header, case, lines, results)
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# decodesweep: the split-KV decoding kernel's key block, warps, stages and split count
# ---------------------------------------------------------------------------------------------------------------
_DECODE_VARIANTS = [  # (key block, warps, stages, waves of programs); the first is the shipped setting
    (64, 4, 2, 2),
    (64, 4, 3, 2),
    (64, 4, 4, 2),
    (64, 8, 3, 2),
    (64, 4, 3, 4),
    (128, 4, 2, 2),
    (128, 4, 3, 2),
    (128, 8, 3, 2),
    (128, 8, 2, 4),
    (32, 4, 4, 2),
]


@contextlib.contextmanager
def _decode_setting(block_n: int, warps: int, stages: int, waves: int):
    from attnkit.backends.triton import kvcache_launch as kl

    saved = (kl._BLOCK_N, kl._NUM_WARPS, kl._NUM_STAGES, kl._WAVES)
    kl._BLOCK_N, kl._NUM_WARPS, kl._NUM_STAGES, kl._WAVES = block_n, warps, stages, waves
    try:
        yield
    finally:
        kl._BLOCK_N, kl._NUM_WARPS, kl._NUM_STAGES, kl._WAVES = saved


def _decode_case(kv: int, budget_s: float) -> dict:
    """One KV length of `decodesweep`. Every setting is checked against SDPA-flash, captured in a CUDA graph and
    its replays timed in rounds with SDPA flash's and cuDNN's (GPU time alone: a decode step is shorter than the
    host time of an eager call). The host time of eager calls (wall clock per call, synchronised at the end of
    100 back-to-back calls) is measured too."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import attnkit
    from attnkit.bench.timing import CudaClock, measure_interleaved

    b, hq, hk, d = 131072 // kv, 32, 8, 128
    gen = torch.Generator(device="cuda").manual_seed(kv)
    q = torch.randn(b, 1, hq, d, dtype=torch.bfloat16, device="cuda", generator=gen)
    k, v = (torch.randn(b, kv, hk, d, dtype=torch.bfloat16, device="cuda", generator=gen) for _ in range(2))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        ref = F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True).transpose(1, 2)
    eager: dict[str, Callable[[], object]] = {}
    errors: dict[str, float] = {}
    for setting in _DECODE_VARIANTS:

        def call(setting=setting):
            with _decode_setting(*setting):
                return attnkit.attention_with_kvcache(q, k, v, backend="triton_cuda")

        name = "x".join(map(str, setting))
        try:
            errors[name] = float((call() - ref).abs().max())
            eager[name] = call
        except Exception as exc:
            print(f"kv={kv} {name}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
    for label, kind in (("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION)):

        def sdpa_call(kind=kind):
            with sdpa_kernel(kind):
                return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)

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
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(100):
            fn()
        torch.cuda.synchronize()
        host_us[name] = (time.perf_counter() - t0) / 100 * 1e6
    return {"kv": kv, "batch": b, "gbs": gbs, "err": errors, "eager_us_per_call": host_us}


def decodesweep(args: argparse.Namespace) -> None:
    """One query token per sequence against a full cache (GQA 32/8, head dim 128, batch = 131072 / KV length, the
    benchmark's decode case): each setting of the split kernel checked against SDPA-flash, then CUDA-graph replays
    timed in rounds with SDPA flash's and cuDNN's (GB/s of K/V read), and the eager wall time per call."""
    import torch

    header = _run_header()
    lines = [f"### Decode settings (key block x warps x stages x waves), GB/s in rounds ({header})", ""]
    print(lines[0], flush=True)
    results = []
    for kv in (int(x) for x in args.kv_lens.split(",")):
        row = _decode_case(kv, args.budget_per_case)
        results.append(row)
        gbs, errors = row["gbs"], row["err"]
        eager = ", ".join(f"{n} {us:.0f} us" for n, us in row["eager_us_per_call"].items())
        case = [
            f"kv={kv} batch={row['batch']}: graph replays, flash {gbs.get('sdpa flash', 0):.0f}, cudnn "
            f"{gbs.get('sdpa cudnn', 0):.0f}; eager wall per call: {eager}"
        ]
        for name in sorted(errors, key=lambda n: -gbs.get(n, 0)):
            case.append(f"    {name:12s} {gbs.get(name, 0):6.0f}  err {errors[name]:.3g}")
        _sweep_report("decodesweep", header, case, lines, results)
        torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("xcompile")
    p.add_argument("--dims", default="64,128,256")
    p.add_argument("--dtypes", default="bf16")
    p = sub.add_parser("gputests")
    p.add_argument("--procs", type=int, default=4)
    p = sub.add_parser("precompile")
    p.add_argument("--procs", type=int, default=12)
    sub.add_parser("overhead")
    sub.add_parser("fastcheck")
    p = sub.add_parser("fwdsweep")
    p.add_argument("--seqlens", default="2048,8192")
    p.add_argument("--procs", type=int, default=16)
    p.add_argument("--budget-s", type=float, default=200.0, help="skip FlexAttention once this much time has passed")
    p.add_argument("--compile-only", action="store_true", help="only fill triton's cache with the variants")
    p.add_argument("--dims", default="64,128")
    p.add_argument("--ws", action="store_true", help="also the warp-specialised loops (some tiles abort triton 3.6)")
    p = sub.add_parser("spread")
    p.add_argument("--seqlen", type=int, default=8192)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--pause", type=float, default=1.0, help="idle seconds before each block in the second pass")
    p = sub.add_parser("bwdsweep")
    p.add_argument("--seqlens", default="2048,8192,16384")
    p.add_argument("--dims", default="128")
    p.add_argument("--procs", type=int, default=16)
    p.add_argument("--budget-per-case", type=float, default=0.15, help="seconds of calls per variant and shape")
    p = sub.add_parser("decodesweep")
    p.add_argument("--kv-lens", default="1024,4096,16384,65536")
    p.add_argument("--budget-per-case", type=float, default=0.1, help="seconds of calls per setting and length")
    p = sub.add_parser("bench")
    p.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384")
    p.add_argument("--flex-seqlens", default="2048,8192")
    p.add_argument("--budget-s", type=float, default=300.0, help="skip FlexAttention once this much time has passed")
    p.add_argument("--out", default="")
    args = parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    if args.cmd == "xcompile":
        xcompile(args)
    elif args.cmd == "gputests":
        return gputests(args)
    elif args.cmd == "fastcheck":
        return fastcheck(args)
    elif args.cmd == "overhead":
        overhead(args)
    elif args.cmd == "fwdsweep":
        fwdsweep(args)
    elif args.cmd == "precompile":
        precompile(args)
    elif args.cmd == "bwdsweep":
        bwdsweep(args)
    elif args.cmd == "decodesweep":
        decodesweep(args)
    elif args.cmd == "spread":
        spread(args)
    else:
        bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
