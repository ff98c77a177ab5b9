"""The backward's pre-pass (bwd.cu's ``attnkit_bwd_pre``), launched the same way before every CuPy backward kernel:
delta = rowsum(dO * O), and the float32 dQ accumulator zeroed in the same pass."""

from __future__ import annotations

from typing import Any

import torch

from . import compiler
from .args import backward_pre_args
from .config import PRE_THREADS, bwd_config, pre_grid


def launch_backward_pre(
    launch: Any,
    arch: str,
    out: torch.Tensor,
    dout: torch.Tensor,
    delta: torch.Tensor,
    dq_acc: torch.Tensor,
    varlen: bool,
    delta_strides: tuple[int, int],
    seqlen: int,
    heads: int,
    batch: int,
    head_dim: int,
) -> None:
    """Launch the pre-pass over ``batch`` x ``seqlen`` rows of ``heads`` heads. ``out``/``dout`` are kernel-ready
    (``head_dim`` padded columns), ``delta`` is written with ``delta_strides`` (batch, head), ``dq_acc`` is zeroed.
    The module is bwd.cu's default backward module for this head dim, so a bwd.cu backward shares it."""
    spec = compiler.ModuleSpec.make("bwd.cu", bwd_config(head_dim, out.dtype, launch.smem_limit()).defines(), arch)
    args = backward_pre_args(out, dout, delta, dq_acc, varlen, delta_strides, seqlen, heads, head_dim)
    launch(spec, "attnkit_bwd_pre", pre_grid(seqlen, heads, batch, head_dim), PRE_THREADS, 0, args)
