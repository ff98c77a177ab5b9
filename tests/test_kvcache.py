"""attention_with_kvcache: in-place append, paged caches, rotary, cache_batch_idx and the checks done before writing."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close, rand, record_read_backs

import attnkit
from attnkit import InvalidArgumentError, KVCacheOverflowError
from attnkit.testing import attention_naive

I32 = torch.int32


def _lens(*n):
    return torch.tensor(n, dtype=I32)


def _expected(q, k_rows, v_rows, **kw):
    """Per batch row naive attention over that row's valid keys."""
    return torch.cat([attention_naive(q[b : b + 1], k_rows[b][None], v_rows[b][None], **kw) for b in range(q.shape[0])])


@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(window_size=(3, 1)), dict(softcap=2.0)], ids=str)
@pytest.mark.parametrize("seqlen_q,seqlen_new", [(1, 1), (4, 4), (3, 0), (5, 2)])
def test_append_and_attend(kw, seqlen_q, seqlen_new):
    batch, cap, hq, hk, d, dv = 3, 40, 4, 2, 8, 6
    k_cache, v_cache = rand(batch, cap, hk, d, seed=1), rand(batch, cap, hk, dv, seed=2)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    q = rand(batch, seqlen_q, hq, d, seed=3)
    k_new, v_new = rand(batch, seqlen_new, hk, d, seed=4), rand(batch, seqlen_new, hk, dv, seed=5)
    lens = _lens(0, 17, cap - seqlen_new)
    args = (k_new, v_new) if seqlen_new else ()
    out, lse = attnkit.attention_with_kvcache(
        q, k_cache, v_cache, *args, cache_seqlens=lens, return_lse=True, backend="reference", **kw
    )
    expected_k, expected_v = before_k.clone(), before_v.clone()
    for b, n in enumerate(lens.tolist()):
        expected_k[b, n : n + seqlen_new] = k_new[b]
        expected_v[b, n : n + seqlen_new] = v_new[b]
    assert torch.equal(k_cache, expected_k)  # prefix and tail untouched, new keys exactly at cache_seqlens
    assert torch.equal(v_cache, expected_v)
    rows = [n + seqlen_new for n in lens.tolist()]
    exp_out, exp_lse = zip(
        *[
            attention_naive(q[b : b + 1], expected_k[b : b + 1, :n], expected_v[b : b + 1, :n], return_lse=True, **kw)
            for b, n in enumerate(rows)
        ]
    )
    assert_close(out, torch.cat(exp_out))
    assert_close(lse, torch.cat(exp_lse))


def test_int_cache_seqlens_and_default_full_cache():
    q, k_cache, v_cache = rand(2, 1, 2, 4), rand(2, 10, 2, 4, seed=1), rand(2, 10, 2, 4, seed=2)
    full = attnkit.attention_with_kvcache(q, k_cache, v_cache, backend="reference")
    assert_close(full, attention_naive(q, k_cache, v_cache))
    six = attnkit.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=6, backend="reference")
    assert_close(six, attention_naive(q, k_cache[:, :6], v_cache[:, :6]))


def test_cache_batch_idx():
    k_cache, v_cache = rand(5, 16, 1, 4, seed=1), rand(5, 16, 1, 4, seed=2)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    q, k_new, v_new = rand(2, 2, 2, 4, seed=3), rand(2, 2, 1, 4, seed=4), rand(2, 2, 1, 4, seed=5)
    idx = torch.tensor([3, 0], dtype=I32)
    lens = _lens(5, 9)
    out = attnkit.attention_with_kvcache(
        q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, cache_batch_idx=idx, causal=True, backend="reference"
    )
    expected_k, expected_v = before_k.clone(), before_v.clone()
    expected_k[3, 5:7], expected_v[3, 5:7] = k_new[0], v_new[0]
    expected_k[0, 9:11], expected_v[0, 9:11] = k_new[1], v_new[1]
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    exp = _expected(q, [expected_k[3, :7], expected_k[0, :11]], [expected_v[3, :7], expected_v[0, :11]], causal=True)
    assert_close(out, exp)


def _paged_copy(k_cache, v_cache, page, gen_seed):
    """Scatter a contiguous (B, S, H, D) cache into shuffled pages; returns (k_pages, v_pages, block_table)."""
    batch, cap = k_cache.shape[:2]
    per_row = cap // page
    num_blocks = batch * per_row + 3  # a few spare pages
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(gen_seed))[: batch * per_row]
    table = perm.view(batch, per_row).to(I32)
    k_pages = rand(num_blocks, page, *k_cache.shape[2:], seed=50)  # garbage everywhere else
    v_pages = rand(num_blocks, page, *v_cache.shape[2:], seed=51)
    for b in range(batch):
        for p in range(per_row):
            k_pages[table[b, p]] = k_cache[b, p * page : (p + 1) * page]
            v_pages[table[b, p]] = v_cache[b, p * page : (p + 1) * page]
    return k_pages, v_pages, table


def _unpage(pages, table):
    return torch.stack([pages[table[b].long()].flatten(0, 1) for b in range(table.shape[0])])


@pytest.mark.parametrize("page", [16, 32])
@pytest.mark.parametrize("causal", [False, True])
def test_paged_equals_contiguous(page, causal):
    batch, cap = 3, 96
    k_cache, v_cache = rand(batch, cap, 2, 8, seed=1), rand(batch, cap, 2, 4, seed=2)
    k_pages, v_pages, table = _paged_copy(k_cache, v_cache, page, gen_seed=page)
    spare_k, spare_v = k_pages.clone(), v_pages.clone()
    q, k_new, v_new = rand(batch, 3, 4, 8, seed=3), rand(batch, 5, 2, 8, seed=4), rand(batch, 5, 2, 4, seed=5)
    lens = _lens(0, page - 2, cap - 5)  # the second row's append crosses a page boundary
    out_c = attnkit.attention_with_kvcache(
        q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, causal=causal, backend="reference"
    )
    out_p = attnkit.attention_with_kvcache(
        q, k_pages, v_pages, k_new, v_new, cache_seqlens=lens, block_table=table, causal=causal, backend="reference"
    )
    assert_close(out_p, out_c)
    assert torch.equal(_unpage(k_pages, table), k_cache)
    assert torch.equal(_unpage(v_pages, table), v_cache)
    unused = sorted(set(range(k_pages.shape[0])) - set(table.flatten().tolist()))
    assert torch.equal(k_pages[unused], spare_k[unused]) and torch.equal(v_pages[unused], spare_v[unused])


def _rotate(x, cos, sin, interleaved):
    """Direct rotary formula, channel by channel, in float64."""
    out = x.clone()
    half = cos.shape[-1]
    for m in range(half):
        i, j = (2 * m, 2 * m + 1) if interleaved else (m, m + half)
        c, s = cos[..., m, None], sin[..., m, None]  # (B, S, 1): broadcast over heads
        out[..., i] = x[..., i] * c - x[..., j] * s
        out[..., j] = x[..., i] * s + x[..., j] * c
    return out


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_rotary(interleaved, causal):
    batch, cap, d, rot = 2, 32, 8, 6
    k_cache, v_cache = rand(batch, cap, 1, d, seed=1), rand(batch, cap, 1, d, seed=2)
    before_k = k_cache.clone()
    q, k_new, v_new = rand(batch, 3, 2, d, seed=3), rand(batch, 3, 1, d, seed=4), rand(batch, 3, 1, d, seed=5)
    pos = torch.arange(cap, dtype=torch.float64)[:, None]
    freq = 1.0 / (10000 ** (torch.arange(rot // 2, dtype=torch.float64) / (rot // 2)))
    cos, sin = torch.cos(pos * freq), torch.sin(pos * freq)
    lens = _lens(4, 11)
    out = attnkit.attention_with_kvcache(
        q,
        k_cache,
        v_cache,
        k_new,
        v_new,
        cache_seqlens=lens,
        rotary_cos=cos,
        rotary_sin=sin,
        rotary_interleaved=interleaved,
        causal=causal,
        backend="reference",
    )
    k_pos = lens.long()[:, None] + torch.arange(3)
    q_pos = k_pos if causal else lens.long()[:, None].expand(batch, 3)
    k_rot = _rotate(k_new, cos[k_pos], sin[k_pos], interleaved)
    q_rot = _rotate(q, cos[q_pos], sin[q_pos], interleaved)
    assert torch.equal(k_rot[..., rot:], k_new[..., rot:])  # channels past rotary_dim untouched
    tol = dict(atol=1e-6, rtol=1e-6)  # rotary is computed in float32
    for b, n in enumerate(lens.tolist()):
        assert_close(k_cache[b, n : n + 3], k_rot[b], **tol)
        assert torch.equal(k_cache[b, :n], before_k[b, :n]) and torch.equal(k_cache[b, n + 3 :], before_k[b, n + 3 :])
    exp = _expected(
        q_rot,
        [k_cache[b, : n + 3] for b, n in enumerate(lens.tolist())],
        [v_cache[b, : n + 3] for b, n in enumerate(lens.tolist())],
        causal=causal,
    )
    assert_close(out, exp, **tol)


@pytest.mark.parametrize("interleaved", [True, False])
def test_apply_rotary_matches_direct_formula(interleaved):
    from attnkit.ops.rotary import apply_rotary

    x = rand(2, 5, 3, 10)
    angles = rand(2, 5, 4, seed=1)
    out = apply_rotary(x, angles.cos(), angles.sin(), interleaved)
    assert out.dtype == x.dtype
    assert_close(out, _rotate(x, angles.cos(), angles.sin(), interleaved), atol=1e-6, rtol=1e-6)
    assert_close(_rotate(x, torch.ones(2, 5, 4), torch.zeros(2, 5, 4), interleaved), x)  # angle 0: identity


def _small_cache():
    k_cache, v_cache = rand(2, 16, 1, 4, seed=1), rand(2, 16, 1, 4, seed=2)
    return k_cache, v_cache, k_cache.clone(), v_cache.clone()


@pytest.mark.parametrize("lens", [(14, 0), (0, 14), (16, 16)])
def test_overflow_raises_before_writing(lens):
    k_cache, v_cache, bk, bv = _small_cache()
    q, k_new, v_new = rand(2, 1, 1, 4), rand(2, 3, 1, 4), rand(2, 3, 1, 4)
    with pytest.raises(KVCacheOverflowError, match="cache row") as info:
        attnkit.attention_with_kvcache(
            q, k_cache, v_cache, k_new, v_new, cache_seqlens=_lens(*lens), backend="reference"
        )
    assert isinstance(info.value, ValueError) and isinstance(info.value, attnkit.AttnkitError)
    assert torch.equal(k_cache, bk) and torch.equal(v_cache, bv)


def _forbid_frontend_read_back(monkeypatch) -> list[str]:
    """Record reads of a tensor back to the host by attention_with_kvcache itself (the reference backend may read);
    the caller asserts the list is empty at the end."""
    return record_read_backs(monkeypatch, "attnkit/ops/kvcache.py", "attnkit/ops/_kvcache_checks.py")


def test_int_or_default_lengths_do_not_read_the_device(monkeypatch):
    """Lengths given as an int or left to the capacity are checked on the host: no tensor is read back (on a GPU
    that read is a sync that makes each decode step wait for the previous one). Bad ints still raise."""
    k_cache, v_cache, bk, bv = _small_cache()
    q, k_new, v_new = rand(2, 1, 1, 4), rand(2, 3, 1, 4), rand(2, 3, 1, 4)

    read_backs = _forbid_frontend_read_back(monkeypatch)
    attnkit.attention_with_kvcache(q, k_cache, v_cache, backend="reference")
    attnkit.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=5, backend="reference")
    assert torch.equal(k_cache[:, 5:8], k_new) and torch.equal(v_cache[:, 5:8], v_new)
    k_cache, v_cache, bk, bv = _small_cache()
    with pytest.raises(KVCacheOverflowError, match="cache row"):
        attnkit.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=14, backend="reference")
    with pytest.raises(InvalidArgumentError, match="negative"):
        attnkit.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=-1, backend="reference")
    assert torch.equal(k_cache, bk) and torch.equal(v_cache, bv)
    assert read_backs == []


def test_checks_move_to_the_device_under_graph_capture(monkeypatch):
    """While a CUDA graph is captured nothing may be read back: the checks on tensor lengths, rows and pages run as
    device asserts instead (on the CPU, simulated here, torch._assert_async raises at once), still before any write."""
    from attnkit.ops import kvcache as kvcache_op

    monkeypatch.setattr(kvcache_op, "_capturing", lambda device: True)
    read_backs = _forbid_frontend_read_back(monkeypatch)
    k_cache, v_cache, bk, bv = _small_cache()
    q, k_new, v_new = rand(2, 1, 1, 4), rand(2, 3, 1, 4), rand(2, 3, 1, 4)
    attnkit.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=_lens(4, 13), backend="reference")
    assert torch.equal(k_cache[0, 4:7], k_new[0]) and torch.equal(v_cache[1, 13:16], v_new[1])
    k_cache, v_cache, bk, bv = _small_cache()
    for lens in ((14, 0), (0, -1)):
        with pytest.raises(RuntimeError, match="cache_seqlens"):
            attnkit.attention_with_kvcache(
                q, k_cache, v_cache, k_new, v_new, cache_seqlens=_lens(*lens), backend="reference"
            )
    idx = torch.tensor([1, 1], dtype=I32)
    with pytest.raises(RuntimeError, match="cache_batch_idx"):
        attnkit.attention_with_kvcache(
            q, k_cache, v_cache, k_new, v_new, cache_seqlens=_lens(0, 0), cache_batch_idx=idx, backend="reference"
        )
    pages, table = rand(4, 16, 1, 4, seed=1), torch.tensor([[0, 1], [2, 9]], dtype=I32)
    with pytest.raises(RuntimeError, match="block_table"):
        attnkit.attention_with_kvcache(
            q, pages, pages.clone(), k_new, v_new, cache_seqlens=_lens(3, 15), block_table=table, backend="reference"
        )
    shared = torch.tensor([[0, 1], [1, 2]], dtype=I32)  # row 0 appends to page 1, which row 1 reads
    with pytest.raises(RuntimeError, match="share a page"):
        attnkit.attention_with_kvcache(
            q, pages, pages.clone(), k_new, v_new, cache_seqlens=_lens(14, 3), block_table=shared, backend="reference"
        )
    assert torch.equal(k_cache, bk) and torch.equal(v_cache, bv)
    assert read_backs == []


def test_paged_overflow_and_bad_block_table_raise_before_writing():
    k_pages, v_pages = rand(4, 16, 1, 4, seed=1), rand(4, 16, 1, 4, seed=2)
    bk, bv = k_pages.clone(), v_pages.clone()
    q, k_new, v_new = rand(2, 1, 1, 4), rand(2, 2, 1, 4), rand(2, 2, 1, 4)
    table = torch.tensor([[0, 1], [2, 3]], dtype=I32)
    with pytest.raises(KVCacheOverflowError):
        attnkit.attention_with_kvcache(
            q, k_pages, v_pages, k_new, v_new, cache_seqlens=_lens(3, 31), block_table=table, backend="reference"
        )
    bad = torch.tensor([[0, 1], [2, 9]], dtype=I32)
    with pytest.raises(InvalidArgumentError, match="block_table"):
        attnkit.attention_with_kvcache(
            q, k_pages, v_pages, k_new, v_new, cache_seqlens=_lens(3, 15), block_table=bad, backend="reference"
        )
    neg = torch.tensor([[-1, 1], [2, 3]], dtype=I32)
    with pytest.raises(InvalidArgumentError, match="block_table"):
        attnkit.attention_with_kvcache(
            q, k_pages, v_pages, k_new, v_new, cache_seqlens=_lens(3, 3), block_table=neg, backend="reference"
        )
    assert torch.equal(k_pages, bk) and torch.equal(v_pages, bv)
    # Out-of-range entries beyond the pages a row uses are fine.
    ok = torch.tensor([[0, 99], [2, 3]], dtype=I32)
    attnkit.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=_lens(3, 20), block_table=ok, backend="reference")


def test_no_grad_and_lse_shape():
    q, k_cache, v_cache = rand(2, 3, 4, 8), rand(2, 10, 2, 8, seed=1), rand(2, 10, 2, 8, seed=2)
    out, lse = attnkit.attention_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=_lens(0, 10), return_lse=True, backend="reference"
    )
    assert out.shape == (2, 3, 4, 8) and lse.shape == (2, 4, 3)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()
    assert math.isfinite(float(lse[1].max()))


@pytest.mark.parametrize("name", ["q", "k_cache", "v_cache", "k", "v", "rotary_cos", "alibi_slopes"])
def test_forward_only_refuses_a_gradient(name):
    """The op has no backward: an input that requires grad (with grad mode on) is an error naming it, raised before
    the cache is written; under no_grad/inference_mode the same call runs and its output carries no grad."""
    k_cache, v_cache, bk, bv = _small_cache()
    args = dict(
        q=rand(2, 1, 2, 4, seed=3), k_cache=k_cache, v_cache=v_cache, k=rand(2, 2, 1, 4, seed=4),
        v=rand(2, 2, 1, 4, seed=5), rotary_cos=torch.ones(16, 1, dtype=torch.float64),
        rotary_sin=torch.zeros(16, 1, dtype=torch.float64), alibi_slopes=torch.full((2,), 0.5),
    )  # fmt: skip
    args[name] = args[name].clone().requires_grad_()

    def call():
        return attnkit.attention_with_kvcache(
            args["q"], args["k_cache"], args["v_cache"], args["k"], args["v"], cache_seqlens=_lens(3, 7),
            rotary_cos=args["rotary_cos"], rotary_sin=args["rotary_sin"], alibi_slopes=args["alibi_slopes"],
            backend="reference",
        )  # fmt: skip

    with pytest.raises(InvalidArgumentError, match=rf"{name} requires grad.*forward-only.*no_grad"):
        call()
    assert torch.equal(args["k_cache"], bk) and torch.equal(args["v_cache"], bv)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            out = call()
        assert not out.requires_grad and out.grad_fn is None


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize(
    "failure",
    ["unknown_backend", "empty_backend_env", "bad_debug_env", "backend_refuses_dtype", "alibi_shape"],
)
def test_failed_call_writes_nothing(failure, paged, monkeypatch):
    """Everything is decided before the append: a call that raises for its backend request, its environment or an
    argument checked late leaves the cache bit for bit as it was."""
    k_cache, v_cache = rand(4, 16, 1, 4, seed=1), rand(4, 16, 1, 4, seed=2)
    bk, bv = k_cache.clone(), v_cache.clone()
    q, k_new, v_new = rand(2, 1, 2, 4, seed=3), rand(2, 2, 1, 4, seed=4), rand(2, 2, 1, 4, seed=5)
    kw = dict(cache_seqlens=_lens(3, 9), rotary_cos=torch.ones(16, 1), rotary_sin=torch.zeros(16, 1))
    kw["rotary_cos"], kw["rotary_sin"] = kw["rotary_cos"].double(), kw["rotary_sin"].double()
    if paged:
        kw["block_table"] = torch.tensor([[0, 1], [2, 3]], dtype=I32)
    else:
        k_cache, v_cache, bk, bv = k_cache[:2], v_cache[:2], bk[:2], bv[:2]
    kw["backend"] = "reference"
    expected: type[Exception] = InvalidArgumentError
    if failure == "unknown_backend":
        kw["backend"] = "bogus"
    elif failure == "empty_backend_env":
        kw["backend"] = "auto"
        monkeypatch.setenv("ATTNKIT_BACKEND", ",,")
        expected = attnkit.EnvironmentVariableError
    elif failure == "bad_debug_env":
        monkeypatch.setenv("ATTNKIT_DEBUG", "2")
        expected = attnkit.EnvironmentVariableError
    elif failure == "backend_refuses_dtype":
        kw["backend"] = "triton_cuda"  # no float64 kernels (and, on a CPU without the interpreter, no device)
        expected = attnkit.BackendUnsupportedError
    else:
        kw["alibi_slopes"] = torch.ones(3)
    with pytest.raises(expected):
        attnkit.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, **kw)
    assert torch.equal(k_cache, bk) and torch.equal(v_cache, bv)


@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(window_size=(4, 1)), dict(alibi=True)], ids=str)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_cache_leftpad(kw, paged):
    """flash-attn 2.6's left-padded caches: row b attends to positions cache_leftpad[b] .. cache_seqlens[b] +
    S_new - 1, exactly as plain attention over those keys alone (masks and ALiBi count from the row's own end);
    the append still goes to cache_seqlens[b], and rotary positions stay absolute."""
    batch, cap, hq, hk, d = 3, 48, 4, 2, 8
    k_rows, v_rows = rand(batch, cap, hk, d, seed=1), rand(batch, cap, hk, d, seed=2)
    q, k_new, v_new = rand(batch, 3, hq, d, seed=3), rand(batch, 2, hk, d, seed=4), rand(batch, 2, hk, d, seed=5)
    lens, pads = _lens(20, 7, 33), _lens(5, 7, 0)  # the middle row holds only the new tokens
    slopes = torch.rand(hq, generator=torch.Generator().manual_seed(6)) if kw.pop("alibi", False) else None
    pos = torch.arange(cap, dtype=torch.float64)[:, None] * torch.tensor([1.0, 0.3])
    rotary = dict(rotary_cos=pos.cos(), rotary_sin=pos.sin())
    args = dict(cache_seqlens=lens, cache_leftpad=pads, alibi_slopes=slopes, backend="reference", **rotary, **kw)
    if paged:
        k_cache, v_cache, table = _paged_copy(k_rows, v_rows, 16, gen_seed=7)
        out = attnkit.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, block_table=table, **args)
        k_rows, v_rows = _unpage(k_cache, table), _unpage(v_cache, table)
    else:
        k_cache, v_cache = k_rows.clone(), v_rows.clone()
        out = attnkit.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, **args)
        k_rows, v_rows = k_cache, v_cache
    rotate = 2 * rotary["rotary_cos"].shape[1]
    for b, (n, p) in enumerate(zip(lens.tolist(), pads.tolist())):
        k_pos = torch.arange(n, n + 2)
        assert_close(k_rows[b, n : n + 2, :, :rotate], _rotate(k_new[b : b + 1], rotary["rotary_cos"][k_pos][None],
                     rotary["rotary_sin"][k_pos][None], True)[0, :, :, :rotate], atol=1e-6, rtol=1e-6)  # fmt: skip
        q_pos = torch.arange(n, n + 3) if kw else torch.full((3,), n)
        q_rot = _rotate(q[b : b + 1], rotary["rotary_cos"][q_pos][None], rotary["rotary_sin"][q_pos][None], True)
        slope_kw = {} if slopes is None else dict(alibi_slopes=slopes)
        exp = attention_naive(q_rot, k_rows[b : b + 1, p : n + 2], v_rows[b : b + 1, p : n + 2], **slope_kw, **kw)
        assert_close(out[b : b + 1], exp, atol=1e-6, rtol=1e-6)


def test_cache_leftpad_checks(monkeypatch):
    k_cache, v_cache, bk, bv = _small_cache()
    q, k_new, v_new = rand(2, 1, 1, 4), rand(2, 3, 1, 4), rand(2, 3, 1, 4)

    def call(pads, lens=None, **kw):
        lens = _lens(4, 6) if lens is None else lens
        return attnkit.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens,
                                              cache_leftpad=pads, backend="reference", **kw)  # fmt: skip

    with pytest.raises(InvalidArgumentError, match=r"cache_leftpad\[1\] is 7 but cache_seqlens\[1\] is 6"):
        call(_lens(0, 7))
    with pytest.raises(InvalidArgumentError, match=r"cache_leftpad\[0\] is -1"):
        call(_lens(-1, 0), lens=5)
    with pytest.raises(InvalidArgumentError, match="cache_leftpad must be int32"):
        call(torch.tensor([0, 1]))
    with pytest.raises(InvalidArgumentError, match="cache_seqlens is required"):
        attnkit.attention_with_kvcache(q, k_cache, v_cache, cache_leftpad=_lens(0, 1), backend="reference")
    assert torch.equal(k_cache, bk) and torch.equal(v_cache, bv)
    # lengths and left padding given as tensors are read back together, once
    from helpers import record_read_backs

    seen = record_read_backs(monkeypatch, "attnkit/ops/kvcache.py", "attnkit/ops/_kvcache_checks.py")
    call(_lens(1, 2))
    assert len(seen) == 1, seen
    from attnkit.ops import kvcache as kvcache_op

    monkeypatch.setattr(kvcache_op, "_capturing", lambda device: True)
    k_cache.copy_(bk)
    with pytest.raises(RuntimeError, match="cache_leftpad"):
        call(_lens(5, 0))
    assert len(seen) == 1, seen
    assert torch.equal(k_cache, bk)


@pytest.mark.parametrize("value", [-1, 129, 2.0, True, "4"])
def test_num_splits_checked(value):
    q, k_cache, v_cache = rand(2, 1, 2, 4), rand(2, 10, 2, 4, seed=1), rand(2, 10, 2, 4, seed=2)
    with pytest.raises(InvalidArgumentError, match=r"num_splits is .*; allowed: 0 \(the backend chooses\) or 1..128"):
        attnkit.attention_with_kvcache(q, k_cache, v_cache, num_splits=value, backend="reference")


def test_return_lse_has_flash_attn_layout():
    """return_lse is flash-attn's return_softmax_lse: (batch, nheads, seqlen_q) float32, natural log."""
    q, k_cache, v_cache = rand(2, 3, 4, 8, dtype=torch.float32), rand(2, 10, 2, 8, seed=1, dtype=torch.float32), \
        rand(2, 10, 2, 8, seed=2, dtype=torch.float32)  # fmt: skip
    _, lse = attnkit.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=7, return_lse=True, num_splits=2,
                                              backend="reference")  # fmt: skip
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k_cache[:, :7].repeat_interleave(2, 2).double()) / 8**0.5
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 3)
    assert_close(lse, scores.logsumexp(-1), atol=1e-5, rtol=1e-5)
