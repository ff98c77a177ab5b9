"""attnkit.nn.MultiheadAttention: incremental decoding through the KV cache equals the full causal forward."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

import attnkit
from attnkit.nn import MultiheadAttention, alibi_slopes
from attnkit.testing import attention_naive


def _layer(**kw):
    torch.manual_seed(0)
    return MultiheadAttention(32, 4, dtype=torch.float64, **kw).eval()


@pytest.mark.parametrize(
    "kw",
    [
        dict(causal=True),
        dict(causal=True, num_heads_kv=2, rotary_emb_dim=8),
        dict(causal=True, num_heads_kv=1, rotary_emb_dim=4, rotary_emb_interleaved=True, window_size=(3, 0)),
        dict(causal=True, use_alibi=True, softmax_scale=0.3),
    ],
    ids=["mha", "gqa-rotary", "mqa-rotary-window", "alibi"],
)
def test_incremental_decoding_equals_full_forward(kw):
    layer = _layer(**kw)
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x)
        cache = layer.allocate_kv_cache(batch_size=2, max_seqlen=16)
        steps = [layer(x[:, :5], kv_cache=cache)]  # prompt, then one token at a time
        steps += [layer(x[:, t : t + 1], kv_cache=cache) for t in range(5, 13)]
    assert cache.seqlen == 13
    assert_close(torch.cat(steps, dim=1), full, atol=1e-10)


def test_full_forward_is_attention_of_the_projections():
    layer = _layer(num_heads_kv=2)
    x = torch.randn(1, 7, 32, dtype=torch.float64, requires_grad=True)
    qkv = layer.Wqkv(x).view(1, 7, 4 + 2 * 2, 8)
    q, k, v = qkv[:, :, :4], qkv[:, :, 4:6], qkv[:, :, 6:]
    expected = layer.out_proj(attention_naive(q, k, v).reshape(1, 7, 32))
    assert_close(layer(x), expected)
    assert layer.Wqkv.weight.shape == ((4 + 2 * 2) * 8, 32) and layer.out_proj.weight.shape == (32, 32)
    (g,) = torch.autograd.grad(layer(x).sum(), x)
    (r,) = torch.autograd.grad(expected.sum(), x)
    assert_close(g, r)


def test_dropout_only_in_training():
    layer = _layer(dropout=0.5, causal=True)
    x = torch.randn(1, 9, 32, dtype=torch.float64)
    assert_close(layer(x), layer(x))
    layer.train()
    torch.manual_seed(1)
    a = layer(x)
    torch.manual_seed(1)
    assert_close(a, layer(x))
    assert not torch.allclose(a, layer.eval()(x))


def test_cache_overflow_and_bad_arguments():
    layer = _layer(causal=True)
    cache = layer.allocate_kv_cache(1, 4)
    with torch.no_grad():
        layer(torch.randn(1, 4, 32, dtype=torch.float64), kv_cache=cache)
        with pytest.raises(attnkit.KVCacheOverflowError):
            layer(torch.randn(1, 1, 32, dtype=torch.float64), kv_cache=cache)
    assert cache.seqlen == 4
    with pytest.raises(attnkit.InvalidArgumentError, match="num_heads_kv"):
        MultiheadAttention(32, 4, num_heads_kv=3)
    with pytest.raises(attnkit.InvalidArgumentError, match="embed_dim"):
        MultiheadAttention(30, 4)


def test_alibi_slopes_are_the_papers():
    assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    assert alibi_slopes(6).shape == (6,)
