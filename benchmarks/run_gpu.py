"""The GPU benchmark run for one H100/H200, sized to finish within 7 minutes, everything in one directory.

    python benchmarks/run_gpu.py --out OUT_DIR          (or benchmarks/run_gpu.sh OUT_DIR)

Cases (flash-attn's grid: bf16, 16k tokens per case, hidden 2048, seqlen 512..16k, causal and not): forward for head
dims 64/128/256, backward for 64/128, decode (1 query token, GQA 32/8, head dim 128, KV 1k..128k) and peak memory
(batch 1, 16 heads, head dim 128, seqlen 512..32k). ``--part d128`` / ``--part d64`` run the two halves of the list
separately (each fits a 10-minute command with FlexAttention's compiles). They run in order of interest -- head dim
128 first, then decode and memory, then the other head dims -- so that if the time budget runs out, what is missing
is least missed. Writes results.json, results.csv, results.md, log.txt, triton_tiles.txt (the autotuned tiles)
and up to four PNGs (fwd, bwd, decode, memory).

Cost model (H100): ~75 cases x ~8 providers, ~0.25 s each for probing, correctness, peak memory and timing (case
time 0.08 s, at most 50 repeats) = ~150 s; Triton/CuPy first-call compiles and autotuning ~60-90 s; FlexAttention
compiles ~5-20 s per shape, capped by --compile-budget (90 s) after which new Flex shapes read n/a. --time-budget
(330 s) stops starting new cases; with interpreter start-up and plotting the run ends well inside 7 minutes, and
results are rewritten after every case, so even a killed run leaves complete files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from attnkit.bench.cases import Case, decode_cases, dense_cases, memory_cases
from attnkit.bench.session import Options, run, summary

SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
KV_LENS = tuple(1024 * 2**i for i in range(8))  # 1k .. 128k
TOKENS, HIDDEN = 16384, 2048


# The memory target is stated at S = 32k (B=1, H=16, D=128): the memory grid goes one step further than timing.
MEMORY_SEQLENS = (*SEQLENS, 32768)
PARTS = ("all", "d128", "d64")


def gpu_cases(dtype: str = "bf16", part: str = "all") -> list[Case]:
    """The case list; ``part`` splits it for machines whose per-command limit cannot fit all of it with
    FlexAttention compiles: "d128" (head dim 128 forward/backward, decode, memory), "d64" (head dim 64
    forward/backward, head dim 256 forward)."""
    if part not in PARTS:
        raise ValueError(f"part={part!r}; expected one of {', '.join(PARTS)}")
    both = (False, True)

    def fwd(dim: int) -> list[Case]:
        return dense_cases("fwd", dtype, (dim,), SEQLENS, both, TOKENS, HIDDEN)

    def bwd(dim: int) -> list[Case]:
        return dense_cases("bwd", dtype, (dim,), SEQLENS, both, TOKENS, HIDDEN)

    first = [
        *fwd(128),
        *bwd(128),
        *decode_cases(dtype, KV_LENS, (32, 8), 128, 131072),
        *memory_cases(dtype, MEMORY_SEQLENS, 1, 16, 128),
    ]
    second = [*fwd(64), *bwd(64), *fwd(256)]
    return {"all": first + second, "d128": first, "d64": second}[part]


def _write_triton_tiles(path: Path) -> None:
    """The tiles triton_cuda's autotuner chose, one line per tuning key (kind, vendor, dtype, TMA, seqlen bucket,
    masking flags), so a table cell can be traced to the kernel that produced it."""
    tuning = sys.modules.get("attnkit.backends.triton.tuning")
    if tuning is None or not tuning.tuned:
        return
    path.write_text("".join(f"{key}: {tile}\n" for key, tile in sorted(tuning.tuned.items(), key=str)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output directory (created)")
    parser.add_argument("--providers", default="default", help="comma list, as for attnkit bench")
    parser.add_argument("--time-budget", type=float, default=330.0, help="seconds after which no case starts")
    parser.add_argument("--compile-budget", type=float, default=90.0, help="FlexAttention compile seconds")
    parser.add_argument("--case-time", type=float, default=0.08, help="timing seconds per case and provider")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    parser.add_argument("--part", default="all", choices=PARTS, help="run a part of the case list (see gpu_cases)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("run_gpu.py needs a CUDA/ROCm GPU; on CPU use: attnkit bench --quick", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    options = Options(
        out_dir=args.out,
        device=torch.device("cuda"),
        providers=[p for p in args.providers.split(",") if p],
        time_budget_s=args.time_budget,
        case_time_s=args.case_time,
        compile_budget_s=args.compile_budget,
        max_repeats=50,
        log_path=args.out / "log.txt",
        extra_config={"argv": sys.argv[1:], "entry": "benchmarks/run_gpu.py", "part": args.part},
    )
    result = run(gpu_cases(args.dtype, args.part), options)
    _write_triton_tiles(args.out / "triton_tiles.txt")
    print(summary(result, args.out))
    print(f"per-run log: {args.out / 'log.txt'}; tables: {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
