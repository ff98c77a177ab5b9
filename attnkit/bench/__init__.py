"""``attnkit bench``: how each attnkit backend compares, on this machine, with PyTorch SDPA (per backend),
FlexAttention and flash-attn -- TFLOP/s, decode GB/s and peak memory, as JSON, CSV, Markdown and PNG figures.

Layout: :mod:`.cases` (grids, FLOP and byte counts), :mod:`.providers` and :mod:`.peers` (what is compared),
:mod:`.correctness`, :mod:`.timing`, :mod:`.runner` (the loop), :mod:`.report` and :mod:`.plots` (outputs),
:mod:`.session` (one run end to end) and :mod:`.cli`. Usage: benchmarks/README.md.
"""

from __future__ import annotations

from .cases import Case, Grid, build_cases, case_flops, forward_flops
from .runner import Record
from .session import Options, run

__all__ = ["Case", "Grid", "Options", "Record", "build_cases", "case_flops", "forward_flops", "run"]
