"""What the Triton development commands share: where reports go, flash-attn's benchmark shapes and FLOP count,
the timer, the report header, seeded training inputs, tile names and the sweep report writer."""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable

# The repository root (benchmarks/triton_tools/ is two levels below it).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.environ.get("OUT", os.path.join(ROOT, "benchmarks", "results"))
TOKENS, HIDDEN = 16384, 2048


def bench_shapes(seqlens: list[int]) -> list[tuple[int, int, int, int, bool]]:
    """(batch, seqlen, heads, headdim, causal) with 16k tokens and hidden 2048, as in flash-attn's benchmark."""
    return [(TOKENS // s, s, HIDDEN // d, d, causal) for d in (64, 128) for causal in (False, True) for s in seqlens]


def fwd_flops(b: int, s: int, h: int, d: int, causal: bool) -> float:
    return 4 * b * h * s * s * d / (2 if causal else 1)


def do_bench_ms(fn: Callable[[], object]) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def flex_attention_op():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def run_header() -> str:
    """GPU, versions and UTC time: the first line of every GPU report."""
    import torch
    import triton

    return (
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    )


def training_inputs(b: int, s: int, h: int, d: int) -> tuple:
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


def tile_name(t) -> str:
    return (
        f"{t.block_m}x{t.block_n} w{t.num_warps} s{t.num_stages}{' tma' if t.use_tma else ''}"
        + (f" p{t.persistent}" if t.persistent else "")
        + (" ws" if t.warp_specialize else "")
    )


def sweep_report(name: str, header: str, case: list[str], lines: list[str], results: list[dict]) -> None:
    """After each case of a sweep: its lines to stdout and to ``lines``, then OUT/<name>.md and .json rewritten,
    so a run cut short still leaves complete files."""
    print("\n".join(case), flush=True)
    lines += case
    with open(os.path.join(OUT, f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump({"header": header, "rows": results}, f, indent=1)
