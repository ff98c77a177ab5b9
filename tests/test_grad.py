"""Gradients of the reference backend: torch.autograd.gradcheck in float64, and autograd through the naive einsum."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, cu_seqlens, qkv, rand

import attnkit
from attnkit.testing import attention_naive

GRAD_CASES = [
    dict(),
    dict(causal=True),
    dict(window_size=(1, 2)),
    dict(softcap=1.5, softmax_scale=0.8),
    dict(alibi=True, causal=True),
    dict(alibi_b=True, window_size=(-1, 1)),
]
IDS = ["plain", "causal", "window", "softcap", "alibi", "alibi_bh"]


def _kwargs(case, batch, heads):
    kw = dict(case)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.linspace(0.1, 0.9, heads)
    if kw.pop("alibi_b", False):
        kw["alibi_slopes"] = torch.rand(batch, heads)
    return kw


@pytest.mark.parametrize("case", GRAD_CASES, ids=IDS)
@pytest.mark.parametrize("sq,sk", [(3, 5), (5, 3)])
def test_gradcheck_attention(case, sq, sk):
    q, k, v = qkv(2, sq, sk, 2, 1, 3, 2, requires_grad=True)
    kw = _kwargs(case, 2, 2)
    assert torch.autograd.gradcheck(lambda q, k, v: attnkit.attention(q, k, v, backend="reference", **kw), (q, k, v))


def test_gradcheck_varlen():
    lens_q, lens_k = [3, 1, 4], [2, 5, 4]
    q = rand(sum(lens_q), 2, 3, requires_grad=True)
    k = rand(sum(lens_k), 1, 3, requires_grad=True, seed=1)
    v = rand(sum(lens_k), 1, 2, requires_grad=True, seed=2)
    cq, ck = cu_seqlens(lens_q), cu_seqlens(lens_k)
    slopes = torch.rand(3, 2)

    def fn(q, k, v):
        return attnkit.attention_varlen(q, k, v, cq, ck, 4, 5, causal=True, alibi_slopes=slopes, backend="reference")

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_gradcheck_varlen_with_empty_sequence():
    lens_q, lens_k = [2, 0, 3], [3, 2, 0]
    q = rand(sum(lens_q), 1, 2, requires_grad=True)
    k = rand(sum(lens_k), 1, 2, requires_grad=True, seed=1)
    v = rand(sum(lens_k), 1, 2, requires_grad=True, seed=2)
    cq, ck = cu_seqlens(lens_q), cu_seqlens(lens_k)
    fn = lambda q, k, v: attnkit.attention_varlen(q, k, v, cq, ck, 3, 3, backend="reference")
    assert torch.autograd.gradcheck(fn, (q, k, v))
    out = fn(q, k, v)
    assert torch.equal(out[2:], torch.zeros_like(out[2:]))  # sequence 2 has no keys


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("threshold", [-1, 1, 2, 10])
def test_gradcheck_piecewise(causal, threshold):
    q1, k1, _ = qkv(1, 4, 5, 2, 1, 3, requires_grad=True, seed=0)
    q2, k2, v = qkv(1, 4, 5, 2, 1, 3, 2, requires_grad=True, seed=10)

    def fn(q1, k1, q2, k2, v):
        return attnkit.piecewise_attention(q1, k1, q2, k2, v, threshold, causal=causal, backend="reference")

    assert torch.autograd.gradcheck(fn, (q1, k1, q2, k2, v))


@pytest.mark.parametrize("case", GRAD_CASES, ids=IDS)
def test_backward_matches_naive_autograd(case):
    q, k, v = qkv(2, 37, 29, 4, 2, 8, 6, requires_grad=True)
    kw = _kwargs(case, 2, 4)
    out = attnkit.attention(q, k, v, backend="reference", **kw)
    expected = attention_naive(q, k, v, **kw)
    g = rand(*out.shape, seed=5)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(expected, (q, k, v), g)):
        assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_low_precision(dtype):
    q, k, v = qkv(2, 33, 40, 4, 1, 16, dtype=dtype, requires_grad=True)
    out = attnkit.attention(q, k, v, causal=True, backend="reference")
    g = rand(*out.shape, seed=5, dtype=dtype)
    grads = torch.autograd.grad(out, (q, k, v), g)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    exact = torch.autograd.grad(attention_naive(q64, k64, v64, causal=True), (q64, k64, v64), g.double())
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for a, b in zip(grads, exact):
        assert a.dtype == dtype
        assert_close(a, b, atol=tol, rtol=tol)


def test_noncontiguous_grad_output():
    q, k, v = qkv(1, 8, 8, 2, 2, 4, requires_grad=True)
    out = attnkit.attention(q, k, v, backend="reference")
    g = rand(1, 8, 4, 2).transpose(-1, -2)  # non-contiguous last dim
    grads = torch.autograd.grad(out, (q, k, v), g)
    grads_c = torch.autograd.grad(attnkit.attention(q, k, v, backend="reference"), (q, k, v), g.contiguous())
    for a, b in zip(grads, grads_c):
        assert_close(a, b)


def test_no_grad_inputs_run_without_autograd():
    q, k, v = qkv(1, 8, 8, 2, 2, 4)
    out = attnkit.attention(q, k, v, backend="reference")
    assert not out.requires_grad
    q.requires_grad_()
    with torch.no_grad():
        assert not attnkit.attention(q, k, v, backend="reference").requires_grad
