"""The reference backend against independent float64 implementations (einsum and plain loops)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close, loop_attention, qkv

import attnkit
from attnkit.testing import attention_naive


def run(q, k, v, **kw):
    return attnkit.attention(q, k, v, backend="reference", return_lse=True, **kw)


def naive(q, k, v, **kw):
    return attention_naive(q, k, v, return_lse=True, dtype=torch.float64, **kw)


def check(q, k, v, **kw):
    out, lse = run(q, k, v, **kw)
    out_n, lse_n = naive(q, k, v, **kw)
    assert out.shape == out_n.shape
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert lse.dtype == torch.float64
    assert_close(out, out_n)
    assert_close(lse, lse_n)
    return out, lse


# ---- shapes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sq", [1, 37, 113, 203])
@pytest.mark.parametrize("sk", [1, 37, 203])
@pytest.mark.parametrize("causal", [False, True])
def test_odd_lengths(sq, sk, causal):
    q, k, v = qkv(2, sq, sk, 2, 2, 8, seed=sq * 1000 + sk)
    check(q, k, v, causal=causal)


@pytest.mark.parametrize("hq,hk", [(4, 4), (4, 2), (6, 1), (8, 2)])
def test_gqa_mqa(hq, hk):
    q, k, v = qkv(2, 37, 53, hq, hk, 16)
    out, _ = check(q, k, v, causal=True)
    # GQA is the same as repeating K/V heads.
    rep = hq // hk
    out_rep = attnkit.attention(
        q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2), causal=True, backend="reference"
    )
    assert_close(out, out_rep)


@pytest.mark.parametrize("d,dv", [(16, 8), (8, 24), (3, 5), (1, 1), (256, 32)])
def test_dv_ne_d(d, dv):
    q, k, v = qkv(1, 19, 23, 2, 1, d, dv)
    out, _ = check(q, k, v)
    assert out.shape == (1, 19, 2, dv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_dtypes(dtype):
    q, k, v = qkv(2, 33, 41, 4, 2, 16, dtype=dtype)
    out, lse = attnkit.attention(q, k, v, causal=True, backend="reference", return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    exact, exact_lse = naive(q.double(), k.double(), v.double(), causal=True)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert_close(out, exact, atol=tol, rtol=0)
    assert_close(lse, exact_lse, atol=1e-4, rtol=0)


# ---- the direct loop formula ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(causal=True),
        dict(window_size=(2, 1)),
        dict(softcap=2.0, softmax_scale=0.7),
        dict(causal=True, alibi=True),
    ],
    ids=["plain", "causal", "window", "softcap", "alibi"],
)
@pytest.mark.parametrize("sq,sk", [(3, 5), (5, 3)])
def test_against_loops(kw, sq, sk):
    kw = dict(kw)
    q, k, v = qkv(2, sq, sk, 4, 2, 3, 2, seed=7)
    slopes = torch.tensor([0.5, 0.25, 0.125, 1.0]) if kw.pop("alibi", False) else None
    out, lse = attnkit.attention(q, k, v, alibi_slopes=slopes, return_lse=True, backend="reference", **kw)
    out_l, lse_l = loop_attention(
        q,
        k,
        v,
        causal=kw.get("causal", False),
        scale=kw.get("softmax_scale"),
        window=kw.get("window_size", (-1, -1)),
        softcap=kw.get("softcap", 0.0),
        slopes=slopes,
    )
    assert_close(out, out_l)
    assert_close(lse, lse_l)


def test_einsum_direct():
    """A four-line einsum, without attnkit.testing, agrees with the reference."""
    q, k, v = qkv(2, 11, 17, 3, 3, 5)
    s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(5)
    expected = torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v)
    assert_close(attnkit.attention(q, k, v, backend="reference"), expected)
    assert_close(attnkit.attention(q, k, v, backend="reference", return_lse=True)[1], s.logsumexp(-1))


# ---- masks -----------------------------------------------------------------------------------------------------

WINDOWS = [(0, 0), (3, 2), (-1, 4), (5, -1), (0, -1), (-1, 0), (-1, -1), (50, 50)]


@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("sq,sk", [(37, 37), (17, 45), (45, 17)])
def test_window(window, sq, sk):
    q, k, v = qkv(2, sq, sk, 2, 1, 8, seed=3)
    check(q, k, v, window_size=window)


@pytest.mark.parametrize("window", [(4, 3), (-1, 5), (0, 0)], ids=str)
def test_causal_overrides_window_right(window):
    q, k, v = qkv(1, 21, 30, 2, 2, 8)
    out = attnkit.attention(q, k, v, causal=True, window_size=window, backend="reference")
    expected = attnkit.attention(q, k, v, window_size=(window[0], 0), backend="reference")
    assert torch.equal(out, expected)


@pytest.mark.parametrize("sq,sk", [(2, 5), (5, 2)])
def test_causal_bottom_right_alignment(sq, sk):
    """The documented diagrams: row i sees keys j <= i + sk - sq."""
    q = torch.zeros(1, sq, 1, 1, dtype=torch.float64)
    k = torch.zeros(1, sk, 1, 1, dtype=torch.float64)
    v = torch.eye(sk, dtype=torch.float64).view(1, sk, 1, sk)  # out[i] = attention weights of row i
    out = attnkit.attention(q, k, v, causal=True, backend="reference")[0, :, 0]
    for i in range(sq):
        n = max(0, min(sk, i + sk - sq + 1))
        expected = torch.zeros(sk, dtype=torch.float64)
        expected[:n] = 1.0 / n if n else 0.0
        assert_close(out[i], expected)


def test_softmax_scale_and_softcap():
    q, k, v = qkv(2, 29, 31, 2, 2, 8, seed=11)
    check(q * 5, k * 5, v, softmax_scale=0.9, softcap=3.0)
    check(q, k, v, softmax_scale=0.0)  # uniform weights
    check(q, k, v, softmax_scale=-1.5, causal=True)
    out = attnkit.attention(q, k, v, softmax_scale=0.0, backend="reference")
    assert_close(out, v.mean(dim=1, keepdim=True).expand_as(out))


@pytest.mark.parametrize("slopes_shape", ["h", "bh"])
@pytest.mark.parametrize("causal", [False, True])
def test_alibi(slopes_shape, causal):
    q, k, v = qkv(3, 37, 29, 4, 2, 8)
    slopes = torch.rand(4) if slopes_shape == "h" else torch.rand(3, 4)
    check(q, k, v, alibi_slopes=slopes, causal=causal)
    check(q, k, v, alibi_slopes=slopes, softcap=1.5, window_size=(7, 3))


def test_alibi_batch_slopes_differ_per_batch():
    q, k, v = qkv(2, 9, 9, 2, 2, 4)
    slopes = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    out = attnkit.attention(q, k, v, alibi_slopes=slopes, backend="reference")
    plain = attnkit.attention(q, k, v, backend="reference")
    assert_close(out[0], plain[0])
    assert not torch.allclose(out[1], plain[1])


# ---- lse and fully masked rows ----------------------------------------------------------------------------------


def test_lse_matches_logsumexp():
    q, k, v = qkv(2, 23, 41, 4, 4, 8)
    _, lse = run(q, k, v, softmax_scale=0.3)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * 0.3
    assert_close(lse, torch.logsumexp(s, dim=-1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fully_masked_rows(dtype):
    """Sq > Sk with causal: the first Sq - Sk rows see nothing -> out 0, lse -inf, zero grads from them."""
    q, k, v = qkv(2, 9, 4, 2, 2, 8, dtype=dtype, requires_grad=True)
    out, lse = attnkit.attention(q, k, v, causal=True, return_lse=True, backend="reference")
    assert torch.equal(out[:, :5], torch.zeros_like(out[:, :5]))
    assert torch.isneginf(lse[:, :, :5]).all()
    assert torch.isfinite(lse[:, :, 5:]).all()
    assert torch.isfinite(out).all()
    # Gradient flowing only from the masked rows is exactly zero.
    grad_out = torch.zeros_like(out)
    grad_out[:, :5] = 1.0
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
        assert torch.count_nonzero(g) == 0


def test_window_masks_everything():
    """Window (0, 0) with Sq > Sk: rows with no key at distance 0 are empty."""
    q, k, v = qkv(1, 6, 3, 1, 1, 4, requires_grad=True)
    out, lse = attnkit.attention(q, k, v, window_size=(0, 0), return_lse=True, backend="reference")
    assert torch.equal(out[:, :3], torch.zeros_like(out[:, :3]))
    assert torch.isneginf(lse[..., :3]).all()
    # row i >= 3 sees exactly key i - 3
    assert_close(out[0, 3:, 0], v[0, :, 0].detach())
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.count_nonzero(q.grad) == 0  # one key: softmax is constant


def test_empty_inputs():
    q, k, v = qkv(2, 0, 5, 2, 2, 4)
    out, lse = run(q, k, v)
    assert out.shape == (2, 0, 2, 4) and lse.shape == (2, 2, 0)
    q, k, v = qkv(2, 3, 0, 2, 2, 4, requires_grad=True)
    out, lse = run(q, k, v)
    assert torch.equal(out, torch.zeros(2, 3, 2, 4, dtype=torch.float64))
    assert torch.isneginf(lse).all()
    out.sum().backward()
    assert torch.count_nonzero(q.grad) == 0


# ---- NaN propagation ----------------------------------------------------------------------------------------------


def test_nan_in_nan_out():
    q, k, v = qkv(1, 8, 8, 2, 2, 4)
    q[0, 3, 1, 2] = float("nan")
    out = attnkit.attention(q, k, v, backend="reference")
    assert out[0, 3, 1].isnan().all()
    assert not out[0, :, 0].isnan().any()  # other heads untouched
    assert not out[0, 4, 1].isnan().any()
    v2 = v.clone()
    v2[0, 0, 0, 0] = float("nan")
    out = attnkit.attention(q.nan_to_num(), k, v2, backend="reference")
    assert out[0, :, 0, 0].isnan().all()  # every row attends to key 0
    k2 = k.clone()
    k2[0, 5, 1, 0] = float("nan")
    out = attnkit.attention(q.nan_to_num(), k2, v, backend="reference")
    assert out[0, :, 1].isnan().all()


def test_masked_nan_key_not_seen_by_earlier_rows():
    """A NaN in a key that a row cannot see never reaches that row (masking is not multiplication by 0)."""
    q, k, v = qkv(1, 8, 8, 1, 1, 4)
    k[0, 7] = float("nan")
    out = attnkit.attention(q, k, v, causal=True, backend="reference")
    assert not out[0, :7].isnan().any()
    assert out[0, 7].isnan().all()
