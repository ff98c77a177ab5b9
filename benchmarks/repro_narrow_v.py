"""Reproducer of triton 3.6's wrong P V product on sm_90 when a mask cuts a 16- or 32-wide value head-dim block
(configs.head_block), and the sweep that chose the fix. Needs a CUDA GPU:

    python benchmarks/repro_narrow_v.py --rules old,new [--procs 14]

For each head-dim pair (d, dv) and rule (``old``: blocks max(16, next power of two); ``new``: configs.head_block,
>= 64 wide when cut) one process runs triton_cuda's forward at seqlen_k 17/65/300 (65 causal too) and the backward
at 17 and 65 causal, against the float32 reference; each prints its relative errors (out, then dq, dk, dv), WRONG
above 3%, or FAULT at the first call that raised (an illegal address kills the CUDA context, hence one process
each). Results on an H200: benchmarks/results/h200_2026-12-02_s4/narrow_v_sweep.txt (its ``pad64`` rows are the
``new`` rule); notes: NOTES-triton.md, "Narrow value head dims".
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

CHILD = r"""
import json, sys, torch, attnkit
from attnkit.backends.triton import configs
a = json.loads(sys.argv[1])
if a["rule"] == "old":
    configs.MIN_MASKED_BLOCK = configs.MIN_BLOCK  # blocks are >= 16 anyway: max(16, next power of two)
torch.manual_seed(0)
res, stage = [], ""
try:
    for sk, causal, grad in ((17, False, True), (65, False, False), (65, True, True), (300, False, False)):
        stage = f"sk{sk}{'c' if causal else ''}"
        q = torch.randn(1, 200, 4, a["d"], device="cuda", dtype=torch.bfloat16, requires_grad=grad)
        k = torch.randn(1, sk, 2, a["d"], device="cuda", dtype=torch.bfloat16, requires_grad=grad)
        v = torch.randn(1, sk, 2, a["dv"], device="cuda", dtype=torch.bfloat16, requires_grad=grad)
        o = attnkit.attention(q, k, v, backend="triton_cuda", causal=causal)
        torch.cuda.synchronize()
        qr, kr, vr = (x.detach().float().requires_grad_(grad) for x in (q, k, v))
        r = attnkit.attention(qr, kr, vr, backend="reference", causal=causal)
        errs = [(o.float() - r).abs().max().item() / max(r.abs().max().item(), 1e-3)]
        if grad:
            do = torch.randn_like(o)
            o.backward(do)
            torch.cuda.synchronize()
            r.backward(do.float())
            for x, xr in ((q, qr), (k, kr), (v, vr)):
                errs.append((x.grad.float() - xr.grad).abs().max().item() / max(xr.grad.abs().max().item(), 1e-3))
        res.append(stage + ("=WRONG" if max(errs) > 0.03 else "") + ":" + ",".join("%.0e" % e for e in errs))
    print("RESULT", " ".join(res))
except Exception as e:
    print("RESULT", " ".join(res), f"FAULT@{stage}", type(e).__name__, str(e).splitlines()[0][:60])
"""

PAIRS = sorted(
    set(itertools.product((20, 24, 36, 40, 48, 72, 80, 96, 120, 160), (8, 20, 24, 40, 48, 72, 96, 128)))
    | {(d, d) for d in (8, 20, 24, 36, 40, 44, 52, 56, 60, 72, 88, 100, 120, 136, 160, 200)}
)


def run_one(job: dict) -> str:
    env = {**os.environ, "CUDA_LAUNCH_BLOCKING": "1", "ATTNKIT_TRITON_AUTOTUNE": "0"}
    try:
        r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(job)], capture_output=True, text=True, env=env,
                           timeout=150)  # fmt: skip
        lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT")]
        last = lines[-1][7:] if lines else "(no result) " + r.stderr.strip()[-150:].replace("\n", " ")
    except subprocess.TimeoutExpired:
        last = "TIMEOUT"
    return f"{job['rule']:4s} d={job['d']:3d} dv={job['dv']:3d}  {last}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", default="old,new", help="comma list of old, new")
    parser.add_argument("--procs", type=int, default=14)
    args = parser.parse_args()
    jobs = [dict(d=d, dv=dv, rule=rule) for rule in args.rules.split(",") for d, dv in PAIRS]
    with ThreadPoolExecutor(args.procs) as pool:
        for line in pool.map(run_one, jobs):
            print(line, flush=True)


if __name__ == "__main__":
    main()
