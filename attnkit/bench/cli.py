"""``attnkit bench`` argument parsing."""

from __future__ import annotations

import argparse


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="benchmarks (being written)")
    parser.set_defaults(func=lambda args: 0)
