"""Dropout: the Philox mask of attnkit.dropout, its statistics, reproducibility and gradients."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, cu_seqlens, qkv, rand

import attnkit
from attnkit import dropout as dropout_rng
from attnkit.testing import attention_naive


def _observed_keep(batch, sq, sk, heads, p, *, seed_state, causal=False):
    """Run attention whose output reveals the dropout mask: q = 0 (uniform weights), v = one-hot per key."""
    q = torch.zeros(batch, sq, heads, 4, dtype=torch.float64)
    k = torch.zeros(batch, sk, heads, 4, dtype=torch.float64)
    v = torch.eye(sk, dtype=torch.float64)[None, :, None, :].expand(batch, sk, heads, sk).contiguous()
    torch.manual_seed(seed_state)
    out = attnkit.attention(q, k, v, dropout_p=p, causal=causal, backend="reference")
    # out[b, i, h, j] = keep / (1 - p) / (#visible keys of row i)
    return out.permute(0, 2, 1, 3) != 0  # (B, H, Sq, Sk)


def test_mask_equals_keep_mask():
    batch, sq, sk, heads, p = 2, 13, 29, 3, 0.3
    keep = _observed_keep(batch, sq, sk, heads, p, seed_state=123)
    torch.manual_seed(123)
    seed = dropout_rng.draw_seed()
    expected = dropout_rng.keep_mask(seed, p, torch.arange(batch * heads), torch.arange(sq), torch.arange(sk))
    assert torch.equal(keep, expected.view(batch, heads, sq, sk))


def test_keep_fraction_and_mean():
    p = 0.25
    keep = _observed_keep(2, 64, 128, 4, p, seed_state=5)
    frac = keep.double().mean().item()
    n = keep.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(frac - (1 - p)) < 5 * sigma
    # mean preserved: with v = 1 the output is (#kept / Sk) / (1 - p), whose mean is 1.
    q, k = torch.zeros(2, 64, 4, 4, dtype=torch.float64), torch.zeros(2, 128, 4, 4, dtype=torch.float64)
    ones = torch.ones(2, 128, 4, 1, dtype=torch.float64)
    out = attnkit.attention(q, k, ones, dropout_p=p, backend="reference")
    assert abs(out.mean().item() - 1.0) < 5 * sigma / (1 - p)


def test_uniform_is_in_unit_interval_and_uniform():
    u = dropout_rng.uniform(42, torch.arange(4096)[None, :], torch.arange(8)[:, None], torch.tensor(3))
    assert u.dtype == torch.float32
    assert (u >= 0).all() and (u < 1).all()
    hist = torch.histc(u, bins=8, min=0, max=1)
    assert (hist - u.numel() / 8).abs().max() < 5 * (u.numel() / 8) ** 0.5


def test_mask_depends_on_every_counter():
    j, i = torch.arange(64), torch.arange(64)
    base = dropout_rng.keep_mask(7, 0.5, torch.tensor([0]), i, j)
    assert not torch.equal(base, dropout_rng.keep_mask(8, 0.5, torch.tensor([0]), i, j))  # seed
    assert not torch.equal(base, dropout_rng.keep_mask(7, 0.5, torch.tensor([1]), i, j))  # batch-head
    assert not torch.equal(base[0, 1:], base[0, :-1])  # rows differ
    assert not torch.equal(base[0, :, 1:], base[0, :, :-1])  # columns differ
    # The high half of the 64-bit seed matters.
    assert not torch.equal(base, dropout_rng.keep_mask(7 + (1 << 40), 0.5, torch.tensor([0]), i, j))


def test_reproducible_with_manual_seed():
    q, k, v = qkv(2, 37, 41, 4, 2, 8, requires_grad=True)

    def go(seed):
        torch.manual_seed(seed)
        out = attnkit.attention(q, k, v, dropout_p=0.2, causal=True, backend="reference")
        return (out, *torch.autograd.grad(out.square().sum(), (q, k, v)))

    a, b, c = go(1), go(1), go(2)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])


def test_consumes_generator_state():
    q, k, v = qkv(1, 8, 8, 1, 1, 4)
    torch.manual_seed(0)
    a = attnkit.attention(q, k, v, dropout_p=0.5, backend="reference")
    b = attnkit.attention(q, k, v, dropout_p=0.5, backend="reference")
    assert not torch.equal(a, b)


@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(window_size=(5, 2), softcap=2.0)], ids=str)
def test_reference_equals_naive_same_seed(kw):
    q, k, v = qkv(2, 33, 47, 4, 2, 8, requires_grad=True)
    slopes = torch.rand(4)
    torch.manual_seed(9)
    out = attnkit.attention(q, k, v, dropout_p=0.3, alibi_slopes=slopes, backend="reference", **kw)
    torch.manual_seed(9)
    seed = dropout_rng.draw_seed()
    expected = attention_naive(q, k, v, dropout_p=0.3, dropout_seed=seed, alibi_slopes=slopes, **kw)
    assert_close(out, expected)
    g = rand(*out.shape, seed=3)
    grads = torch.autograd.grad(out, (q, k, v), g)
    grads_n = torch.autograd.grad(expected, (q, k, v), g)
    for a, b in zip(grads, grads_n):
        assert_close(a, b)


def test_lse_ignores_dropout():
    q, k, v = qkv(1, 16, 16, 2, 2, 8)
    _, lse = attnkit.attention(q, k, v, return_lse=True, backend="reference")
    _, lse_d = attnkit.attention(q, k, v, dropout_p=0.5, return_lse=True, backend="reference")
    assert_close(lse_d, lse)


def test_varlen_dropout_uses_batch_offset():
    """Sequence b of a varlen call draws the mask of batch row b: equal lengths give exactly the dense result."""
    q, k, v = qkv(3, 17, 23, 4, 2, 8)
    cq, ck = cu_seqlens([17] * 3), cu_seqlens([23] * 3)
    torch.manual_seed(4)
    dense = attnkit.attention(q, k, v, dropout_p=0.4, causal=True, backend="reference")
    torch.manual_seed(4)
    packed = attnkit.attention_varlen(
        q.flatten(0, 1),
        k.flatten(0, 1),
        v.flatten(0, 1),
        cq,
        ck,
        17,
        23,
        dropout_p=0.4,
        causal=True,
        backend="reference",
    )
    assert torch.equal(packed, dense.flatten(0, 1))


def test_varlen_dropout_unequal_lengths_matches_naive():
    lens_q, lens_k = [5, 1, 12], [9, 4, 12]
    q = rand(sum(lens_q), 2, 8)
    k, v = rand(sum(lens_k), 1, 8, seed=1), rand(sum(lens_k), 1, 8, seed=2)
    cq, ck = cu_seqlens(lens_q), cu_seqlens(lens_k)
    torch.manual_seed(11)
    out = attnkit.attention_varlen(q, k, v, cq, ck, 12, 12, dropout_p=0.5, backend="reference")
    torch.manual_seed(11)
    seed = dropout_rng.draw_seed()
    for b in range(3):
        qb = q[None, cq[b] : cq[b + 1]]
        kb, vb = k[None, ck[b] : ck[b + 1]], v[None, ck[b] : ck[b + 1]]
        expected = attention_naive(qb, kb, vb, dropout_p=0.5, dropout_seed=seed, batch_offset=b)
        assert_close(out[cq[b] : cq[b + 1]], expected[0])


def test_dropout_gradcheck():
    q, k, v = qkv(1, 4, 5, 2, 1, 3, requires_grad=True)

    def fn(q, k, v):
        torch.manual_seed(0)  # same mask on every evaluation
        return attnkit.attention(q, k, v, dropout_p=0.3, causal=True, backend="reference")

    assert torch.autograd.gradcheck(fn, (q, k, v))
