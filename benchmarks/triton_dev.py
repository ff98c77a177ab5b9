"""Development driver for the Triton backend: what runs on the GPU machine, plus a CPU-only compile report.

Subcommands
  xcompile [--dims 64,128] [--dtypes bf16,fp32]   compile every tile for sm_90 WITHOUT a GPU (fake driver) and
           [--masks causal,left,right,band,none]  print registers / stack (spills) / shared memory / TMA use
  gputests [--procs N] [--keyword K]              run every GPU test but tests/cupy's (or those -k K selects) in N
                                                  parallel shards
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

The commands live in benchmarks/triton_tools/, one module per family: cpu_compile (xcompile, fastcheck), gpu_setup
(gputests, precompile), forward (overhead, fwdsweep, spread), backward (bwdsweep), decode (decodesweep).

triton_cuda against SDPA flash / cuDNN and FlexAttention on flash-attn's shapes, checked first, is
`attnkit bench --mode fwd,bwd --dims 64,128 --providers triton,sdpa:flash,sdpa:cudnn,flex` (the same 16k-token,
hidden-2048 grid; outputs and gradients judged against float64, the second call bitwise against the first); run it
again with ATTNKIT_TRITON_AUTOTUNE=0 for the fixed default tiles, and `overhead` here for the host fast path.

FLOPs follow flash-attn's benchmark: forward 4*B*H*Sq*Sk*D (halved when causal), backward 2.5x forward.
Times are triton.testing.do_bench medians unless a command says it times in rounds.
"""

from __future__ import annotations

import argparse
import os
import sys

# The command modules sit beside this script; PYTHONSAFEPATH=1 (used for GPU runs) leaves its folder off sys.path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from triton_tools.backward import bwdsweep
from triton_tools.common import OUT
from triton_tools.cpu_compile import fastcheck, xcompile
from triton_tools.decode import decodesweep
from triton_tools.forward import fwdsweep, overhead, spread
from triton_tools.gpu_setup import gputests, precompile


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("xcompile")
    p.add_argument("--dims", default="64,128,256")
    p.add_argument("--dtypes", default="bf16")
    p.add_argument("--masks", default="causal", help="comma list of causal, none, left, right, band")
    p = sub.add_parser("gputests")
    p.add_argument("--procs", type=int, default=4)
    p.add_argument("--keyword", default="", help="only the tests pytest's -k selects")
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
    p.add_argument("--kv-lens", default="1024,4096,16384,65536", help="KV lengths; BxL fixes the batch (1x131072)")
    p.add_argument("--seqlen-q", type=int, default=1, help="queries per row (speculative decoding), causal")
    p.add_argument("--page", type=int, default=0, help="attnkit reads a shuffled pool of pages of this many keys")
    p.add_argument("--budget-per-case", type=float, default=0.1, help="seconds of calls per setting and length")
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
    else:
        spread(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
