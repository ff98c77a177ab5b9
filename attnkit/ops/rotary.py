"""Rotary position embedding as flash-attn applies it in ``flash_attn_with_kvcache``."""

from __future__ import annotations

import torch


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` channels of ``x`` (..., S, H, D) by per-position cos/sin (..., S, R/2).

    ``interleaved=True`` rotates channel pairs (0, 1), (2, 3), ...; otherwise the two halves (GPT-NeoX style).
    Computed in fp32, returned in x's dtype.
    """
    rot = 2 * cos.shape[-1]
    xr = x[..., :rot].float()
    c = cos.float().unsqueeze(-2)  # broadcast over heads
    s = sin.float().unsqueeze(-2)
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2 :]
        rotated = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., rot:]), dim=-1)
