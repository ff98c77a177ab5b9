"""The ``torch.library`` custom op behind ``attnkit.merge_attention_states``, its fake implementation and its
autograd formula (plain tensor algebra, the same whichever backend ran the forward).

With ``w_i = exp(lse_i - lse)`` (0 for parts with ``lse_i = -inf``) the merge is ``out = sum_i w_i out_i`` and
``lse = log(sum_i exp(lse_i))``, so ``d out_i = w_i dout`` and ``d lse_i = w_i (<dout, out_i - out> + dlse)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..params import lse_dtype
from ..registry import REGISTRY


@torch.library.custom_op("attnkit::merge_states", mutates_args=())
def merge_states(out_parts: Tensor, lse_parts: Tensor, out_dtype: torch.dtype, backend: str) -> tuple[Tensor, Tensor]:
    return REGISTRY.get(backend).merge_states(out_parts, lse_parts, out_dtype)


@merge_states.register_fake
def _(out_parts, lse_parts, out_dtype, backend):
    _parts, batch, seqlen, heads, dim = out_parts.shape
    out = out_parts.new_empty((batch, seqlen, heads, dim), dtype=out_dtype)
    return out, out_parts.new_empty((batch, heads, seqlen), dtype=lse_dtype(out_parts.dtype))


def _setup(ctx, inputs, output):
    out_parts, lse_parts, _out_dtype, _backend = inputs
    ctx.save_for_backward(out_parts, lse_parts, output[1])


def _grad(ctx, dout, dlse):
    out_parts, lse_parts, lse = ctx.saved_tensors
    compute = torch.float64 if out_parts.dtype == torch.float64 else torch.float32
    lses = lse_parts.to(compute)
    present = lses != float("-inf")
    weights = torch.where(present, torch.exp(lses - lse.to(compute)), torch.zeros_like(lses))  # (P, B, H, S)
    w = weights.permute(0, 1, 3, 2).unsqueeze(-1)  # (P, B, S, H, 1)
    parts = torch.where(present.permute(0, 1, 3, 2).unsqueeze(-1), out_parts.to(compute), 0.0)
    d_parts = d_lses = None
    if dout is not None:
        g = dout.to(compute).unsqueeze(0)
        d_parts = (w * g).to(out_parts.dtype)
        merged = (w * parts).sum(dim=0, keepdim=True)  # out in the compute dtype (the saved one is rounded)
        d_lses = weights * ((g * (parts - merged)).sum(dim=-1)).permute(0, 1, 3, 2)
    if dlse is not None:
        extra = weights * dlse.to(compute).unsqueeze(0)
        d_lses = extra if d_lses is None else d_lses + extra
    return d_parts, None if d_lses is None else d_lses.to(lse_parts.dtype), None, None


merge_states.register_autograd(_grad, setup_context=_setup)
