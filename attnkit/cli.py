"""Command line: ``attnkit info``, ``attnkit check``, ``attnkit bench`` (also ``python -m attnkit``)."""

from __future__ import annotations

import argparse
import sys

_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp64": "float64"}


def _info(_args: argparse.Namespace) -> int:
    from .info import format_info

    print(format_info())
    return 0


def _check(args: argparse.Namespace) -> int:
    import torch

    from .check import format_rows, run_check

    device = torch.device(args.device) if args.device else None
    if args.fuzz is not None or args.fuzz_replay is not None:
        return _fuzz(args, device or torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = [getattr(torch, _DTYPES[d]) for d in args.dtype] if args.dtype else None
    rows = run_check(backends=args.backend or None, dtypes=dtypes, device=device, large=args.large)
    print(format_rows(rows))
    return 1 if any(r.status.startswith("FAIL") for r in rows) else 0


def _fuzz(args: argparse.Namespace, device) -> int:
    import random

    from . import fuzz

    if args.fuzz_replay is not None:
        summary = fuzz.replay(args.fuzz_replay, device=device, backends=args.backend or None)
    else:
        seed = args.fuzz_seed if args.fuzz_seed is not None else random.SystemRandom().randrange(2**31)
        print(f"fuzzing {args.fuzz:g} s on {device} from seed {seed} ({args.fuzz_procs} process(es))", flush=True)
        if args.fuzz_procs > 1:
            summary = fuzz.fuzz_parallel(
                args.fuzz, device=device, backends=args.backend or None, first_seed=seed, procs=args.fuzz_procs
            )
        else:
            summary = fuzz.fuzz(args.fuzz, device=device, backends=args.backend or None, first_seed=seed)
    print(summary.format())
    return 1 if summary.failures or summary.lost_at else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="device, versions, and every backend with its availability").set_defaults(func=_info)
    check = sub.add_parser("check", help="every available backend against the float64 reference")
    check.add_argument("--backend", action="append", help="backend to check (repeatable; default: all available)")
    check.add_argument("--dtype", action="append", choices=sorted(_DTYPES), help="repeatable")
    check.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: cuda if present)")
    check.add_argument("--large", action=argparse.BooleanOptionalAction, default=None, help="GPU-sized cases")
    check.add_argument("--fuzz", type=float, metavar="SECONDS", help="differential fuzzing for this long instead")
    check.add_argument("--fuzz-seed", type=int, help="first case seed of --fuzz (default: random, printed)")
    check.add_argument("--fuzz-procs", type=int, default=1, help="--fuzz worker processes on the device")
    check.add_argument("--fuzz-replay", type=int, metavar="SEED", help="run the fuzz case of this seed again")
    check.set_defaults(func=_check)
    from .bench.cli import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
