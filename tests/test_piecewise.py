"""piecewise_attention: q1.k1 near, q2.k2 far, against a direct formula and its limits."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, qkv, rand

import attnkit
from attnkit.testing import piecewise_attention_ref


def _inputs(sq, sk, hq=4, hk=2, d=8, dv=6, requires_grad=False):
    q1, k1, v = qkv(2, sq, sk, hq, hk, d, dv, seed=0, requires_grad=requires_grad)
    q2, k2, _ = qkv(2, sq, sk, hq, hk, d, seed=10, requires_grad=requires_grad)
    return q1, k1, q2, k2, v


def _direct(q1, k1, q2, k2, v, threshold, causal, scale=None):
    """Straight from the docstring: d = i + Sk - Sq - j; near (d < threshold) uses q1.k1, far uses q2.k2."""
    sq, hq, d = q1.shape[1], q1.shape[2], q1.shape[3]
    sk, hk = k1.shape[1], k1.shape[2]
    scale = d**-0.5 if scale is None else scale
    rep = hq // hk
    k1r, k2r, vr = (x.repeat_interleave(rep, 2) for x in (k1, k2, v))
    s1 = torch.einsum("bihd,bjhd->bhij", q1, k1r)
    s2 = torch.einsum("bihd,bjhd->bhij", q2, k2r)
    dist = torch.arange(sq)[:, None] + sk - sq - torch.arange(sk)[None, :]
    s = torch.where(dist < threshold, s1, s2) * scale
    if causal:
        s = s.masked_fill(dist < 0, float("-inf"))
    lse = s.logsumexp(-1)
    p = s.softmax(-1).nan_to_num(0.0)
    return torch.einsum("bhij,bjhd->bihd", p, vr), lse


@pytest.mark.parametrize("threshold", [-5, 0, 1, 7, 30, 200])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(37, 37), (20, 45), (45, 20)])
def test_matches_direct_formula(threshold, causal, sq, sk):
    args = _inputs(sq, sk, requires_grad=True)
    out, lse = attnkit.piecewise_attention(*args, threshold, causal=causal, return_lse=True, backend="reference")
    exp_out, exp_lse = _direct(*args, threshold, causal)
    assert_close(out, exp_out)
    assert_close(lse, exp_lse)
    ref_out = piecewise_attention_ref(*args, threshold, causal=causal, upcast=False)
    assert_close(out, ref_out)
    g = rand(*out.shape, seed=7)
    for a, b in zip(torch.autograd.grad(out, args, g), torch.autograd.grad(exp_out, args, g)):
        assert_close(a, b)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(13, 13), (9, 21), (21, 9)])
def test_threshold_extremes_reduce_to_plain_attention(causal, sq, sk):
    q1, k1, q2, k2, v = _inputs(sq, sk)
    # Distances run from 1 - sq (i = 0, j = sk - 1) to sk - 1 (i = sq - 1, j = 0).
    all_near = attnkit.piecewise_attention(q1, k1, q2, k2, v, sk, causal=causal, backend="reference")
    all_far = attnkit.piecewise_attention(q1, k1, q2, k2, v, 1 - sq, causal=causal, backend="reference")
    assert_close(all_near, attnkit.attention(q1, k1, v, causal=causal, backend="reference"))
    assert_close(all_far, attnkit.attention(q2, k2, v, causal=causal, backend="reference"))
    # One step inside each extreme changes the answer.
    assert not torch.allclose(all_near, attnkit.piecewise_attention(q1, k1, q2, k2, v, sk - 1, causal=causal))
    if not causal:
        assert not torch.allclose(all_far, attnkit.piecewise_attention(q1, k1, q2, k2, v, 2 - sq))


def test_same_inputs_equal_plain_attention():
    q, k, v = qkv(1, 17, 17, 2, 2, 8)
    out = attnkit.piecewise_attention(q, k, q, k, v, 5, causal=True, softmax_scale=0.3, backend="reference")
    assert_close(out, attnkit.attention(q, k, v, causal=True, softmax_scale=0.3, backend="reference"))


def test_softmax_scale():
    args = _inputs(11, 14)
    out = attnkit.piecewise_attention(*args, 4, softmax_scale=0.77, backend="reference")
    assert_close(out, _direct(*args, 4, False, scale=0.77)[0])


def test_empty():
    q1, k1, q2, k2, v = _inputs(5, 0)
    out, lse = attnkit.piecewise_attention(q1, k1, q2, k2, v, 3, return_lse=True, backend="reference")
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
