"""Rotary position embedding as flash-attn applies it in ``flash_attn_with_kvcache``."""

from __future__ import annotations

import torch

from .. import validation
from ..errors import InvalidArgumentError, InvalidArgumentTypeError


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


def check_tables(
    rotary_cos: object, rotary_sin: object, head_dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated cos/sin tables: two real floating ``(seqlen_ro, rotary_dim / 2)`` tensors on q's device, with
    ``rotary_dim <= head_dim``."""
    cos = validation.tensor("rotary_cos", rotary_cos, 2)
    sin = validation.tensor("rotary_sin", rotary_sin, 2)
    for name, table in (("rotary_cos", cos), ("rotary_sin", sin)):
        if table.dtype not in validation.FLOAT_DTYPES:  # a complex table would be cast and lose its angle
            raise InvalidArgumentTypeError(
                f"{name}.dtype is {str(table.dtype).removeprefix('torch.')}; allowed: float16, bfloat16, float32, "
                "float64 (the cos/sin values, not complex exponentials)"
            )
        if table.device != device:
            raise InvalidArgumentError(f"{name} is on {table.device} but q is on {device}")
    if cos.shape != sin.shape or 2 * cos.shape[1] > head_dim:
        raise InvalidArgumentError(
            f"rotary_cos/sin must share a shape (seqlen_ro, rotary_dim/2) with rotary_dim <= {head_dim}, got "
            f"{tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    return cos, sin
