"""The reference backend's tiling: small tiles give the same answers as one big tile, masked tiles are skipped,
and a long sequence never materialises the full score matrix."""

from __future__ import annotations

import attnkit.backends.reference.core as core
import pytest
import torch
from helpers import assert_close, cu_seqlens, qkv, rand

import attnkit
from attnkit.testing import attention_naive, piecewise_attention_ref

CASES = [
    dict(),
    dict(causal=True),
    dict(window_size=(9, 3)),
    dict(window_size=(0, 0)),
    dict(window_size=(-1, 5)),
    dict(window_size=(20, -1)),
    dict(causal=True, softcap=2.0, alibi=True),
    dict(dropout_p=0.3, causal=True),
]
IDS = ["full", "causal", "window", "diag", "right_only", "left_only", "softcap_alibi", "dropout"]


def _fwd_bwd(q, k, v, kw, seed=0):
    kw = dict(kw)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.linspace(0.05, 0.5, q.shape[2])
    torch.manual_seed(seed)
    out, lse = attnkit.attention(q, k, v, backend="reference", return_lse=True, **kw)
    g = rand(*out.shape, seed=99)
    return (out, lse, *torch.autograd.grad(out, (q, k, v), g))


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(core, "QUERY_CHUNK", 16)
    monkeypatch.setattr(core, "KEY_CHUNK", 8)


@pytest.mark.parametrize("kw", CASES, ids=IDS)
@pytest.mark.parametrize("sq,sk", [(53, 53), (37, 70), (70, 37)])
def test_small_tiles_equal_one_tile(kw, sq, sk, monkeypatch):
    q, k, v = qkv(2, sq, sk, 4, 2, 8, requires_grad=True)
    whole = _fwd_bwd(q, k, v, kw)
    monkeypatch.setattr(core, "QUERY_CHUNK", 16)
    monkeypatch.setattr(core, "KEY_CHUNK", 8)
    tiled = _fwd_bwd(q, k, v, kw)
    for a, b in zip(tiled, whole):
        assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_masked_tiles_are_skipped(small_tiles, monkeypatch):
    calls = []
    original = core._raw_scores

    def counting(pb, qs, ks, dist):
        calls.append(dist.shape)
        return original(pb, qs, ks, dist)

    monkeypatch.setattr(core, "_raw_scores", counting)
    q, k, v = qkv(1, 64, 64, 1, 1, 4)
    attnkit.attention(q, k, v, backend="reference")
    full = len(calls)
    assert full == (64 // 16) * (64 // 8)
    calls.clear()
    attnkit.attention(q, k, v, causal=True, backend="reference")
    # Query tile r (rows 16r..16r+15) needs key tiles 0..2r+1: 2 + 4 + 6 + 8 = 20 of 32.
    assert len(calls) == 20
    calls.clear()
    attnkit.attention(q, k, v, window_size=(0, 0), backend="reference")
    assert len(calls) == 8  # each query tile touches two 8-wide key tiles


def test_small_tiles_varlen_and_kvcache(small_tiles):
    lens_q, lens_k = [20, 3, 41], [33, 17, 41]
    q = rand(sum(lens_q), 4, 8)
    k, v = rand(sum(lens_k), 2, 8, seed=1), rand(sum(lens_k), 2, 8, seed=2)
    cq, ck = cu_seqlens(lens_q), cu_seqlens(lens_k)
    out = attnkit.attention_varlen(q, k, v, cq, ck, 41, 41, causal=True, backend="reference")
    for b in range(3):
        expected = attention_naive(
            q[None, cq[b] : cq[b + 1]], k[None, ck[b] : ck[b + 1]], v[None, ck[b] : ck[b + 1]], causal=True
        )
        assert_close(out[cq[b] : cq[b + 1]], expected[0])
    k_cache, v_cache = rand(2, 64, 2, 8, seed=3), rand(2, 64, 2, 8, seed=4)
    qd = rand(2, 5, 4, 8, seed=5)
    out = attnkit.attention_with_kvcache(
        qd, k_cache, v_cache, cache_seqlens=torch.tensor([50, 23], dtype=torch.int32), causal=True, backend="reference"
    )
    for b, n in enumerate([50, 23]):
        expected = attention_naive(qd[b : b + 1], k_cache[b : b + 1, :n], v_cache[b : b + 1, :n], causal=True)
        assert_close(out[b : b + 1], expected)


def test_small_tiles_piecewise(small_tiles):
    q1, k1, _ = qkv(1, 40, 45, 2, 1, 8, requires_grad=True)
    q2, k2, v = qkv(1, 40, 45, 2, 1, 8, requires_grad=True, seed=10)
    out = attnkit.piecewise_attention(q1, k1, q2, k2, v, 12, causal=True, backend="reference")
    expected = piecewise_attention_ref(q1, k1, q2, k2, v, 12, causal=True, upcast=False)
    assert_close(out, expected)
    g = rand(*out.shape, seed=3)
    for a, b in zip(
        torch.autograd.grad(out, (q1, k1, q2, k2, v), g), torch.autograd.grad(expected, (q1, k1, q2, k2, v), g)
    ):
        assert_close(a, b)


def test_long_sequence_does_not_allocate_full_scores():
    """S=8192: a full float32 score matrix would be 256 MiB; no single op may allocate an eighth of that."""
    seqlen = 8192
    q, k, v = (rand(1, seqlen, 1, 4, dtype=torch.float32, seed=s) for s in range(3))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = attnkit.attention(q, k, v, backend="reference")
    largest = max(e.cpu_memory_usage for e in prof.events())
    full = seqlen * seqlen * 4
    assert 0 < largest < full / 8, (largest, full)
    # Spot-check a few rows against a direct computation.
    rows = torch.tensor([0, 4095, 8191])
    s = (q[0, rows, 0] @ k[0, :, 0].T).double() / 2.0
    expected = s.softmax(-1) @ v[0, :, 0].double()
    assert_close(out[0, rows, 0], expected, atol=1e-5, rtol=1e-4)
