"""Edge cases of valid input on the reference backend: odd index tensors, huge windows and thresholds, extreme
scales, NaN confinement. tests/triton/test_triton_edge_cases.py runs the same inputs through the Triton kernels."""

from __future__ import annotations

import nan_checks
import pytest
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


HUGE_WINDOWS = [
    ((-1, 2**31 - 1), (-1, -1)),
    ((2**31, 0), (-1, 0)),
    ((2**63, 0), (-1, 0)),
    ((2**64 + 5, 2**63), (-1, -1)),
    ((7, 10**30), (7, -1)),
    ((2**40, 3), (-1, 3)),
]


def test_huge_windows_are_unbounded():
    q, k, v = rand(2, 9, 2, 8, seed=4), rand(2, 13, 2, 8, seed=5), rand(2, 13, 2, 8, seed=6)
    for window, same_as in HUGE_WINDOWS:
        want = attnkit.attention(q, k, v, window_size=same_as, backend="reference")
        got = attnkit.attention(q, k, v, window_size=window, backend="reference")
        assert_close(got, want, atol=0, rtol=0, msg=f"window {window}")


def test_window_at_the_reach_of_the_sequences():
    """Bounds just inside the distances still mask; the first ones past them are the same as unbounded."""
    q, k, v = rand(1, 6, 1, 8, seed=7), rand(1, 4, 1, 8, seed=8), rand(1, 4, 1, 8, seed=9)
    full = attnkit.attention(q, k, v, backend="reference")
    assert_close(attnkit.attention(q, k, v, window_size=(4, 6), backend="reference"), full, atol=0, rtol=0)
    assert not torch.equal(attnkit.attention(q, k, v, window_size=(2, -1), backend="reference"), full)
    assert not torch.equal(attnkit.attention(q, k, v, window_size=(-1, 4), backend="reference"), full)


def test_huge_windows_varlen():
    q, k, v = rand(12, 2, 8, seed=1), rand(15, 2, 8, seed=2), rand(15, 2, 8, seed=3)
    cq, ck = cu_seqlens([5, 7]), cu_seqlens([9, 6])
    want = attnkit.attention_varlen(q, k, v, cq, ck, 7, 9, causal=True, backend="reference")
    got = attnkit.attention_varlen(q, k, v, cq, ck, 7, 9, window_size=(2**63, 2**63), causal=True, backend="reference")
    assert_close(got, want, atol=0, rtol=0)


def test_huge_dist_threshold_is_one_score_everywhere():
    q1, k1, v = rand(2, 7, 2, 8, seed=1), rand(2, 5, 2, 8, seed=2), rand(2, 5, 2, 8, seed=3)
    q2, k2 = rand(2, 7, 2, 8, seed=4), rand(2, 5, 2, 8, seed=5)
    near = attnkit.attention(q1, k1, v, causal=True, backend="reference")
    far = attnkit.attention(q2, k2, v, causal=True, backend="reference")
    for threshold, want in ((2**63, near), (2**31, near), (5, near), (-6, far), (-(2**63) - 1, far), (-(2**31), far)):
        got = attnkit.piecewise_attention(q1, k1, q2, k2, v, threshold, causal=True, backend="reference")
        assert_close(got, want, atol=1e-12, rtol=0, msg=f"dist_threshold {threshold}")


def test_negative_scale_is_folded_into_q_exactly():
    """Backends get softmax_scale >= 0 and -q: the same scores bit for bit, and autograd returns dq's sign."""
    q, k, v = (rand(2, 9, 2, 8, seed=s, requires_grad=True) for s in (1, 2, 3))
    out = attnkit.attention(q, k, v, softmax_scale=-3.0, causal=True, backend="reference")
    qn = (-q).detach().requires_grad_()
    want = attnkit.attention(qn, k, v, softmax_scale=3.0, causal=True, backend="reference")
    assert torch.equal(out, want)
    g = rand(*out.shape, seed=4)
    (dq,) = torch.autograd.grad(out, q, g)
    (dqn,) = torch.autograd.grad(want, qn, g)
    assert torch.equal(dq, -dqn)
    exact = attnkit.testing.attention_naive(q, k, v, softmax_scale=-3.0, causal=True)
    assert_close(out, exact)


def test_max_seqlen_beyond_the_packed_length_is_clamped(monkeypatch):
    """Backends size their grids by max_seqlen: they get the longest sequence, not the caller's claim."""
    from attnkit.ops import _library

    q, k, v = rand(16, 2, 8, seed=1), rand(16, 2, 8, seed=2), rand(16, 2, 8, seed=3)
    cq, ck = cu_seqlens([9, 7]), cu_seqlens([4, 12])
    want = attnkit.attention_varlen(q, k, v, cq, ck, 9, 12, backend="reference")
    seen = []
    real = _library.attention_forward

    def spy(*args):
        seen.append(args[5:7])
        return real(*args)

    monkeypatch.setattr(_library, "attention_forward", spy)
    for mq, mk in ((10**6, 2**40), (2**63, 13)):
        got = attnkit.attention_varlen(q, k, v, cq, ck, mq, mk, backend="reference")
        assert_close(got, want, atol=0, rtol=0)
    assert seen == [(9, 12), (9, 12)]


@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"window_size": (3, 1)}], ids=["full", "causal", "window"])
def test_nan_outside_a_rows_sequence_never_leaks(kw):
    nan_checks.check_varlen_padding("reference", **kw)
    nan_checks.check_varlen_other_sequences("reference", **kw)
    nan_checks.check_dense_rows_past_the_view("reference", **kw)


def test_scores_past_the_float32_range_saturate_on_the_reference():
    """Finite inputs give finite outputs: scores beyond the compute dtype's range saturate instead of giving
    inf - inf = NaN in the softmax (a NaN input still gives NaN)."""
    q, k, v = rand(2, 13, 2, 8, seed=1), rand(2, 11, 2, 8, seed=2), rand(2, 11, 2, 8, seed=3)
    for dtype, scale, mult in ((torch.float32, 1e38, 1.0), (torch.bfloat16, None, 1e20), (torch.float16, 2.0**127, 1)):
        qd, kd, vd = ((x * mult).to(dtype) for x in (q, k, v))
        for kw in ({}, {"causal": True}, {"alibi_slopes": -torch.ones(2) * 1e38}):
            out = attnkit.attention(qd, kd, vd, softmax_scale=scale, backend="reference", **kw)
            assert bool(torch.isfinite(out).all()), (dtype, scale, kw)
            # Each output is a convex combination of the values, so it stays within their range.
            assert float(out.double().abs().max()) <= float(vd.double().abs().max()) * 1.01
    qn = q.clone()
    qn[0, 3, 1, 2] = float("nan")
    out = attnkit.attention(qn.float(), k.float(), v.float(), softmax_scale=1e38, backend="reference")
    assert bool(out[0, 3, 1].isnan().all()) and int(out.isnan().sum()) == out.shape[-1]


def test_scale_and_softcap_limits():
    q = rand(1, 4, 1, 8, dtype=torch.float32)
    attnkit.attention(q, q, q, softmax_scale=-(2.0**127), softcap=2.0**127, backend="reference")
    for kw in ({"softmax_scale": 3e38}, {"softmax_scale": -1e300}, {"softcap": 1e39}, {"softmax_scale": 10**400}):
        name = next(iter(kw))
        with pytest.raises(attnkit.InvalidArgumentError, match=name):
            attnkit.attention(q, q, q, backend="reference", **kw)
