"""The dropout mask every backend draws, defined once.

Key ``j`` of query row ``i``, in sequence ``b`` and query head ``h`` (``bh = b * Hq + h``) gets the uniform number

    u = to_uniform(philox4x32_10(counter=(j, i, bh, 0), key=(seed_lo, seed_hi))[0])

where ``to_uniform(x)`` reads the 32-bit word as int32, maps negative values ``x`` to ``~x`` and multiplies by
``4.6566127342e-10`` (this is exactly ``triton.language.rand``'s conversion). The key is kept iff ``u >= p``;
kept probabilities are multiplied by ``1 / (1 - p)``. Because the mask is a pure function of
``(seed, j, i, bh)``, backward regenerates it instead of storing it, and every backend (Triton, CUDA, PyTorch)
produces bit-identical masks, which the tests check.

The seed is a 63-bit integer drawn from PyTorch's default CPU generator, so ``torch.manual_seed`` makes dropout
reproducible.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
UNIFORM_SCALE = 4.6566127342e-10


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A fresh 63-bit seed from the torch generator (consumes generator state)."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64, generator=generator))


def _mul_hi_lo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * b for 32-bit unsigned a (int64 tensor) and b, without int64 overflow."""
    a_lo = a & 0xFFFF
    a_hi = a >> 16
    t_lo = a_lo * b  # < 2**48
    t_hi = a_hi * b  # < 2**48
    hi = (t_hi + (t_lo >> 16)) >> 16
    lo = (((t_hi & 0xFFFF) << 16) + t_lo) & _MASK32
    return hi & _MASK32, lo


def philox_first_word(
    seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor
) -> torch.Tensor:
    """First output word of Philox4x32-10 as an int64 tensor holding a uint32, broadcasting the counters."""
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    c0, c1, c2, c3 = torch.broadcast_tensors(*(c.to(torch.int64) & _MASK32 for c in (c0, c1, c2, c3)))
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(c2, PHILOX_ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _MASK32
        k1 = (k1 + PHILOX_KEY_B) & _MASK32
    return c0


def uniform(seed: int, j: torch.Tensor, i: torch.Tensor, bh: torch.Tensor) -> torch.Tensor:
    """The float32 uniform numbers in [0, 1) for keys ``j``, rows ``i``, batch-heads ``bh`` (broadcast)."""
    word = philox_first_word(seed, j, i, bh, torch.zeros((), dtype=torch.int64, device=j.device))
    signed = torch.where(word >= 2**31, word - 2**32, word)
    signed = torch.where(signed < 0, -signed - 1, signed)  # ~x for negative int32
    return signed.to(torch.float32) * UNIFORM_SCALE


def keep_mask(seed: int, p: float, bh: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Boolean keep mask of shape broadcast(bh[:, None, None], rows[None, :, None], cols[None, None, :])."""
    return uniform(seed, cols[None, None, :], rows[None, :, None], bh[:, None, None]) >= p
