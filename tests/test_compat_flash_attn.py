"""attnkit.compat.flash_attn: flash-attn 2.8's signatures (pinned), return conventions and results."""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers import assert_close, cu_seqlens, qkv, rand

import attnkit
from attnkit.compat import flash_attn
from attnkit.compat.flash_attn import bert_padding
from attnkit.compat.flash_attn.layers import rotary
from attnkit.ops.rotary import apply_rotary
from attnkit.testing import attention_naive

_COMMON = ["dropout_p", "softmax_scale", "causal", "window_size", "softcap", "alibi_slopes", "deterministic",
           "return_attn_probs"]  # fmt: skip

# flash-attn 2.8.3's flash_attn/flash_attn_interface.py, flash_attn/bert_padding.py and layers/rotary.py.
SIGNATURES = {
    flash_attn.flash_attn_func: ["q", "k", "v", *_COMMON],
    flash_attn.flash_attn_qkvpacked_func: ["qkv", *_COMMON],
    flash_attn.flash_attn_kvpacked_func: ["q", "kv", *_COMMON],
    flash_attn.flash_attn_varlen_func: [
        "q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", *_COMMON, "block_table",
    ],
    flash_attn.flash_attn_varlen_qkvpacked_func: ["qkv", "cu_seqlens", "max_seqlen", *_COMMON],
    flash_attn.flash_attn_varlen_kvpacked_func: [
        "q", "kv", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", *_COMMON,
    ],
    flash_attn.flash_attn_with_kvcache: [
        "q", "k_cache", "v_cache", "k", "v", "rotary_cos", "rotary_sin", "cache_seqlens", "cache_batch_idx",
        "cache_leftpad", "block_table", "softmax_scale", "causal", "window_size", "softcap", "rotary_interleaved",
        "alibi_slopes", "num_splits", "return_softmax_lse",
    ],
    bert_padding.unpad_input: ["hidden_states", "attention_mask", "unused_mask"],
    bert_padding.pad_input: ["hidden_states", "indices", "batch", "seqlen"],
    rotary.apply_rotary_emb: [
        "x", "cos", "sin", "interleaved", "inplace", "seqlen_offsets", "cu_seqlens", "max_seqlen",
    ],
    rotary.RotaryEmbedding.__init__: ["self", "dim", "base", "interleaved", "scale_base", "device"],
    rotary.RotaryEmbedding.forward: ["self", "qkv", "kv", "seqlen_offset", "max_seqlen", "num_heads_q"],
}  # fmt: skip

DEFAULTS = {
    "dropout_p": 0.0, "softmax_scale": None, "causal": False, "window_size": (-1, -1), "softcap": 0.0,
    "alibi_slopes": None, "deterministic": False, "return_attn_probs": False, "block_table": None,
    "num_splits": 0, "return_softmax_lse": False, "rotary_interleaved": True, "cache_leftpad": None,
}  # fmt: skip


@pytest.mark.parametrize("fn", list(SIGNATURES), ids=lambda f: f.__qualname__)
def test_parameter_lists_are_flash_attn_28(fn):
    params = inspect.signature(fn).parameters
    assert list(params) == SIGNATURES[fn]
    assert all(p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params.values())  # no *args/**kwargs
    for name, default in DEFAULTS.items():
        if name in params:
            assert params[name].default == default, name


def test_func_and_packed_variants_match_attention():
    q, k, v = qkv(2, 37, 37, 4, 4, 16, requires_grad=True)
    kw = dict(causal=True, window_size=(5, 0), softcap=3.0)
    ref = attention_naive(q, k, v, **kw)
    out = flash_attn.flash_attn_func(q, k, v, **kw)
    assert_close(out, ref)
    qkv_packed = torch.stack((q, k, v), dim=2)
    assert_close(flash_attn.flash_attn_qkvpacked_func(qkv_packed, **kw), ref)
    assert_close(flash_attn.flash_attn_kvpacked_func(q, torch.stack((k, v), dim=2), **kw), ref)
    g = torch.autograd.grad(flash_attn.flash_attn_qkvpacked_func(qkv_packed, **kw).sum(), qkv_packed)[0]
    r = torch.autograd.grad(ref.sum(), (q, k, v))
    assert_close(g, torch.stack(r, dim=2), atol=1e-8)


def test_return_attn_probs_convention():
    q, k, v = qkv(1, 5, 7, 2, 1, 8)
    out, lse, probs = flash_attn.flash_attn_func(q, k, v, return_attn_probs=True)
    ref, ref_lse = attention_naive(q, k, v, return_lse=True)
    assert probs is None
    assert_close(out, ref)
    assert_close(lse, ref_lse)
    assert lse.shape == (1, 2, 5)


def test_varlen_variants():
    lengths = [3, 37, 1]
    cu = cu_seqlens(lengths)
    qkv_packed = rand(sum(lengths), 3, 4, 16, seed=4)
    q, k, v = qkv_packed.unbind(1)
    expected = attnkit.attention_varlen(q, k, v, cu, cu, 37, 37, causal=True)
    assert_close(flash_attn.flash_attn_varlen_qkvpacked_func(qkv_packed, cu, 37, causal=True), expected)
    kv = torch.stack((k, v), dim=1)
    assert_close(flash_attn.flash_attn_varlen_kvpacked_func(q, kv, cu, cu, 37, 37, causal=True), expected)
    out, lse, none = flash_attn.flash_attn_varlen_func(q, k, v, cu, cu, 37, 37, causal=True, return_attn_probs=True)
    assert none is None and lse.shape == (4, sum(lengths))
    assert_close(out, expected)


def test_varlen_block_table_reads_the_pages():
    lengths_q, lengths_k, page = [2, 5], [20, 37], 16
    q = rand(sum(lengths_q), 4, 8, seed=1, requires_grad=True)
    k = rand(sum(lengths_k), 2, 8, seed=2)
    v = rand(sum(lengths_k), 2, 8, seed=3)
    # scatter each sequence's keys over pages in a shuffled order
    table = torch.tensor([[5, 1, 0], [2, 4, 3]], dtype=torch.int32)
    k_pages = torch.full((6, page, 2, 8), float("nan"), dtype=k.dtype)
    v_pages = torch.full((6, page, 2, 8), float("nan"), dtype=v.dtype)
    ck = cu_seqlens(lengths_k)
    for b, n in enumerate(lengths_k):
        for j in range(n):
            k_pages[table[b, j // page], j % page] = k[ck[b] + j]
            v_pages[table[b, j // page], j % page] = v[ck[b] + j]
    k_pages.requires_grad_(True)
    cq = cu_seqlens(lengths_q)
    out = flash_attn.flash_attn_varlen_func(q, k_pages, v_pages, cq, ck, 5, 37, causal=True, block_table=table)
    expected = attnkit.attention_varlen(q, k, v, cq, ck, 5, 37, causal=True)
    assert_close(out, expected)  # the NaN slack in the pages is never read
    (gk,) = torch.autograd.grad(out.sum(), k_pages)
    assert torch.isfinite(gk).all() and gk[table[0, 1], 4:].abs().sum() == 0  # keys past length 20: no gradient
    with pytest.raises(attnkit.InvalidArgumentError, match="block_table"):
        flash_attn.flash_attn_varlen_func(q, k_pages, v_pages, cq, ck, 5, 37, block_table=table[:, :1])


def test_with_kvcache_matches_attention_with_kvcache():
    q = rand(2, 1, 4, 16, seed=1)
    k_cache, v_cache = rand(2, 32, 2, 16, seed=2), rand(2, 32, 2, 16, seed=3)
    k_new, v_new = rand(2, 1, 2, 16, seed=4), rand(2, 1, 2, 16, seed=5)
    lens = torch.tensor([5, 17], dtype=torch.int32)
    kc, vc = k_cache.clone(), v_cache.clone()
    expected, expected_lse = attnkit.attention_with_kvcache(
        q, kc, vc, k_new, v_new, cache_seqlens=lens, causal=True, return_lse=True
    )
    out, lse = flash_attn.flash_attn_with_kvcache(
        q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, causal=True, num_splits=3, return_softmax_lse=True
    )
    assert_close(out, expected)
    assert_close(lse, expected_lse)
    assert torch.equal(k_cache, kc) and torch.equal(v_cache, vc)  # appended in place like the original
    assert isinstance(flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens), torch.Tensor)
    with pytest.raises(attnkit.InvalidArgumentError, match="num_splits"):
        flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, num_splits=-1)


def test_with_kvcache_leftpad_behaves_like_a_row_starting_at_the_pad():
    q = rand(2, 3, 4, 16, seed=1)
    k_cache, v_cache = rand(2, 32, 2, 16, seed=2), rand(2, 32, 2, 16, seed=3)
    k_new, v_new = rand(2, 3, 2, 16, seed=4), rand(2, 3, 2, 16, seed=5)
    cos, sin = torch.cos(rand(40, 4, seed=6)), torch.sin(rand(40, 4, seed=6))
    lens = torch.tensor([9, 20], dtype=torch.int32)
    pad = torch.tensor([4, 0], dtype=torch.int32)
    kc, vc = k_cache.clone(), v_cache.clone()
    out = flash_attn.flash_attn_with_kvcache(
        q, k_cache, v_cache, k_new, v_new, rotary_cos=cos, rotary_sin=sin, cache_seqlens=lens, cache_leftpad=pad,
        causal=True,
    )  # fmt: skip
    for b in range(2):
        p = int(pad[b])
        row_k, row_v = kc[b : b + 1, p:].clone(), vc[b : b + 1, p:].clone()
        expected = attnkit.attention_with_kvcache(
            q[b : b + 1], row_k, row_v, k_new[b : b + 1], v_new[b : b + 1], cache_seqlens=int(lens[b]) - p,
            rotary_cos=cos, rotary_sin=sin, causal=True,
        )  # fmt: skip
        assert_close(out[b : b + 1], expected)
        assert_close(k_cache[b, p:], row_k[0])
        assert torch.equal(k_cache[b, :p], kc[b, :p])  # nothing before the pad is touched
    with pytest.raises(attnkit.InvalidArgumentError, match="cache_leftpad"):
        flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, cache_leftpad=lens + 1)


def test_bert_padding_round_trip():
    x = rand(3, 6, 2, 4, seed=1, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.int64)
    unused = torch.zeros_like(mask)
    unused[0, 3] = 1
    packed, indices, cu, max_len, used = bert_padding.unpad_input(x, mask, unused)
    assert cu.tolist() == [0, 4, 8, 14] and max_len == 6 and used.tolist() == [3, 4, 6]
    assert cu.dtype == used.dtype == torch.int32
    assert_close(packed, x.reshape(18, 2, 4)[indices])
    back = bert_padding.pad_input(packed, indices, 3, 6)
    keep = (mask.bool() | unused.bool())[..., None, None]
    assert_close(back, torch.where(keep, x, torch.zeros_like(x)))
    (g,) = torch.autograd.grad(back.sum(), x)
    assert_close(g, keep.to(g.dtype).expand_as(g))


@pytest.mark.parametrize("interleaved", [False, True])
def test_apply_rotary_emb(interleaved):
    x = rand(2, 7, 3, 16, seed=1)
    angles = rand(20, 4, seed=2)
    cos, sin = angles.cos(), angles.sin()
    out = rotary.apply_rotary_emb(x, cos, sin, interleaved=interleaved, seqlen_offsets=3)
    assert_close(out, apply_rotary(x, cos[3:10], sin[3:10], interleaved))
    offsets = torch.tensor([0, 5])
    out = rotary.apply_rotary_emb(x, cos, sin, interleaved=interleaved, seqlen_offsets=offsets)
    assert_close(out[1], apply_rotary(x[1], cos[5:12], sin[5:12], interleaved))
    packed = x.reshape(14, 3, 16)
    cu = torch.tensor([0, 4, 14], dtype=torch.int32)
    out = rotary.apply_rotary_emb(packed, cos, sin, interleaved=interleaved, cu_seqlens=cu, max_seqlen=10)
    assert_close(out[4:], apply_rotary(packed[4:], cos[:10], sin[:10], interleaved))
    y = x.clone()
    assert rotary.apply_rotary_emb(y, cos, sin, interleaved=interleaved, inplace=True) is y


def test_rotary_embedding_rotates_q_and_k_in_place():
    emb = rotary.RotaryEmbedding(8)
    qkv_ = rand(2, 5, 3, 2, 16, seed=1)
    before = qkv_.clone()
    out = emb(qkv_, seqlen_offset=2)
    assert out is qkv_
    inv = 1.0 / (10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))
    freqs = torch.outer(torch.arange(7, dtype=torch.float32), inv)
    cos, sin = freqs.cos()[2:], freqs.sin()[2:]
    assert_close(qkv_[:, :, 0], apply_rotary(before[:, :, 0], cos, sin, False), atol=1e-6)
    assert_close(qkv_[:, :, 1], apply_rotary(before[:, :, 1], cos, sin, False), atol=1e-6)
    assert torch.equal(qkv_[:, :, 2], before[:, :, 2])
    gqa = rand(2, 5, 4 + 2 * 1, 16, seed=3)
    before = gqa.clone()
    emb(gqa, num_heads_q=4)
    assert torch.equal(gqa[:, :, 5:], before[:, :, 5:]) and not torch.equal(gqa[:, :, :5], before[:, :, :5])
