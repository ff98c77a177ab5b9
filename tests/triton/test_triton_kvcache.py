"""The Triton split-KV decoding kernel (attention_with_kvcache) against the reference.

CPU runs go through the Triton interpreter with small caches; the ``gpu`` test uses long caches where many splits
and many pages are in play.
"""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

import attnkit
from attnkit.testing import max_abs_error


def _cache_case(dtype, paged, batch, seqlen_q, heads_k, group, head_dim, head_dim_v, lengths, new, device, gen,
                page=None):  # fmt: skip
    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    heads_q = heads_k * group
    q = rnd(batch, seqlen_q, heads_q, head_dim)
    k_new = rnd(batch, new, heads_k, head_dim)
    v_new = rnd(batch, new, heads_k, head_dim_v)
    capacity = max(lengths) + new + 16
    kw = {}
    if paged:
        page = page or (16 if device.type == "cpu" else 256)
        per_row = -(-capacity // page)
        num_blocks = batch * per_row + 3
        k_cache = rnd(num_blocks, page, heads_k, head_dim)
        v_cache = rnd(num_blocks, page, heads_k, head_dim_v)
        order = torch.randperm(num_blocks, generator=gen)[: batch * per_row]
        kw["block_table"] = order.view(batch, per_row).to(device=device, dtype=torch.int32)
    else:
        k_cache = rnd(batch + 1, capacity, heads_k, head_dim)
        v_cache = rnd(batch + 1, capacity, heads_k, head_dim_v)
        kw["cache_batch_idx"] = torch.randperm(batch + 1, generator=gen)[:batch].to(device=device, dtype=torch.int32)
    kw["cache_seqlens"] = torch.tensor(lengths, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, k_new, v_new, kw


def _compare(dtype, paged, seqlen_q, group, causal, window, softcap, alibi, device, lengths, new=2, dims=(40, 24),
             leftpad=False, num_splits=0, page=None):  # fmt: skip
    # A stable seed per case (hash() of a tuple holding a torch.dtype changes from process to process).
    key = repr((dtype, paged, seqlen_q, group, causal, window, softcap, alibi, leftpad)).encode()
    gen = torch.Generator().manual_seed(zlib.crc32(key))
    batch, heads_k = len(lengths), 2
    q, k_cache, v_cache, k_new, v_new, kw = _cache_case(
        dtype, paged, batch, seqlen_q, heads_k, group, *dims, lengths, new, device, gen, page=page
    )
    if leftpad:  # each row's keys start somewhere in [0, length]: the first row at 0, the last at its length
        pads = [0] + [int(torch.randint(0, n + 1, (1,), generator=gen)) for n in lengths[1:-1]] + [lengths[-1]]
        kw["cache_leftpad"] = torch.tensor(pads[: len(lengths)], dtype=torch.int32, device=device)
    slopes = (torch.rand(heads_k * group, generator=gen) * 0.3).to(device) if alibi else None
    opts = dict(causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes, return_lse=True, **kw)
    caches = {}
    results = {}
    for name, upcast in (("triton_cuda", None), ("exact", torch.float64), ("appended", None)):
        kc, vc = k_cache.clone(), v_cache.clone()
        args = (q, kc, vc, k_new, v_new)
        if upcast is not None:
            args = tuple(x.to(upcast) for x in args)
            kc, vc = args[1], args[2]
        backend = "triton_cuda" if name == "triton_cuda" else "reference"
        results[name] = attnkit.attention_with_kvcache(*args, backend=backend, num_splits=num_splits, **opts)
        caches[name] = (kc, vc)
    # The append itself: identical bytes whichever backend attends afterwards.
    assert torch.equal(caches["triton_cuda"][0], caches["appended"][0])
    assert torch.equal(caches["triton_cuda"][1], caches["appended"][1])
    out, lse = results["triton_cuda"]
    exact_out, exact_lse = results["exact"]
    plain_out = _plain(q, *caches["appended"], kw, [n + new for n in lengths], opts, k_new, v_new)
    assert not out.isnan().any()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(exact_lse))
    allowed = 2 * max_abs_error(plain_out, exact_out) + (1e-5 if dtype == torch.float32 else 1e-3)
    assert max_abs_error(out, exact_out) <= allowed
    finite = torch.isfinite(exact_lse)
    assert max_abs_error(lse[finite], exact_lse[finite]) <= 1e-3


def _plain(q, k_cache, v_cache, kw, totals, opts, k_new, v_new):
    """flash-attn's baseline: plain attention in the inputs' own dtype over each row's (appended) keys."""
    from attnkit.backends.reference.ops import gather_cache_rows

    from attnkit.params import KVCacheInfo
    from attnkit.testing import attention_naive

    info = KVCacheInfo(kw["cache_seqlens"], kw.get("cache_batch_idx"), kw.get("block_table"))
    starts = kw["cache_leftpad"].tolist() if "cache_leftpad" in kw else [0] * len(totals)
    outs = []
    for b, total in enumerate(totals):
        slopes = opts["alibi_slopes"]
        outs.append(
            attention_naive(
                q[b : b + 1], gather_cache_rows(k_cache, info, b, total, starts[b])[None],
                gather_cache_rows(v_cache, info, b, total, starts[b])[None], causal=opts["causal"],
                window_size=opts["window_size"], softcap=opts["softcap"], alibi_slopes=slopes,
            )
        )  # fmt: skip
    return torch.cat(outs)


CPU_GRID = [
    # dtype, paged, seqlen_q, group, causal, window, softcap, alibi
    (torch.float32, False, 1, 4, False, (-1, -1), 0.0, False),
    (torch.float16, False, 1, 4, True, (-1, -1), 0.0, True),
    (torch.bfloat16, True, 1, 2, True, (-1, -1), 0.0, False),
    (torch.float32, True, 3, 2, True, (20, 0), 5.0, True),
    (torch.float16, False, 17, 1, False, (7, 3), 0.0, False),
    (torch.float32, True, 5, 4, False, (-1, -1), 3.0, False),
]


@pytest.mark.parametrize("num_splits", [0, 3], ids=["auto-splits", "3-splits"])
@pytest.mark.parametrize("case", CPU_GRID, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_kvcache_matches_reference(case, num_splits):
    """Each case with the heuristic's split count (one, for these short caches on the CPU) and with three splits
    merged by the combine kernel."""
    _compare(*case, device=torch.device("cpu"), lengths=[37, 90], num_splits=num_splits)


LEFTPAD_GRID = [
    # dtype, paged, seqlen_q, group, causal, window, softcap, alibi
    (torch.float32, False, 1, 4, False, (-1, -1), 0.0, True),
    (torch.float16, True, 3, 2, True, (-1, -1), 0.0, True),
    (torch.float32, False, 4, 2, True, (9, 0), 2.0, False),
]


@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("case", LEFTPAD_GRID, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_kvcache_leftpad_matches_reference(case, num_splits):
    """Left-padded rows (cache_leftpad from 0 up to the row's whole length), contiguous and paged, ALiBi and
    windows measured from the row's own end, one split and several."""
    _compare(*case, device=torch.device("cpu"), lengths=[37, 50, 90, 20], leftpad=True, num_splits=num_splits)


@pytest.mark.parametrize("page", [16, 48, 64, 128])
def test_kvcache_page_sizes(page):
    """Pages smaller than the 64-key block (16, 48: each key gathers its page) and pages holding whole blocks (64,
    128: one page per block), with left padding and rows ending mid-page."""
    _compare(torch.float32, True, 2, 2, True, (-1, -1), 0.0, True, device=torch.device("cpu"), lengths=[3, 100, 190],
             new=3, dims=(32, 16), leftpad=True, num_splits=2, page=page)  # fmt: skip


@pytest.mark.parametrize("seqlen_q,group", [(2, 4), (8, 4), (16, 4), (16, 8)])
@pytest.mark.parametrize("causal", [False, True])
def test_kvcache_speculative_queries(seqlen_q, group, causal):
    """seqlen_q up to 16 (speculative decoding, chunked prefill) with GQA: the packed (group x seqlen_q) rows span
    one or two row blocks of the split kernel."""
    _compare(torch.float32, False, seqlen_q, group, causal, (-1, -1), 0.0, False, device=torch.device("cpu"),
             lengths=[40, 70], new=seqlen_q, dims=(32, 32), num_splits=2)  # fmt: skip


def test_kvcache_empty_row_gives_zero():
    """A row whose window sees no cached key returns 0 and lse -inf, never NaN."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 1, 2, 16, generator=gen)
    k_cache = torch.randn(1, 64, 2, 16, generator=gen)
    v_cache = torch.randn(1, 64, 2, 16, generator=gen)
    lens = torch.tensor([0], dtype=torch.int32)
    out, lse = attnkit.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, return_lse=True,
                                              backend="triton_cuda")  # fmt: skip
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()


def test_auto_does_not_pick_the_interpreter_for_kvcache(monkeypatch):
    """On CPU, backend='auto' keeps kvcache calls on the reference even though the interpreter could run them."""
    from attnkit.backends.triton import kvcache_launch

    def refuse(*args, **kwargs):
        raise AssertionError("auto dispatched a CPU kvcache call to the Triton interpreter")

    monkeypatch.setattr(kvcache_launch, "forward_kvcache", refuse)
    q = torch.randn(1, 1, 2, 16)
    cache = torch.randn(1, 32, 2, 16)
    out = attnkit.attention_with_kvcache(q, cache, cache.clone(), cache_seqlens=torch.tensor([5], dtype=torch.int32))
    assert out.shape == (1, 1, 2, 16)
    with pytest.raises(AssertionError, match="interpreter"):
        attnkit.attention_with_kvcache(q, cache, cache.clone(), cache_seqlens=torch.tensor([5], dtype=torch.int32),
                                       backend="triton_cuda")  # fmt: skip


GPU_GRID = list(
    itertools.product(
        [torch.bfloat16, torch.float16],
        [False, True],
        [(1, 4), (4, 8)],  # (seqlen_q, group): decode and speculative decoding with GQA
        [False, True],
    )
)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_GRID, ids=str)
def test_kvcache_gpu_long_caches(case):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    dtype, paged, (seqlen_q, group), causal = case
    _compare(dtype, paged, seqlen_q, group, causal, (-1, -1), 0.0, False, device=torch.device("cuda"),
             lengths=[1, 4000, 33000], new=3, dims=(128, 128))  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [0, 1, 7, 128])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("seqlen_q,leftpad", [(1, True), (16, False), (16, True)])
def test_kvcache_gpu_leftpad_splits_and_speculation(num_splits, paged, seqlen_q, leftpad):
    """Long caches on the GPU with left padding, forced split counts (one, several, the most) and 16 queries per
    row (speculative decoding) at GQA 32/8."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _compare(torch.bfloat16, paged, seqlen_q, 4, True, (-1, -1), 0.0, False, device=torch.device("cuda"),
             lengths=[1, 4000, 33000], new=3, dims=(128, 128), leftpad=leftpad, num_splits=num_splits)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("page", [16, 48, 64, 256])
def test_kvcache_gpu_page_sizes(page):
    """Compiled kernel: pages gathered key by key (16, 48) and one page per key block (64, 256)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _compare(torch.bfloat16, True, 1, 4, True, (-1, -1), 0.0, False, device=torch.device("cuda"),
             lengths=[1, 4000, 33000], new=3, dims=(128, 128), page=page)  # fmt: skip


@pytest.mark.parametrize("num_splits", [2, 1], ids=["split+combine", "one-split"])
def test_kvcache_fast_launch_passes_the_jit_arguments(monkeypatch, num_splits):
    """A repeated decode call with the same key launches the kernels of the first call directly, with exactly the
    arguments triton's JIT dispatch bound (faked here: the fast path is GPU only); new buffers each call. With one
    split there is no combine kernel: the split kernel writes the outputs."""
    from attnkit.backends.triton import fastpath, kvcache_launch, probes
    from fake_triton import fake_jit, no_driver

    from attnkit.params import AttentionParams, KVCacheInfo

    jit, fast = [], []
    monkeypatch.setattr(kvcache_launch, "kvcache_split_fwd", fake_jit(kvcache_launch.kvcache_split_fwd, jit, fast))
    monkeypatch.setattr(kvcache_launch, "combine_splits", fake_jit(kvcache_launch.combine_splits, jit, fast))
    monkeypatch.setattr(probes, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(kvcache_launch, "plans", fastpath.Plans())
    no_driver(monkeypatch)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 1, 8, 64, generator=gen, dtype=torch.bfloat16)
    k_cache = torch.randn(3, 96, 2, 64, generator=gen, dtype=torch.bfloat16)
    info = KVCacheInfo(torch.tensor([40, 96], dtype=torch.int32), torch.tensor([2, 0], dtype=torch.int32),
                       cache_leftpad=torch.tensor([3, 0], dtype=torch.int32), num_splits=num_splits)  # fmt: skip
    slopes = torch.rand(8, generator=gen)
    params = AttentionParams(softmax_scale=0.125, causal=True, window_left=30, window_right=0, softcap=4.0)
    out1, _ = kvcache_launch.forward_kvcache(q, k_cache, k_cache, info, slopes, params)
    out2, lse2 = kvcache_launch.forward_kvcache(q, k_cache, k_cache, info, slopes, params)
    kernels = 2 if num_splits > 1 else 1
    assert len(jit) == kernels and len(fast) == kernels and out2 is not out1
    for (grid, expected), (fast_grid, got), fresh in zip(jit, fast, ((8, 9), (0, 1, 2, 3))):
        assert fast_grid == grid and len(got) == len(expected)
        for i, (a, b) in enumerate(zip(got, expected)):
            if i in fresh:  # the workspace and the outputs: new tensors of the same layout
                assert a is not b and (a.shape, a.stride(), a.dtype) == (b.shape, b.stride(), b.dtype)
            else:
                assert a is b or (not isinstance(a, torch.Tensor) and a == b and type(a) is type(b)), i
    if num_splits > 1:
        assert fast[1][1][2] is out2 and fast[1][1][3] is lse2
    else:  # the split kernel's destinations are views of the outputs
        assert fast[0][1][8].data_ptr() == out2.data_ptr() and fast[0][1][9].data_ptr() == lse2.data_ptr()
    # Other parameters or another cache shape: the JIT path again.
    kvcache_launch.forward_kvcache(q, k_cache, k_cache, info, None, params)
    kvcache_launch.forward_kvcache(q, k_cache[:, :80], k_cache[:, :80], info, slopes, params)
    assert len(jit) == 3 * kernels and len(fast) == kernels


@pytest.mark.gpu
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_gpu_fast_launch_bitwise(paged, monkeypatch):
    """On the GPU the remembered kernels give the JIT path's bits, and the repeated call does not go through the
    JIT (ALiBi, softcap and a window in play)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from attnkit.backends.triton import fastpath, kvcache_launch

    gen = torch.Generator().manual_seed(11)
    q, k_cache, v_cache, _, _, kw = _cache_case(torch.bfloat16, paged, 3, 1, 2, 4, 128, 128, [5, 3000, 9000], 0,
                                                torch.device("cuda"), gen)  # fmt: skip
    slopes = (torch.rand(8, generator=gen) * 0.3).cuda()
    opts = dict(causal=True, window_size=(2000, 0), softcap=20.0, alibi_slopes=slopes, return_lse=True, **kw)
    monkeypatch.setattr(fastpath, "ENABLED", False)
    slow = attnkit.attention_with_kvcache(q, k_cache, v_cache, backend="triton_cuda", **opts)
    monkeypatch.setattr(fastpath, "ENABLED", True)
    first = attnkit.attention_with_kvcache(q, k_cache, v_cache, backend="triton_cuda", **opts)

    class NoJit:
        def __getitem__(self, grid):
            raise AssertionError("the repeated call went through triton's JIT dispatch")

    monkeypatch.setattr(kvcache_launch, "kvcache_split_fwd", NoJit())
    monkeypatch.setattr(kvcache_launch, "combine_splits", NoJit())
    second = attnkit.attention_with_kvcache(q, k_cache, v_cache, backend="triton_cuda", **opts)
    for a, b, c in zip(slow, first, second):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.gpu
@pytest.mark.parametrize("leftpad", [False, True], ids=["", "leftpad"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_gpu_cuda_graph_capture(paged, leftpad):
    """flash-attn's decode loop (a cache_seqlens tensor, new k/v appended) can be captured in a CUDA graph: the
    checks run on the device during capture, and a replay gives the eager call's output and cache bytes."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cuda = torch.device("cuda")
    gen = torch.Generator().manual_seed(12)
    q, k_cache, v_cache, k_new, v_new, kw = _cache_case(torch.bfloat16, paged, 3, 1, 2, 4, 128, 128,
                                                        [5, 3000, 9000], 1, cuda, gen)  # fmt: skip
    if leftpad:
        kw["cache_leftpad"] = torch.tensor([0, 1000, 8999], dtype=torch.int32, device=cuda)
    opts = dict(causal=True, backend="triton_cuda", **kw)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    k_eager, v_eager = k_cache.clone(), v_cache.clone()
    out_eager = attnkit.attention_with_kvcache(q, k_eager, v_eager, k_new, v_new, **opts)

    def step():
        # Appending the same k/v at the same positions is idempotent, so warm-up and replay may repeat it.
        return attnkit.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, **opts)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_graph = step()
    # Back to the state before the append, and a blank output: the replay has to do both again.
    k_cache.copy_(k_before)
    v_cache.copy_(v_before)
    out_graph.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out_graph, out_eager)
    assert torch.equal(k_cache, k_eager) and torch.equal(v_cache, v_eager)


def _strided(x: torch.Tensor, junk: int) -> torch.Tensor:
    """The same values as ``x`` in a view that is not contiguous: every other element along the last axis, the
    elements in between set to ``junk`` (a kernel that ignores the stride reads them)."""
    wide = torch.full((*x.shape[:-1], 2 * x.shape[-1]), junk, dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    view = wide[..., ::2]
    assert not view.is_contiguous() and torch.equal(view, x)
    return view


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("backend", ["triton_cuda", "reference"])
def test_kvcache_strided_index_tensors(paged, backend):
    """Strided cache_seqlens, cache_batch_idx and block_table give the bits of their contiguous copies (the Triton
    kernels read them as dense vectors, so the frontend makes them contiguous), append included."""
    gen = torch.Generator().manual_seed(21)
    q, k_cache, v_cache, k_new, v_new, kw = _cache_case(torch.float32, paged, 3, 2, 2, 2, 16, 16, [5, 40, 17], 2,
                                                        torch.device("cpu"), gen)  # fmt: skip
    strided = {name: _strided(t, 7 if name == "cache_seqlens" else 10**6) for name, t in kw.items()}
    results = []
    for opts in (kw, strided):
        kc, vc = k_cache.clone(), v_cache.clone()
        out = attnkit.attention_with_kvcache(q, kc, vc, k_new, v_new, causal=True, return_lse=True, backend=backend,
                                             **opts)  # fmt: skip
        results.append((*out, kc, vc))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(0, 1, 4, 16), (2, 0, 4, 16), (2, 1, 0, 16)], ids=["batch0", "seqlen0", "heads0"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_empty_queries(shape, paged):
    """No batch rows, queries or query heads: an empty result like the reference's (the split heuristic divides by
    the batch, so an empty batch must not reach it), with the append still done."""
    batch = shape[0]
    kw = dict(cache_seqlens=3)
    if paged:
        kw["block_table"] = torch.arange(batch * 2, dtype=torch.int32).view(batch, 2)
    rows = batch * 2 if paged else batch
    k_cache, v_cache = torch.randn(rows, 16, 2, 16), torch.randn(rows, 16, 2, 16)
    k_new, v_new = torch.randn(batch, 2, 2, 16), torch.randn(batch, 2, 2, 16)
    results = []
    for backend in ("triton_cuda", "reference"):
        kc, vc = k_cache.clone(), v_cache.clone()
        out, lse = attnkit.attention_with_kvcache(torch.randn(*shape), kc, vc, k_new, v_new, return_lse=True,
                                                  backend=backend, **kw)  # fmt: skip
        results.append((out, lse, kc, vc))
    for a, b in zip(*results):
        assert a.shape == b.shape and torch.equal(a, b)
    assert results[0][0].shape == shape


def test_kvcache_launch_handles_no_queries():
    """The backend entry point itself (below the frontend) returns an empty result for batch 0."""
    from attnkit.backends.triton import kvcache_launch

    from attnkit.params import AttentionParams, KVCacheInfo

    q, cache = torch.randn(0, 1, 4, 16), torch.randn(0, 16, 2, 16)
    info = KVCacheInfo(torch.zeros(0, dtype=torch.int32))
    out, lse = kvcache_launch.forward_kvcache(q, cache, cache, info, None, AttentionParams(softmax_scale=0.25))
    assert out.shape == (0, 1, 4, 16) and lse.shape == (0, 4, 1)


@pytest.mark.parametrize("opts", [dict(), dict(causal=True, window_size=(9, 0)), dict(softcap=3.0)], ids=str)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("backend", ["triton_cuda", "reference"])
@pytest.mark.parametrize("leftpad", [False, True], ids=["", "leftpad"])
def test_kvcache_nan_outside_the_rows_never_leaks(backend, paged, opts, leftpad):
    """NaN and inf in every cache slot outside a row's keys (past its length after the append, before its left
    padding), in unused pages and in the cache rows no batch row uses: the output and lse are those of the same
    cache with zeros there, bit for bit, and finite."""
    gen = torch.Generator().manual_seed(31)
    lengths, new = [5, 0, 30], 2
    q, k_cache, v_cache, k_new, v_new, kw = _cache_case(torch.float32, paged, 3, 2, 2, 2, 16, 16, lengths, new,
                                                        torch.device("cpu"), gen)  # fmt: skip
    starts = [3, 0, 19] if leftpad else [0, 0, 0]
    if leftpad:
        kw["cache_leftpad"] = torch.tensor(starts, dtype=torch.int32)
    valid = torch.zeros(k_cache.shape[:2], dtype=torch.bool)  # (rows or pages, slots) holding a valid key
    for b, n in enumerate(lengths):
        for j in range(starts[b], n + new):
            if paged:
                valid[kw["block_table"][b, j // k_cache.shape[1]], j % k_cache.shape[1]] = True
            else:
                valid[kw["cache_batch_idx"][b], j] = True
    results = []
    for poison in (0.0, float("nan"), float("inf")):
        kc, vc = k_cache.clone(), v_cache.clone()
        kc[~valid], vc[~valid] = poison, -poison
        if poison == 0.0:
            clean_k, clean_v = kc, vc
        out, lse = attnkit.attention_with_kvcache(q, kc, vc, k_new, v_new, return_lse=True, backend=backend,
                                                  **kw, **opts)  # fmt: skip
        results.append((out, lse))
        assert torch.equal(kc[valid], clean_k[valid]) and torch.equal(vc[valid], clean_v[valid])
    for out, lse in results[1:]:
        assert not out.isnan().any() and not lse.isnan().any()
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])


def test_split_heuristic():
    """FA3's rule on an H200-like GPU (132 SMs x 2 resident programs): no split when the work nearly fills it or
    the cache is short; else the smallest count whose last wave is >= 85% as full as the best count's."""
    import math

    from attnkit.backends.triton.kvcache_splits import split_count

    slots = 264
    assert split_count(212, 2048, 64, slots) == 1  # >= 80% of the slots busy without splitting
    assert split_count(8, 8, 64, slots) == 1  # 512 keys: not worth a combine
    # batch x kv heads (GQA 32/8, one row block): 1 x 8 -> 29 splits (232 programs), 4 x 8 -> 8, 16 x 8 -> 2
    assert [split_count(w, 2048, 64, slots) for w in (8, 32, 128)] == [29, 8, 2]
    assert split_count(8, 20, 64, slots) == 17  # at most one split per key block: 20 blocks, best of 1..20

    def efficiency(work, splits):
        waves = work * splits / slots
        return waves / math.ceil(waves)

    for work in range(1, 212, 7):
        for blocks in (9, 33, 300, 4096):
            s = split_count(work, blocks, 64, slots)
            limit = min(128, blocks)
            best = max(efficiency(work, n) for n in range(1, limit + 1))
            assert 1 <= s <= limit and efficiency(work, s) >= 0.85 * best
            assert all(efficiency(work, n) < 0.85 * best for n in range(1, s))


def test_forced_num_splits_is_clamped_to_the_key_blocks():
    from attnkit.backends.triton.kvcache_launch import _WAVES, splits_for
    from attnkit.backends.triton.kvcache_splits import split_count

    from attnkit.params import KVCacheInfo

    cpu = torch.device("cpu")  # counted as 4 multiprocessors
    info = KVCacheInfo(torch.zeros(1, dtype=torch.int32), num_splits=64)
    assert splits_for(info, 8, 10, 64, cpu) == 10
    assert splits_for(KVCacheInfo(info.cache_seqlens, num_splits=3), 8, 10, 64, cpu) == 3
    assert splits_for(KVCacheInfo(info.cache_seqlens), 1, 10, 64, cpu) == split_count(1, 10, 64, _WAVES * 4) == 7


@pytest.mark.parametrize("page", [0, 64, 128], ids=["contiguous", "page64", "page128"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_tma_loop_equals_the_pointer_loop(page, num_splits, monkeypatch):
    """The decoding kernel's TMA loop (Hopper; forced here under the interpreter) against its pointer loop, with
    NaN in every cache row past a row's length: the contiguous descriptors end at the split's end, and the paged
    pool's last block of a split masks its values, so none of it may reach the output."""
    from attnkit.backends.triton import kvcache_launch

    from attnkit.params import AttentionParams, KVCacheInfo

    gen = torch.Generator().manual_seed(7 + page + num_splits)
    dt, heads_k, d, lens = torch.bfloat16, 2, 64, torch.tensor([37, 203], dtype=torch.int32)
    q = torch.randn(2, 2, 4, d, generator=gen).to(dt)
    if page:
        pages = 256 // page
        table = torch.randperm(2 * pages, generator=gen).to(torch.int32).view(2, pages)
        k_cache, v_cache = (torch.full((2 * pages, page, heads_k, d), float("nan"), dtype=dt) for _ in range(2))
        for b in range(2):
            for j in range(int(lens[b])):
                for cache in (k_cache, v_cache):
                    cache[table[b, j // page], j % page] = torch.randn(heads_k, d, generator=gen).to(dt)
    else:
        table = None
        k_cache, v_cache = (torch.randn(2, 256, heads_k, d, generator=gen).to(dt) for _ in range(2))
        for b in range(2):
            k_cache[b, lens[b] :] = v_cache[b, lens[b] :] = float("nan")
    info = KVCacheInfo(lens, None, table, None, num_splits)
    params = AttentionParams(softmax_scale=0.125, causal=True, window_left=100, window_right=0)
    pointer = kvcache_launch.forward_kvcache(q, k_cache, v_cache, info, None, params)
    monkeypatch.setattr(kvcache_launch, "tma_eligible", lambda *args: True)
    launched = []  # the launch scopes the descriptors' scratch allocator exactly when the kernel takes TMA
    real_scratch = kvcache_launch.tma.scratch

    def scratch(enabled: bool):
        launched.append(enabled)
        return real_scratch(enabled)

    monkeypatch.setattr(kvcache_launch.tma, "scratch", scratch)
    monkeypatch.setattr(kvcache_launch, "plans", kvcache_launch.fastpath.Plans())
    streamed = kvcache_launch.forward_kvcache(q, k_cache, v_cache, info, None, params)
    assert launched == [True]
    assert not streamed[0].isnan().any()
    torch.testing.assert_close(streamed[0], pointer[0], atol=2e-2, rtol=0)
    torch.testing.assert_close(streamed[1], pointer[1], atol=1e-4, rtol=0)


def test_tma_eligibility_keeps_to_the_validated_shapes(monkeypatch):
    """The decoding kernel streams through TMA only where the H200 runs validated it (bf16/fp16, head dim 128 for K
    and V, no left padding, pages of whole key blocks in one pool); the generic checks (Hopper, alignment) are
    tma.eligible's, stubbed here so that the decode-specific rules are what is tested."""
    from attnkit.backends.triton import kvcache_launch

    from attnkit.params import KVCacheInfo

    monkeypatch.setattr(kvcache_launch.tma, "eligible", lambda *args: True)
    lens = torch.tensor([5], dtype=torch.int32)

    def ok(d=128, dv=128, dtype=torch.bfloat16, page=0, leftpad=None, pool_view=False):
        shape = (4, page or 256, 2)
        k, v = torch.zeros(*shape, d, dtype=dtype), torch.zeros(*shape, dv, dtype=dtype)
        if pool_view:  # every other page of a larger pool: pages not adjacent
            k, v = torch.zeros(8, page, 2, d, dtype=dtype)[::2], torch.zeros(8, page, 2, dv, dtype=dtype)[::2]
        table = torch.zeros(1, 2, dtype=torch.int32) if page else None
        return kvcache_launch.tma_eligible(k, v, KVCacheInfo(lens, None, table, leftpad, 0), 64)

    assert ok() and ok(dtype=torch.float16) and ok(page=64) and ok(page=256)
    assert not ok(d=112, dv=16) and not ok(d=64, dv=64) and not ok(dv=64)
    assert not ok(dtype=torch.float32) and not ok(dtype=torch.float8_e4m3fn)
    assert not ok(leftpad=torch.tensor([1], dtype=torch.int32))
    assert not ok(page=16) and not ok(page=96) and not ok(page=64, pool_view=True)
    monkeypatch.setattr(kvcache_launch, "_TMA", False)
    assert not ok()
