"""Edge cases of valid input on the reference backend: odd index tensors, huge windows and thresholds, extreme
scales, NaN confinement. tests/triton/test_triton_edge_cases.py runs the same inputs through the Triton kernels."""

from __future__ import annotations

import torch
from helpers import assert_close, cu_seqlens, rand

import attnkit


def _strided(offsets: list[int]) -> torch.Tensor:
    """The offsets as every other element of a longer int32 tensor (stride 2, storage offset 2)."""
    spread = torch.full((2 * len(offsets) + 2,), 99, dtype=torch.int32)
    spread[2::2] = torch.tensor(offsets, dtype=torch.int32)
    return spread[2::2]


def test_strided_cu_seqlens_match_contiguous():
    lens_q, lens_k = [5, 11, 0, 3], [7, 2, 4, 9]
    q, k, v = rand(19, 4, 8, seed=1), rand(22, 2, 8, seed=2), rand(22, 2, 8, seed=3)
    cq, ck = cu_seqlens(lens_q), cu_seqlens(lens_k)
    sq, sk = _strided(cq.tolist()), _strided(ck.tolist())
    assert not sq.is_contiguous() and sq.tolist() == cq.tolist()
    want = attnkit.attention_varlen(q, k, v, cq, ck, 11, 9, causal=True, backend="reference")
    got = attnkit.attention_varlen(q, k, v, sq, sk, 11, 9, causal=True, backend="reference")
    assert_close(got, want, atol=0, rtol=0)
