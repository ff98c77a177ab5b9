"""attention_varlen: packed sequences equal one call per sequence."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, cu_seqlens, rand

import attnkit
from attnkit.testing import attention_naive, attention_varlen_ref


def _packed(lens_q, lens_k, hq=4, hk=2, d=8, dv=None, requires_grad=False):
    dv = d if dv is None else dv
    q = rand(sum(lens_q), hq, d, requires_grad=requires_grad)
    k = rand(sum(lens_k), hk, d, seed=1, requires_grad=requires_grad)
    v = rand(sum(lens_k), hk, dv, seed=2, requires_grad=requires_grad)
    return q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k), max(lens_q), max(lens_k)


KW = [
    dict(),
    dict(causal=True),
    dict(window_size=(4, 2)),
    dict(softcap=1.5, softmax_scale=0.5),
    dict(alibi=True, causal=True),
    dict(alibi_b=True),
]
IDS = ["plain", "causal", "window", "softcap", "alibi_h", "alibi_bh"]


def _kw(kw, batch, heads):
    kw = dict(kw)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.rand(heads)
    if kw.pop("alibi_b", False):
        kw["alibi_slopes"] = torch.rand(batch, heads)
    return kw


@pytest.mark.parametrize("kw", KW, ids=IDS)
@pytest.mark.parametrize(
    "lens_q,lens_k", [([7, 1, 37], [7, 1, 37]), ([5, 20, 3], [30, 2, 3]), ([1], [113]), ([0, 9, 4], [6, 0, 4])]
)
def test_equals_per_sequence_calls(kw, lens_q, lens_k):
    q, k, v, cq, ck, mq, mk = _packed(lens_q, lens_k, dv=6, requires_grad=True)
    kw = _kw(kw, len(lens_q), 4)
    out, lse = attnkit.attention_varlen(q, k, v, cq, ck, mq, mk, return_lse=True, backend="reference", **kw)
    assert out.shape == (sum(lens_q), 4, 6) and lse.shape == (4, sum(lens_q))
    g = rand(*out.shape, seed=3)
    grads = torch.autograd.grad(out, (q, k, v), g)
    for b in range(len(lens_q)):
        sq_, sk_ = slice(int(cq[b]), int(cq[b + 1])), slice(int(ck[b]), int(ck[b + 1]))
        kwb = dict(kw)
        if "alibi_slopes" in kwb and kwb["alibi_slopes"].dim() == 2:
            kwb["alibi_slopes"] = kwb["alibi_slopes"][b]
        qb, kb, vb = (x.detach()[None, s].requires_grad_() for x, s in ((q, sq_), (k, sk_), (v, sk_)))
        ob, lb = attnkit.attention(qb, kb, vb, return_lse=True, backend="reference", **kwb)
        assert_close(out[sq_], ob[0])
        assert_close(lse[:, sq_], lb[0])
        nb, _nlb = attention_naive(qb, kb, vb, return_lse=True, **kwb)
        assert_close(ob, nb)
        gq, gk, gv = torch.autograd.grad(ob, (qb, kb, vb), g[None, sq_])
        assert_close(grads[0][sq_], gq[0])
        assert_close(grads[1][sk_], gk[0])
        assert_close(grads[2][sk_], gv[0])


def test_matches_testing_ref():
    q, k, v, cq, ck, mq, mk = _packed([11, 4, 19], [13, 9, 2])
    out = attnkit.attention_varlen(q, k, v, cq, ck, mq, mk, causal=True, backend="reference")
    assert_close(out, attention_varlen_ref(q, k, v, cq, ck, mq, mk, causal=True, upcast=False))


def test_larger_max_seqlen_is_fine():
    q, k, v, cq, ck, mq, mk = _packed([3, 5], [4, 6])
    a = attnkit.attention_varlen(q, k, v, cq, ck, mq, mk, backend="reference")
    b = attnkit.attention_varlen(q, k, v, cq, ck, mq + 100, mk + 7, backend="reference")
    assert torch.equal(a, b)


def test_equal_lengths_equal_dense_batch():
    q, k, v = rand(3, 17, 4, 8), rand(3, 29, 2, 8, seed=1), rand(3, 29, 2, 8, seed=2)
    slopes = torch.rand(3, 4)
    dense = attnkit.attention(q, k, v, causal=True, alibi_slopes=slopes, backend="reference")
    packed = attnkit.attention_varlen(
        q.flatten(0, 1),
        k.flatten(0, 1),
        v.flatten(0, 1),
        cu_seqlens([17] * 3),
        cu_seqlens([29] * 3),
        17,
        29,
        causal=True,
        alibi_slopes=slopes,
        backend="reference",
    )
    assert_close(packed, dense.flatten(0, 1))


def test_all_empty():
    q, k, v = rand(0, 2, 4), rand(0, 2, 4), rand(0, 2, 4)
    z = torch.zeros(3, dtype=torch.int32)
    out, lse = attnkit.attention_varlen(q, k, v, z, z, 0, 0, return_lse=True, backend="reference")
    assert out.shape == (0, 2, 4) and lse.shape == (2, 0)
