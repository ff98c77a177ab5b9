"""attention_with_kvcache's argument checks, each raised before anything is written: caches whose append would
write one memory location from two places (the overlap test, attnkit.ops._overlap, is exact on small strided
views), lengths and page sizes out of range, non-bool flags, rotary tables that are not real floats; and empty
query tensors, which are valid."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from helpers import assert_close, rand, record_read_backs

import attnkit
from attnkit import InvalidArgumentError
from attnkit.ops import _overlap

I32 = torch.int32


def _lens(*n):
    return torch.tensor(n, dtype=I32)


def _addresses(x: torch.Tensor) -> list[int]:
    base = x.storage_offset()
    return [base + sum(i * s for i, s in zip(idx, x.stride())) for idx in itertools.product(*map(range, x.shape))]


def test_overlap_matches_brute_force():
    """Random views of one storage (zero, repeated and interleaved strides, offsets): both answers agree with the
    enumerated element addresses."""
    rng = random.Random(0)
    storage = torch.zeros(400)
    for _ in range(1500):
        ndim = rng.randint(1, 3)

        def view(ndim=ndim):
            shape = [rng.randint(1, 4) for _ in range(ndim)]
            stride = [rng.choice([0, 1, 2, 3, 5, 7, 12, 20]) for _ in range(ndim)]
            return storage.as_strided(shape, stride, rng.randint(0, 30))

        a, b = view(), view()
        addr_a, addr_b = _addresses(a), _addresses(b)
        case = (a.shape, a.stride(), a.storage_offset(), b.shape, b.stride(), b.storage_offset())
        assert _overlap.has_internal_overlap(a) == (len(set(addr_a)) != len(addr_a)), case
        assert _overlap.may_overlap(a, b) == bool(set(addr_a) & set(addr_b)), case


def test_overlap_of_common_cache_layouts():
    kv = torch.zeros(2, 8, 2, 3, 4)  # flash-attn's packed (B, S, 2, H, D): k and v interleaved, disjoint
    assert not _overlap.may_overlap(kv[:, :, 0], kv[:, :, 1]) and _overlap.may_overlap(kv[:, :, 0], kv[:, :, 0])
    wide = torch.zeros(3, 32, 2, 8)
    assert not _overlap.has_internal_overlap(wide[:, :16]) and not _overlap.may_overlap(wide[:, :16], wide[:, 16:])
    assert _overlap.has_internal_overlap(torch.zeros(1, 16, 2, 8).expand(3, 16, 2, 8))
    assert not _overlap.may_overlap(torch.zeros(4), torch.zeros(4))


def _step(q_len=1, new=2, batch=2, d=4):
    return rand(batch, q_len, 2, d, seed=3), rand(batch, new, 1, d, seed=4), rand(batch, new, 1, d, seed=5)


def test_expanded_cache_refuses_an_append_and_reads_fine():
    """A stride-0 expand over the batch: an append would write every row at once (cross-talk), so it is refused,
    while a read-only call over it (one prompt shared by the batch) equals the call on a real copy."""
    base_k, base_v = rand(1, 16, 1, 4, seed=1), rand(1, 16, 1, 4, seed=2)
    saved_k, saved_v = base_k.clone(), base_v.clone()
    k_cache, v_cache = base_k.expand(2, 16, 1, 4), base_v.expand(2, 16, 1, 4)
    q, k_new, v_new = _step()
    with pytest.raises(InvalidArgumentError, match=r"k_cache \(shape \(2, 16, 1, 4\), strides \(0, .*share memory"):
        attnkit.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=3, backend="reference")
    assert torch.equal(base_k, saved_k) and torch.equal(base_v, saved_v)
    lens = _lens(5, 11)
    shared = attnkit.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, backend="reference")
    copied = attnkit.attention_with_kvcache(
        q, k_cache.clone(), v_cache.clone(), cache_seqlens=lens, backend="reference"
    )
    assert torch.equal(shared, copied)
    with pytest.raises(InvalidArgumentError, match=r"v_cache .* share memory"):
        attnkit.attention_with_kvcache(q, k_cache.clone(), v_cache, k_new, v_new, cache_seqlens=3, backend="reference")


def test_same_tensor_as_k_and_v_cache():
    """k_cache is v_cache: an append would write keys over values, so it is refused; reading is fine. A packed
    (B, S, 2, H, D) cache split into its k and v halves shares a storage but no element, so it may append."""
    cache = rand(2, 16, 1, 4, seed=1)
    saved = cache.clone()
    q, k_new, v_new = _step()
    with pytest.raises(InvalidArgumentError, match="k_cache and v_cache share memory"):
        attnkit.attention_with_kvcache(q, cache, cache, k_new, v_new, cache_seqlens=3, backend="reference")
    with pytest.raises(InvalidArgumentError, match="k_cache and v_cache share memory"):
        longer = rand(2, 17, 1, 4, seed=6)  # two views one token apart: different tensors, shared elements
        attnkit.attention_with_kvcache(q, longer[:, :16], longer[:, 1:], k_new, v_new, cache_seqlens=3,
                                       backend="reference")  # fmt: skip
    assert torch.equal(cache, saved)
    out = attnkit.attention_with_kvcache(q, cache, cache, cache_seqlens=7, backend="reference")
    assert_close(out, attnkit.attention_with_kvcache(q, cache, cache.clone(), cache_seqlens=7, backend="reference"))

    packed = rand(2, 16, 2, 1, 4, seed=2)
    k_sep, v_sep = packed[:, :, 0].clone(), packed[:, :, 1].clone()
    out_packed = attnkit.attention_with_kvcache(
        q, packed[:, :, 0], packed[:, :, 1], k_new, v_new, cache_seqlens=_lens(3, 9), backend="reference"
    )
    out_sep = attnkit.attention_with_kvcache(
        q, k_sep, v_sep, k_new, v_new, cache_seqlens=_lens(3, 9), backend="reference"
    )
    assert torch.equal(out_packed, out_sep)
    assert torch.equal(packed[:, :, 0], k_sep) and torch.equal(packed[:, :, 1], v_sep)


TABLES = {
    # rows 0 and 1 both use page 1 and row 0's append writes it
    "append_into_shared": ([[0, 1], [1, 2]], (14, 3), "rows 0 and 1 both use it"),
    # row 1 lists page 3 twice, and appends into it
    "row_lists_page_twice": ([[0, 1], [3, 3]], (2, 15), "row 1 lists it twice"),
}


@pytest.mark.parametrize("name", list(TABLES))
def test_block_table_sharing_a_written_page_raises(name):
    table, lens, needle = TABLES[name]
    k_pages, v_pages = rand(4, 16, 1, 4, seed=1), rand(4, 16, 1, 4, seed=2)
    bk, bv = k_pages.clone(), v_pages.clone()
    q, k_new, v_new = _step(new=3)
    with pytest.raises(InvalidArgumentError, match=rf"block_table: the append writes page \d .*{needle}"):
        attnkit.attention_with_kvcache(
            q, k_pages, v_pages, k_new, v_new, cache_seqlens=_lens(*lens), block_table=torch.tensor(table, dtype=I32),
            backend="reference",
        )  # fmt: skip
    assert torch.equal(k_pages, bk) and torch.equal(v_pages, bv)


def test_shared_prefix_pages_are_fine():
    """Rows may share pages they only read (a common prompt): without an append, or when each row appends to pages
    of its own. Entries past the pages a row uses are not read, so they may repeat anything."""
    k_pages, v_pages = rand(5, 16, 1, 4, seed=1), rand(5, 16, 1, 4, seed=2)
    q, k_new, v_new = _step(new=3)
    prefix = torch.tensor([[0, 1, 1], [0, 2, 0]], dtype=I32)  # page 0 holds both rows' first 16 tokens
    attnkit.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=_lens(16, 16), block_table=prefix,
                                   backend="reference")  # fmt: skip
    out = attnkit.attention_with_kvcache(q, k_pages, v_pages, k_new, v_new, cache_seqlens=_lens(16, 20),
                                         block_table=prefix, backend="reference")  # fmt: skip
    assert torch.equal(k_pages[1, :3], k_new[0, :, 0:1].squeeze(0)) and torch.equal(k_pages[2, 4:7], k_new[1])
    assert out.shape == (2, 1, 2, 4)


def test_page_checks_read_back_once_and_not_more_with_an_append(monkeypatch):
    """The paged checks (pages in range; with an append, no written page used twice) cost one device read-back
    together, with or without an append; a contiguous cache with int lengths costs none."""
    k_pages, v_pages = rand(4, 16, 1, 4, seed=1), rand(4, 16, 1, 4, seed=2)
    table = torch.tensor([[0, 1], [2, 3]], dtype=I32)
    q, k_new, v_new = _step(new=3)
    seen = record_read_backs(monkeypatch, "attnkit/ops/kvcache.py", "attnkit/ops/_kvcache_checks.py")
    attnkit.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=5, block_table=table, backend="reference")
    assert len(seen) == 1, seen
    attnkit.attention_with_kvcache(q, k_pages, v_pages, k_new, v_new, cache_seqlens=5, block_table=table,
                                   backend="reference")  # fmt: skip
    assert len(seen) == 2, seen
    k_cache, v_cache = rand(2, 16, 1, 4, seed=1), rand(2, 16, 1, 4, seed=2)
    attnkit.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=5, backend="reference")
    assert len(seen) == 2, seen


@pytest.mark.parametrize("value", [2**31, 2**63, 17, -(2**40)])
def test_int_cache_seqlens_out_of_range(value):
    """An int cache_seqlens is checked against the capacity before any int32 tensor is made from it."""
    k_cache, v_cache = rand(2, 16, 1, 4, seed=1), rand(2, 16, 1, 4, seed=2)
    q = rand(2, 1, 2, 4, seed=3)
    expected = InvalidArgumentError if value < 0 else attnkit.KVCacheOverflowError
    with pytest.raises(expected, match=rf"cache_seqlens.*{value}|{value}.*room for 16"):
        attnkit.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=value, backend="reference")


@pytest.mark.parametrize("page_size", [0, 8, 24])
def test_paged_page_size_must_be_a_positive_multiple_of_16(page_size):
    pages = rand(4, page_size, 1, 4, seed=1)
    q = rand(2, 1, 2, 4, seed=3)
    with pytest.raises(InvalidArgumentError, match=rf"page size \(k_cache.shape\[1\]\) is {page_size}; .*positive"):
        attnkit.attention_with_kvcache(q, pages, pages.clone(), cache_seqlens=0,
                                       block_table=torch.zeros(2, 2, dtype=I32), backend="reference")  # fmt: skip


@pytest.mark.parametrize("shape", [(0, 1, 2, 4), (2, 0, 2, 4), (2, 1, 0, 4)], ids=["batch0", "seqlen0", "heads0"])
def test_empty_queries_give_an_empty_result_and_still_append(shape):
    batch = shape[0]
    k_cache, v_cache = rand(batch, 16, 1, 4, seed=1), rand(batch, 16, 1, 4, seed=2)
    k_new, v_new = rand(batch, 2, 1, 4, seed=4), rand(batch, 2, 1, 4, seed=5)
    out, lse = attnkit.attention_with_kvcache(rand(*shape), k_cache, v_cache, k_new, v_new, cache_seqlens=3,
                                              return_lse=True, backend="reference")  # fmt: skip
    assert out.shape == shape and lse.shape == (shape[0], shape[2], shape[1])
    assert torch.equal(k_cache[:, 3:5], k_new) and torch.equal(v_cache[:, 3:5], v_new)


def _rotary_call(**kw):
    k_cache, v_cache = rand(2, 16, 1, 4, seed=1), rand(2, 16, 1, 4, seed=2)
    q, k_new, v_new = _step()
    args = dict(rotary_cos=torch.ones(16, 2, dtype=torch.float64), rotary_sin=torch.zeros(16, 2, dtype=torch.float64))
    args.update(kw)
    before = k_cache.clone()

    def call():
        return attnkit.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=3, backend="reference",
                                              **args)  # fmt: skip

    return call, lambda: torch.equal(k_cache, before)


@pytest.mark.parametrize(
    "kw,needles",
    [
        (dict(return_lse="no"), ["return_lse", "'no'"]),
        (dict(return_lse=1), ["return_lse", "1"]),
        (dict(rotary_interleaved="no"), ["rotary_interleaved", "'no'"]),
        (dict(rotary_interleaved=None), ["rotary_interleaved", "None"]),
    ],
    ids=str,
)
def test_flags_must_be_bools(kw, needles):
    call, untouched = _rotary_call(**kw)
    with pytest.raises(attnkit.InvalidArgumentTypeError) as info:
        call()
    assert all(n in str(info.value) for n in needles) and untouched()


@pytest.mark.parametrize("name", ["rotary_cos", "rotary_sin"])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64, torch.bool])
def test_rotary_tables_must_be_real_floats(name, dtype):
    """A complex table (e.g. torch.polar's exp(i theta)) is refused, not cast to float32 (which would silently drop
    its imaginary part); integer and bool tables are refused too."""
    call, untouched = _rotary_call(**{name: torch.ones(16, 2, dtype=dtype)})
    with pytest.raises(attnkit.InvalidArgumentTypeError, match=rf"{name}.dtype is {str(dtype)[6:]}; allowed: float16"):
        call()
    assert untouched()


def test_rotary_tables_on_another_device():
    call, untouched = _rotary_call(rotary_sin=torch.zeros(16, 2, dtype=torch.float64, device="meta"))
    with pytest.raises(InvalidArgumentError, match="rotary_sin is on meta but q is on cpu"):
        call()
    assert untouched()
