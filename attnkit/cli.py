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

    dtypes = [getattr(torch, _DTYPES[d]) for d in args.dtype] if args.dtype else None
    device = torch.device(args.device) if args.device else None
    rows = run_check(backends=args.backend or None, dtypes=dtypes, device=device, large=args.large)
    print(format_rows(rows))
    return 1 if any(r.status == "FAIL" for r in rows) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="device, versions, and every backend with its availability").set_defaults(func=_info)
    check = sub.add_parser("check", help="every available backend against the float64 reference")
    check.add_argument("--backend", action="append", help="backend to check (repeatable; default: all available)")
    check.add_argument("--dtype", action="append", choices=sorted(_DTYPES), help="repeatable")
    check.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: cuda if present)")
    check.add_argument("--large", action=argparse.BooleanOptionalAction, default=None, help="GPU-sized cases")
    check.set_defaults(func=_check)
    from .bench.cli import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
