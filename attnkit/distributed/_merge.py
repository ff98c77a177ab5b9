"""Combining two partial attention results over disjoint key sets by their log-sum-exp.

If ``(out_a, lse_a)`` is attention over keys ``A`` and ``(out_b, lse_b)`` over keys ``B``, attention over
``A + B`` is ``lse = log(exp(lse_a) + exp(lse_b))`` and ``out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)``.
Rows that see no key in one part carry ``lse = -inf`` and ``out = 0`` there and take the other part unchanged; rows
empty in both stay ``0`` / ``-inf``. A NaN in either part reaches the merged row.
"""

from __future__ import annotations

import torch


def merge_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial results. ``out_*``: ``(B, S, H, Dv)``; ``lse_*``: ``(B, H, S)``, natural log.

    Computed in ``lse_a``'s dtype (the callers accumulate in float32, float64 for float64 inputs); returns
    ``(out, lse)`` in that dtype."""
    acc = lse_a.dtype
    lse_b = lse_b.to(acc)
    top = torch.maximum(lse_a, lse_b)
    # Both parts empty: any finite reference point gives weights 0 and lse -inf below.
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    w_a = torch.exp(lse_a - top)
    w_b = torch.exp(lse_b - top)
    total = w_a + w_b
    lse = top + torch.log(total)
    # total == 0 only where both parts are empty, and then both outputs are 0.
    inv = torch.where(total == 0, torch.zeros_like(total), 1.0 / total)
    scale_a = (w_a * inv).transpose(1, 2).unsqueeze(-1)
    scale_b = (w_b * inv).transpose(1, 2).unsqueeze(-1)
    out = out_a.to(acc) * scale_a + out_b.to(acc) * scale_b
    return out, lse
