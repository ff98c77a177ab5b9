"""Merging partial attention states in plain PyTorch: the definition the Triton kernel is tested against.

Part ``i`` attended to one subset of the keys and holds ``out_i`` (normalised over that subset) and its natural-log
``lse_i``. Over the union: ``lse = log(sum_i exp(lse_i))`` and ``out = sum_i exp(lse_i - lse) * out_i``. Parts with
``lse_i = -inf`` saw no key and are left out entirely (their ``out_i`` is never read into the result, so it may hold
anything); when every part is empty, ``out = 0`` and ``lse = -inf``. A NaN ``lse_i`` makes the rows it touches NaN.
"""

from __future__ import annotations

import torch

from attnkit.params import lse_dtype


def merge_states(
    out_parts: torch.Tensor, lse_parts: torch.Tensor, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``out_parts`` (P, B, S, H, D), ``lse_parts`` (P, B, H, S) -> out (B, S, H, D) in ``out_dtype``, lse (B, H, S).

    Computed in float32 (float64 when the parts are float64); the lse comes back in that dtype.
    """
    compute = torch.float64 if out_parts.dtype == torch.float64 else torch.float32
    lses = lse_parts.to(compute)
    present = lses != float("-inf")  # NaN counts as present, so that it propagates
    top = torch.where(present, lses, float("-inf")).amax(dim=0)
    top = torch.where(torch.isinf(top) & (top < 0), torch.zeros_like(top), top)
    weights = torch.where(present, torch.exp(lses - top), torch.zeros_like(lses))  # (P, B, H, S)
    total = weights.sum(dim=0)
    empty = total == 0
    w = weights.permute(0, 1, 3, 2).unsqueeze(-1)  # (P, B, S, H, 1)
    keep = present.permute(0, 1, 3, 2).unsqueeze(-1)
    parts = torch.where(keep, out_parts.to(compute), torch.zeros((), dtype=compute, device=out_parts.device))
    acc = (w * parts).sum(dim=0)
    scale = torch.where(empty, torch.ones_like(total), total).permute(0, 2, 1).unsqueeze(-1)
    out = torch.where(empty.permute(0, 2, 1).unsqueeze(-1), torch.zeros_like(acc), acc / scale)
    lse = torch.where(empty, torch.full_like(top, float("-inf")), top + torch.log(torch.where(empty, 1.0, total)))
    return out.to(out_dtype).contiguous(), lse.to(lse_dtype(compute)).contiguous()
