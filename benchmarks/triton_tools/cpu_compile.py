"""Commands that need no GPU: ``xcompile`` (compile every tile for sm_90 through a fake driver and report
registers, spills, shared memory and TMA use) and ``fastcheck`` (the forward's host fast path hands the launcher
what triton's JIT dispatch does)."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import subprocess
import tempfile
import time

# The masks xcompile can build each tile for (AttentionParams fields): every window side a kernel special-cases.
MASKS: dict[str, dict[str, object]] = {
    "causal": {"causal": True, "window_right": 0},
    "none": {},
    "left": {"window_left": 92},
    "right": {"window_right": 40},
    "band": {"window_left": 92, "window_right": 40},
}


def xcompile(args: argparse.Namespace) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["ATTNKIT_TRITON_AUTOTUNE"] = "0"
    import torch
    import triton
    from attnkit.backends.triton import compile_only
    from triton.runtime import jit as jitmod

    compile_only.activate()
    compiled: list[tuple[str, dict, object, str | None]] = []
    original_run = jitmod.JITFunction.run

    def warm_up_only(self, *a, grid, warmup, **kw):
        named = {**dict(zip(self.arg_names, a)), **kw}  # the launchers pass every parameter by position
        try:
            compiled.append((self.fn.__name__, named, original_run(self, *a, grid=grid, warmup=True, **kw), None))
        except Exception as exc:
            compiled.append((self.fn.__name__, named, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"))

    jitmod.JITFunction.run = warm_up_only
    from attnkit.backends.triton import configs, fastpath, launch, tma

    from attnkit.params import AttentionParams

    launch.tma_eligible = lambda prob, tensors: True
    tma.scratch = lambda enabled: contextlib.nullcontext()
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
    for mask in args.masks.split(","):
        if mask not in MASKS:
            raise SystemExit(f"xcompile: unknown mask {mask!r}; expected some of {sorted(MASKS)}")
    for mask, d, dname in itertools.product(
        args.masks.split(","), [int(x) for x in args.dims.split(",")], args.dtypes.split(",")
    ):
        dtype = dtypes[dname]
        cands = {kind: configs.candidates(kind, "nvidia", d, dtype.itemsize, tma=True) for kind in configs.KINDS}
        original_default = configs.default
        for i in range(max(len(c) for c in cands.values())):
            configs.default = lambda kind, vendor, bd, eb, tma=False, i=i, c=cands: c[kind][min(i, len(c[kind]) - 1)]
            fastpath.ENABLED = False  # every candidate must go through the JIT (and compile)
            compiled.clear()
            q, k, v = (torch.randn(1, 256, 2, d, dtype=dtype) for _ in range(3))
            params = AttentionParams(softmax_scale=0.1, **MASKS[mask])
            out, lse = launch.forward(q, k, v, None, params, None, "nvidia")
            launch.backward(out, q, k, v, out, lse, None, params, None, "nvidia")
            for name, kw, kernel, err in compiled:
                kind = {"attn_fwd": "fwd", "attn_bwd_dkdv": "dkdv", "attn_bwd_dq": "dq"}.get(name)
                if kind is None or i >= len(cands[kind]):
                    continue
                tile = (
                    f"{mask} d={d} {dname} {kind:4s} BM={kw['BLOCK_M']:<3} BN={kw['BLOCK_N']:<3} "
                    f"w={kw['num_warps']} s={kw['num_stages']} tma={int(kw['USE_TMA'])}"
                )
                print(tile, err if err else resources(kernel))
        configs.default = original_default


def fastcheck(args: argparse.Namespace) -> int:
    """Compile for sm_90 through a fake driver, stub the launcher, and check that the fast path hands it exactly
    the arguments triton's JIT path does (the real JIT of the installed triton); then time both on the host."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["ATTNKIT_TRITON_AUTOTUNE"] = "0"
    import torch
    import triton
    from attnkit.backends.triton import compile_only
    from triton.compiler import compiler

    compile_only.activate()
    launches: list[tuple] = []
    compiler.CompiledKernel.run = property(lambda self: lambda *a: launches.append(a))  # the launcher, stubbed
    compiler.CompiledKernel._init_handles = lambda self: None  # no module load: nothing runs
    compiler.CompiledKernel.function = None
    from attnkit.backends.triton import fastpath, launch

    from attnkit.params import AttentionParams

    launch.tma_eligible = lambda prob, tensors: False  # CPU tensors
    print(f"triton {triton.__version__}, fast path supported: {fastpath.SUPPORTED}")
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
        fastpath.ENABLED = True
        launch.fwd_plans.clear()
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
            fastpath.ENABLED = fast
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
