"""Commands that prepare or check a GPU machine: ``gputests`` (the GPU tests in parallel shards) and ``precompile``
(triton's cache filled with every autotune candidate of the benchmark shapes)."""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import time

from .common import HIDDEN, OUT, ROOT


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
            *(["-k", args.keyword] if args.keyword else []),
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
        # No -x: a failure must not hide the tests after it in the shard. -v names each test as it ends, so a log
        # cut by a time limit still says which tests passed.
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-rfE", "-p", "no:cacheprovider", *shard]
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


def _precompile_worker(task: tuple[int, bool, int]) -> str:
    """Compile candidate ``i`` of every kernel kind for one (head dim, causal) at a benchmark-like shape."""
    d, causal, i = task
    os.environ["ATTNKIT_TRITON_AUTOTUNE"] = "0"
    import torch
    from attnkit.backends.triton import configs, fastpath, launch

    from attnkit.params import AttentionParams

    def pick(kind, vendor, block_d, elem_bytes, tma=False):
        cands = configs.candidates(kind, vendor, block_d, elem_bytes, tma)
        return cands[min(i, len(cands) - 1)]

    configs.default = pick
    fastpath.ENABLED = False  # a pool process runs several candidates of one shape: no remembered tile
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
