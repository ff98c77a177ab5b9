"""Hypothesis property tests of the reference backend (profile "ci" by default: see tests/conftest.py).

Sizes are bounded here, in the strategies, so every example runs in milliseconds."""

from __future__ import annotations

import torch
from helpers import assert_close, cu_seqlens
from hypothesis import given
from hypothesis import strategies as st

import attnkit

F64 = torch.float64


@st.composite
def problems(draw, max_len=24):
    """(q, k, v) in float64 with random small shapes, GQA head counts and Dv."""
    batch = draw(st.integers(1, 3))
    sq = draw(st.integers(1, max_len))
    sk = draw(st.integers(1, max_len))
    hk = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    d = draw(st.integers(1, 16))
    dv = draw(st.integers(1, 16))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, sq, hk * group, d, generator=gen, dtype=F64)
    k = torch.randn(batch, sk, hk, d, generator=gen, dtype=F64)
    v = torch.randn(batch, sk, hk, dv, generator=gen, dtype=F64)
    return q, k, v


windows = st.tuples(st.integers(-1, 30), st.integers(-1, 30))


def ref(q, k, v, **kw):
    return attnkit.attention(q, k, v, backend="reference", **kw)


@given(problems(), windows, st.booleans())
def test_gqa_equals_repeated_kv(p, window, causal):
    q, k, v = p
    rep = q.shape[2] // k.shape[2]
    a = ref(q, k, v, window_size=window, causal=causal)
    b = ref(q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2), window_size=window, causal=causal)
    assert_close(a, b)


@given(problems())
def test_unbounded_window_is_full_attention(p):
    q, k, v = p
    assert torch.equal(ref(q, k, v, window_size=(-1, -1)), ref(q, k, v))


@given(problems())
def test_left_unbounded_right_zero_is_causal(p):
    q, k, v = p
    assert_close(ref(q, k, v, window_size=(-1, 0)), ref(q, k, v, causal=True))


@given(problems(), st.data())
def test_non_causal_invariant_to_key_permutation(p, data):
    q, k, v = p
    perm = torch.tensor(data.draw(st.permutations(range(k.shape[1]))), dtype=torch.long)
    out, lse = ref(q, k, v, return_lse=True)
    out_p, lse_p = ref(q, k[:, perm], v[:, perm], return_lse=True)
    assert_close(out_p, out)
    assert_close(lse_p, lse)


@given(problems(), st.floats(-8, 8, allow_nan=False), windows, st.floats(0, 5))
def test_scaling_v_scales_out(p, c, window, softcap):
    q, k, v = p
    a = ref(q, k, v * c, window_size=window, softcap=softcap)
    b = ref(q, k, v, window_size=window, softcap=softcap) * c
    assert_close(a, b, atol=1e-9 * max(1.0, abs(c)))


@given(problems(), windows, st.floats(0.05, 2.0))
def test_lse_is_logsumexp_of_scores(p, window, scale):
    q, k, v = p
    _, lse = ref(q, k, v, window_size=window, softmax_scale=scale, return_lse=True)
    rep = q.shape[2] // k.shape[2]
    s = torch.einsum("bihd,bjhd->bhij", q, k.repeat_interleave(rep, 2)) * scale
    sq, sk = q.shape[1], k.shape[1]
    dist = torch.arange(sq)[:, None] + sk - sq - torch.arange(sk)[None, :]
    left, right = window
    visible = torch.ones(sq, sk, dtype=torch.bool)
    if left >= 0:
        visible &= dist <= left
    if right >= 0:
        visible &= dist >= -right
    expected = s.masked_fill(~visible, float("-inf")).logsumexp(-1)
    assert_close(lse, expected)


@given(
    st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20)), min_size=1, max_size=4),
    st.integers(1, 3),
    st.integers(1, 2),
    st.booleans(),
    windows,
    st.integers(0, 2**31 - 1),
)
def test_varlen_equals_padded_batch(lens, hk, group, causal, window, seed):
    """Each packed sequence equals the same sequence in a zero-padded dense batch, cropped back."""
    gen = torch.Generator().manual_seed(seed)
    lens_q, lens_k = [a for a, _ in lens], [b for _, b in lens]
    hq, d = hk * group, 4
    q = torch.randn(sum(lens_q), hq, d, generator=gen, dtype=F64)
    k = torch.randn(sum(lens_k), hk, d, generator=gen, dtype=F64)
    v = torch.randn(sum(lens_k), hk, d, generator=gen, dtype=F64)
    cq, ck = cu_seqlens(lens_q), cu_seqlens(lens_k)
    kw = dict(causal=causal, window_size=window)
    out, lse = attnkit.attention_varlen(
        q, k, v, cq, ck, max(lens_q), max(lens_k), return_lse=True, backend="reference", **kw
    )
    for b, (_nq, _nk) in enumerate(lens):
        qs, ks = slice(int(cq[b]), int(cq[b + 1])), slice(int(ck[b]), int(ck[b + 1]))
        ob, lb = attnkit.attention(q[None, qs], k[None, ks], v[None, ks], return_lse=True, backend="reference", **kw)
        assert_close(out[qs], ob[0])
        assert_close(lse[:, qs], lb[0])
