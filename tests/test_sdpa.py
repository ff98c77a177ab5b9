"""attnkit.sdpa equals torch.nn.functional.scaled_dot_product_attention (PyTorch's layout and semantics)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, rand

import attnkit


def _bhsd(b, h, s, d, seed, requires_grad=False):
    return rand(b, h, s, d, seed=seed, requires_grad=requires_grad)


@pytest.mark.parametrize("sq,sk", [(1, 1), (37, 37), (5, 113), (113, 5), (1, 37)])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_matches_torch_sdpa(sq, sk, is_causal, backend):
    q, k, v = _bhsd(2, 4, sq, 16, 1, True), _bhsd(2, 2, sk, 16, 2, True), _bhsd(2, 2, sk, 16, 3, True)
    out = attnkit.sdpa(q, k, v, is_causal=is_causal, enable_gqa=True, scale=0.3, backend=backend)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True, scale=0.3)
    assert out.shape == ref.shape == (2, 4, sq, 16)
    assert_close(out, ref)
    dout = rand(*out.shape, seed=4)
    for g, r in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)):
        assert_close(g, r)


@pytest.mark.parametrize("shape", [(2, 1, 1, 37), (1, 1, 37), (1, 37)], ids=["B11S", "11S", "1S"])
def test_key_padding_mask_runs_varlen(shape, monkeypatch):
    q, k, v = _bhsd(2, 4, 9, 8, 1, True), _bhsd(2, 4, 37, 8, 2), _bhsd(2, 4, 37, 8, 3)
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(5)) > 0.4
    mask[..., 0] = True
    calls = []
    real = attnkit.ops.sdpa.attention_varlen
    monkeypatch.setattr(attnkit.ops.sdpa, "attention_varlen", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    out = attnkit.sdpa(q, k, v, attn_mask=mask, backend="reference")
    assert calls == [1]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert_close(out, ref)
    assert_close(torch.autograd.grad(out.sum(), q)[0], torch.autograd.grad(ref.sum(), q)[0])


@pytest.mark.parametrize("kind", ["bool-per-query", "float-additive", "per-head"])
def test_other_masks_equal_torch(kind):
    q, k, v = _bhsd(2, 4, 9, 8, 1), _bhsd(2, 4, 11, 8, 2), _bhsd(2, 4, 11, 8, 3)
    gen = torch.Generator().manual_seed(2)
    if kind == "bool-per-query":
        mask = torch.rand(9, 11, generator=gen) > 0.5
        mask[:, 0] = True
    elif kind == "float-additive":
        mask = torch.randn(2, 1, 9, 11, generator=gen, dtype=torch.float64)
    else:
        mask = torch.rand(1, 4, 1, 11, generator=gen) > 0.5
        mask[..., 0] = True
    assert_close(attnkit.sdpa(q, k, v, attn_mask=mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_three_dimensional_inputs():
    q, k, v = rand(4, 7, 8, seed=1), rand(4, 9, 8, seed=2), rand(4, 9, 8, seed=3)
    assert_close(attnkit.sdpa(q, k, v, is_causal=True), F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_errors_like_pytorch():
    q, k = _bhsd(1, 4, 5, 8, 1), _bhsd(1, 2, 5, 8, 2)
    with pytest.raises(attnkit.InvalidArgumentError, match="enable_gqa"):
        attnkit.sdpa(q, k, k)
    with pytest.raises(attnkit.InvalidArgumentError, match="is_causal"):
        attnkit.sdpa(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.bool), is_causal=True)
    with pytest.raises(attnkit.InvalidArgumentError, match="key"):
        attnkit.sdpa(q, k[0], k[0])


def test_dropout_is_attnkits_reproducible_mask():
    q = _bhsd(1, 2, 16, 8, 1)
    torch.manual_seed(3)
    a = attnkit.sdpa(q, q, q, dropout_p=0.5)
    torch.manual_seed(3)
    b = attnkit.sdpa(q, q, q, dropout_p=0.5)
    assert torch.equal(a, b) and not torch.allclose(a, attnkit.sdpa(q, q, q))
