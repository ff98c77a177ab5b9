"""Variable-length (packed) attention through the Triton kernels against float64, one sequence at a time."""

from __future__ import annotations

import pytest
import torch
from triton_checks import Case, assert_ok, check_varlen

CASES = [
    # (lengths_q, lengths_k)
    ([1, 37, 0, 113], [1, 37, 5, 113]),
    ([203], [203]),
    ([5, 0, 0, 17], [9, 3, 0, 30]),
    ([40, 7], [3, 70]),
    ([70, 3], [20, 90]),
]


@pytest.mark.parametrize("lq,lk", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen(lq, lk, dtype, causal):
    assert_ok(check_varlen(Case(hq=4, hk=2, d=40, dv=24, dtype=dtype, causal=causal, seed=len(lq)), lq, lk))


@pytest.mark.parametrize("window,alibi,softcap", [((6, 2), None, 0.0), ((-1, -1), "bh", 0.0), ((0, 0), "h", 3.0)])
def test_varlen_features(window, alibi, softcap):
    case = Case(hq=2, hk=2, d=32, dtype=torch.float16, window=window, alibi=alibi, softcap=softcap, seed=2)
    assert_ok(check_varlen(case, [13, 44, 2], [30, 44, 9]))


def test_nan_padding_does_not_leak():
    """NaN rows past the last sequence (allocation slack) must not reach real rows; padding outputs are 0."""
    case = Case(hq=2, hk=1, d=16, dtype=torch.float32, causal=True, seed=9)
    assert_ok(check_varlen(case, [7, 30, 0], [12, 25, 4], pad=9))
