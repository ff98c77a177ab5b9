"""The Triton host path: arguments built against each kernel's signature, launchers bound to compiled kernels,
launch plans (under the interpreter too), and the fused kv-cache append (rows, cache_batch_idx, pages)."""

from __future__ import annotations

import inspect

import pytest
import torch

import attnkit
from attnkit.errors import InvalidArgumentError, KVCacheOverflowError
from attnkit.ops import _library
from attnkit.params import AttentionParams


def _kernels():
    from attnkit.backends.triton import append_kernel, bwd_kernel, fwd_kernel, kvcache_kernel

    return [fwd_kernel.attn_fwd, bwd_kernel.attn_bwd_dkdv, bwd_kernel.attn_bwd_dq, bwd_kernel.attn_bwd_preprocess,
            kvcache_kernel.kvcache_split_fwd, kvcache_kernel.combine_splits, append_kernel.append_kv_fwd,
            append_kernel.append_kv_checked_fwd]  # fmt: skip


def test_arguments_follow_the_signature():
    """fastpath.arguments: every parameter in signature order (values by name, defaults filled in); a missing or
    unknown name is a TypeError naming it."""
    from attnkit.backends.triton import fastpath

    for kernel in _kernels():
        params = list(inspect.signature(kernel.fn).parameters.values())
        required = {p.name: i for i, p in enumerate(params) if p.default is inspect.Parameter.empty}
        args = fastpath.arguments(kernel, required)
        assert len(args) == len(params)
        for i, p in enumerate(params):
            assert args[i] == (i if p.default is inspect.Parameter.empty else p.default), (kernel.fn.__name__, p.name)
        missing = dict(required)
        name = next(iter(missing))
        del missing[name]
        with pytest.raises(TypeError, match=name):
            fastpath.arguments(kernel, missing)
        with pytest.raises(TypeError, match="no_such_parameter"):
            fastpath.arguments(kernel, {**required, "no_such_parameter": 1})


def test_plan_leading_parameters_are_the_kernels():
    """The per-call tensors of each plan are the kernels' leading parameters (else no plan is made)."""
    from attnkit.backends.triton import append_kernel, append_launch, fastpath, kvcache_launch, launch

    assert fastpath.leading(launch.attn_fwd, len(launch._FWD_LEAD)) == launch._FWD_LEAD
    assert fastpath.leading(kvcache_launch.kvcache_split_fwd, 13) == kvcache_launch._SPLIT_LEAD
    assert fastpath.leading(kvcache_launch.combine_splits, 4) == kvcache_launch._COMBINE_LEAD
    assert fastpath.leading(append_kernel.append_kv_fwd, len(append_launch._LEAD)) == append_launch._LEAD


class _Stub:
    """The CompiledKernel attributes triton's own runner reads, recording what it hands the C launcher."""

    function = "fn-handle"
    packed_metadata = "packed"

    def __init__(self):
        self.calls = []
        self.run = lambda *a: self.calls.append(a)

    def _init_handles(self):
        pass

    def launch_metadata(self, grid, stream, *args):
        return None


def test_bound_launcher_passes_what_tritons_runner_passes(monkeypatch):
    """fastpath.bind's launcher hands the C launcher exactly what ``CompiledKernel[grid](*args)`` of the
    installed triton does (grid, stream, handles, metadata, hooks, arguments), with the grid padded to 3-D."""
    from attnkit.backends.triton import fastpath
    from triton.compiler.compiler import CompiledKernel

    reference, bound = _Stub(), _Stub()
    args = (torch.empty(4), 3, 0.5, None, True)
    CompiledKernel.__getitem__(reference, (5, 1, 1))(*args, stream=7)
    launcher = fastpath.bind(None, bound, (5,), args[2:], torch.device("cuda", 0), False,
                             stream_of=lambda index: 7, current_device=lambda: 0)  # fmt: skip
    launcher(*args[:2])
    assert len(bound.calls) == 1 and bound.calls == reference.calls


def test_bind_refuses_unknown_kernels():
    from attnkit.backends.triton import fastpath

    assert fastpath.bind(None, object(), (1,), (), torch.device("cuda", 0), False, lambda i: 0, lambda: 0) is None


def test_forward_plan_runs_under_the_interpreter(monkeypatch):
    """A repeated forward goes through its plan (no JIT dispatch at all) and gives the first call's bits;
    ATTNKIT_HOST_FASTPATH=0 takes the JIT again."""
    from attnkit.backends.triton import fastpath, launch

    monkeypatch.setattr(launch, "fwd_plans", fastpath.Plans())
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 37, 2, 16, generator=gen) for _ in range(3))
    params = AttentionParams(softmax_scale=0.25, causal=True, window_right=0)
    first = launch.forward(q, k, v, None, params, None, "nvidia")
    assert len(launch.fwd_plans) == 1

    class NoJit:
        fn = staticmethod(launch.attn_fwd.fn)

        def __getitem__(self, grid):
            raise AssertionError("went through the JIT")

    real = launch.attn_fwd
    monkeypatch.setattr(launch, "attn_fwd", NoJit())
    second = launch.forward(q, k, v, None, params, None, "nvidia")
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    monkeypatch.setenv("ATTNKIT_HOST_FASTPATH", "0")
    with pytest.raises(AssertionError, match="JIT"):
        launch.forward(q, k, v, None, params, None, "nvidia")
    monkeypatch.setattr(launch, "attn_fwd", real)


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_backward_plan_runs_under_the_interpreter(monkeypatch, varlen):
    """A repeated backward goes through its plan (none of the three kernels through the JIT) and gives the first
    call's bits, GQA and ALiBi included; forced tiles or ATTNKIT_HOST_FASTPATH=0 take the JIT again."""
    from attnkit.backends.triton import fastpath, launch, tuning

    from attnkit.params import VarlenInfo

    monkeypatch.setattr(launch, "bwd_plans", fastpath.Plans())
    gen = torch.Generator().manual_seed(3)
    if varlen:
        q = torch.randn(45, 4, 16, generator=gen)
        k, v = (torch.randn(45, 2, 16, generator=gen) for _ in range(2))
        cu = torch.tensor([0, 7, 40], dtype=torch.int32)  # rows 40..44 belong to no sequence
        info = VarlenInfo(cu, cu, 33, 33)
    else:
        q = torch.randn(2, 37, 4, 16, generator=gen)
        k, v = (torch.randn(2, 29, 2, 16, generator=gen) for _ in range(2))
        info = None
    slopes = torch.rand(4, generator=gen)
    params = AttentionParams(softmax_scale=0.25, causal=True, window_right=0)
    out, lse = launch.forward(q, k, v, slopes, params, info, "nvidia")
    dout = torch.randn(out.shape, generator=gen)
    first = launch.backward(dout, q, k, v, out, lse, slopes, params, info, "nvidia")
    assert len(launch.bwd_plans) == 1

    class NoJit:
        def __init__(self, kernel):
            self.fn = kernel.fn

        def __getitem__(self, grid):
            raise AssertionError("went through the JIT")

    for name in ("attn_bwd_preprocess", "attn_bwd_dkdv", "attn_bwd_dq"):
        monkeypatch.setattr(launch, name, NoJit(getattr(launch, name)))
    second = launch.backward(dout, q, k, v, out, lse, slopes, params, info, "nvidia")
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    if varlen:
        assert all(not g[40:].any() for g in second)  # padding rows: zero gradients
    tile = launch.configs.INTERPRETER_TILES["dq"]
    with tuning.forced_tiles(dq=tile), pytest.raises(AssertionError, match="JIT"):
        launch.backward(dout, q, k, v, out, lse, slopes, params, info, "nvidia")
    monkeypatch.setenv("ATTNKIT_HOST_FASTPATH", "0")
    with pytest.raises(AssertionError, match="JIT"):
        launch.backward(dout, q, k, v, out, lse, slopes, params, info, "nvidia")


def _caches(kind, dtype, gen):
    """(k_cache, v_cache, k, v, seqlens, batch_idx, block_table) of a small decode/prefill append."""
    batch, heads, d, dv, new = 3, 2, 16, 8, 5
    k = torch.randn(batch, new, heads, d, generator=gen).to(dtype)
    v = torch.randn(batch, new, heads, dv, generator=gen).to(dtype)
    seqlens = torch.tensor([0, 14, 27], dtype=torch.int32)
    rows, table = None, None
    if kind == "paged":
        page, per_row = 16, 3
        k_cache = torch.randn(batch * per_row + 2, page, heads, d, generator=gen).to(dtype)
        v_cache = torch.randn(batch * per_row + 2, page, heads, dv, generator=gen).to(dtype)
        table = torch.randperm(batch * per_row + 2, generator=gen)[: batch * per_row].view(batch, per_row)
        table = table.to(torch.int32)
    else:
        k_cache = torch.randn(batch + 2, 40, heads, d, generator=gen).to(dtype)
        v_cache = torch.randn(batch + 2, 40, heads, dv, generator=gen).to(dtype)
        if kind == "batch_idx":
            rows = torch.tensor([4, 0, 2], dtype=torch.int32)
        else:
            k_cache, v_cache = k_cache[:batch], v_cache[:batch]
    return k_cache, v_cache, k, v, seqlens, rows, table


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["rows", "batch_idx", "paged"])
def test_fused_append_matches_torch_indexing(kind, dtype, monkeypatch):
    """The append kernel writes what the op layer's torch indexing writes, every other slot untouched (the whole
    caches are compared), and returns the lengths after the append; the repeated call (its plan) too."""
    from attnkit.backends.triton import append_launch, fastpath

    monkeypatch.setattr(append_launch, "plans", fastpath.Plans())
    gen = torch.Generator().manual_seed(3)
    k_cache, v_cache, k, v, seqlens, rows, table = _caches(kind, dtype, gen)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    _library.append_kv(want_k, want_v, k, v, seqlens, rows, table)
    for attempt in range(2):
        got_k, got_v = k_cache.clone(), v_cache.clone()
        total = append_launch.append_kv(got_k, got_v, k, v, seqlens, rows, table)
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v), attempt
        assert total.dtype == torch.int32 and torch.equal(total, seqlens + k.shape[1])
    assert len(append_launch.plans) == 1


def test_fused_append_only_for_plain_copies():
    from attnkit.backends.triton import append_launch

    cache = torch.zeros(1, 16, 1, 8)
    new = torch.zeros(1, 1, 1, 8, dtype=torch.bfloat16)
    assert append_launch.fusable(cache, cache, new.float(), new.float())
    assert not append_launch.fusable(cache, cache, new, new)  # a conversion: torch's rounding, torch's append


@pytest.mark.parametrize("kind", ["rows", "batch_idx", "paged"])
def test_kvcache_with_fused_append_matches_reference(kind):
    """attention_with_kvcache on triton_cuda (fused append, plans on the second call) against the reference
    backend's append and attention, twice."""
    gen = torch.Generator().manual_seed(7)
    k_cache, v_cache, k, v, seqlens, rows, table = _caches(kind, torch.float32, gen)
    q = torch.randn(3, 5, 4, 16, generator=gen)
    extra = {"cache_batch_idx": rows} if rows is not None else {}
    if table is not None:
        extra["block_table"] = table
    results = {}
    for name in ("reference", "triton_cuda"):
        kc, vc = k_cache.clone(), v_cache.clone()
        outs = [
            attnkit.attention_with_kvcache(
                q, kc, vc, k, v, cache_seqlens=seqlens + 5 * step, causal=True, backend=name, **extra
            )
            for step in range(2)
        ]
        results[name] = (outs, kc, vc)
    (ref_out, ref_k, ref_v), (tri_out, tri_k, tri_v) = results["reference"], results["triton_cuda"]
    assert torch.equal(ref_k, tri_k) and torch.equal(ref_v, tri_v)
    for a, b in zip(ref_out, tri_out):
        assert (a - b).abs().max() < 1e-4


@pytest.mark.parametrize("kind", ["rows", "paged"])
def test_kvcache_errors_leave_every_buffer_untouched(kind):
    """A call that fails a check (an overflowing length, a page outside the pool) raises and writes nothing:
    caches, new keys and lengths as they were."""
    gen = torch.Generator().manual_seed(9)
    k_cache, v_cache, k, v, seqlens, _, table = _caches(kind, torch.float32, gen)
    q = torch.randn(3, 5, 4, 16, generator=gen)
    extra = {"block_table": table} if table is not None else {}
    if kind == "paged":
        bad = table.clone()
        bad[2, 1] = k_cache.shape[0] + 5  # a page the append writes
        extra["block_table"] = bad
        lengths, error = seqlens, InvalidArgumentError
    else:
        lengths, error = torch.tensor([0, 14, 36], dtype=torch.int32), KVCacheOverflowError
    before = [t.clone() for t in (k_cache, v_cache, k, v, lengths)]
    with pytest.raises(error):
        attnkit.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths, backend="triton_cuda",
                                       **extra)  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(before, (k_cache, v_cache, k, v, lengths)))


def test_varlen_forward_plan_runs_under_the_interpreter(monkeypatch):
    """Varlen calls have plans too (cu_seqlens are per-call tensors, the longest lengths part of the key): the
    repeated call skips the JIT, gives the same bits and defines the padding rows past cu_seqlens_q[-1]."""
    from attnkit.backends.triton import fastpath, launch

    from attnkit.params import VarlenInfo

    monkeypatch.setattr(launch, "fwd_plans", fastpath.Plans())
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(45, 2, 16, generator=gen) for _ in range(3))
    cu = torch.tensor([0, 7, 40], dtype=torch.int32)  # rows 40..44 belong to no sequence
    varlen = VarlenInfo(cu, cu, 33, 33)
    params = AttentionParams(softmax_scale=0.25, causal=True, window_right=0)
    first = launch.forward(q, k, v, None, params, varlen, "nvidia")

    class NoJit:
        fn = staticmethod(launch.attn_fwd.fn)

        def __getitem__(self, grid):
            raise AssertionError("went through the JIT")

    monkeypatch.setattr(launch, "attn_fwd", NoJit())
    second = launch.forward(q, k, v, None, params, varlen, "nvidia")
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert torch.equal(second[0][40:], torch.zeros_like(second[0][40:]))
    assert bool(torch.isneginf(second[1][:, 40:]).all())
    other = VarlenInfo(torch.tensor([0, 20, 40], dtype=torch.int32), cu, 33, 33)  # same key, other lengths
    with pytest.raises(AssertionError, match="JIT"):  # a different max_seqlen_q is another key
        launch.forward(q, k, v, None, params, VarlenInfo(cu, cu, 34, 33), "nvidia")
    monkeypatch.undo()
    monkeypatch.setattr(launch, "fwd_plans", fastpath.Plans())
    want = launch.forward(q, k, v, None, params, other, "nvidia")
    got = launch.forward(q, k, v, None, params, other, "nvidia")
    assert all(torch.equal(a, b) for a, b in zip(want, got))


# ---- direct launches (direct_launch): packing checked against a fake driver ------------------------------------


class _FakeDriver:
    """Records each launch with the values its packed block holds, read back by the signature's C types."""

    def __init__(self, sizes, types, rc=0):
        self.sizes, self.types, self.rc, self.launches = sizes, types, rc, []

    def param_sizes(self, function):
        return self.sizes

    def launch(self, function, grid, block, shared, stream, params):
        import ctypes

        values = [ctypes.cast(params[i], ctypes.POINTER(t)).contents.value for i, t in enumerate(self.types)]
        self.launches.append((function, grid, block, shared, stream, values))
        return self.rc


class _Ptr:
    def __init__(self, address):
        self.address = address

    def data_ptr(self):
        return self.address


def _compiled(signature, **meta):
    from types import SimpleNamespace

    fields = dict(global_scratch_size=0, profile_scratch_size=0, num_ctas=1, launch_pdl=False,
                  launch_cooperative_grid=False, num_warps=4, shared=1024)  # fmt: skip
    fields.update(meta)
    return SimpleNamespace(src=SimpleNamespace(signature=signature), metadata=SimpleNamespace(**fields), function=77)


_SIGNATURE = {"A": "*bf16", "B": "*fp32", "HEAD": "constexpr", "n": "i32", "scale": "fp32", "flag": "i1",
              "big": "i64", "X": "*i32", "NONE": "constexpr"}  # fmt: skip
_TAIL = (64, 7, 0.5, True, 2**40, _Ptr(16), None)  # HEAD, n, scale, flag, big, X, NONE


def _driver_for_signature(rc=0):
    import ctypes

    types = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int32, ctypes.c_float, ctypes.c_int8, ctypes.c_int64,
             ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64]  # fmt: skip
    return _FakeDriver([ctypes.sizeof(t) for t in types], types, rc)


def test_direct_launch_packs_the_signatures_parameters_in_order(monkeypatch):
    """Constexprs skipped, scalars in their C types, lead addresses per call, tail pointers once, the two scratch
    pointers last (0), grid/block/shared memory/stream from the compiled kernel and the call."""
    from attnkit.backends.triton import direct_launch

    monkeypatch.setattr(direct_launch, "ENABLED", True)

    driver = _driver_for_signature()
    tail = (64, 7, 0.5, True, 2**40, _Ptr(0xABC0), None)  # HEAD, n, scale, flag, big, X, NONE
    direct = direct_launch.build(_compiled(_SIGNATURE), (3, 2, 1), tail, driver)
    assert direct is not None
    assert direct((_Ptr(0x1000), _Ptr(0x2000)), 99) is True
    assert direct((_Ptr(0x3000), _Ptr(0x4000)), 5) is True
    assert driver.launches == [
        (77, (3, 2, 1), 128, 1024, 99, [0x1000, 0x2000, 7, 0.5, 1, 2**40, 0xABC0, 0, 0]),
        (77, (3, 2, 1), 128, 1024, 5, [0x3000, 0x4000, 7, 0.5, 1, 2**40, 0xABC0, 0, 0]),
    ]


@pytest.mark.parametrize(
    "change",
    [
        dict(meta=dict(global_scratch_size=128)),  # TMA descriptors built on the device need scratch
        dict(meta=dict(profile_scratch_size=64)),
        dict(meta=dict(num_ctas=2)),
        dict(meta=dict(launch_pdl=True)),
        dict(signature={**_SIGNATURE, "scale": "bf16"}),  # a 16-bit float scalar: left to triton
        dict(signature={**_SIGNATURE, "X": "tensordesc<bf16[64, 64]>"}),
        dict(sizes=[8, 8, 4, 4, 1, 8, 8, 8]),  # the driver counts one parameter fewer
        dict(sizes=[8, 8, 8, 4, 1, 8, 8, 8, 8]),  # and here another size
        dict(sizes=None),  # a driver that cannot say
    ],
    ids=[
        "global-scratch",
        "profile-scratch",
        "cluster",
        "pdl",
        "bf16-scalar",
        "tensordesc",
        "count",
        "size",
        "unknown",
    ],
)
def test_direct_launch_refuses_kernels_it_cannot_pack_exactly(change, monkeypatch):
    from attnkit.backends.triton import direct_launch

    monkeypatch.setattr(direct_launch, "ENABLED", True)

    driver = _driver_for_signature()
    if "sizes" in change:
        driver.sizes = change["sizes"]
    compiled = _compiled(change.get("signature", _SIGNATURE), **change.get("meta", {}))
    assert direct_launch.build(compiled, (1, 1, 1), _TAIL, driver) is None


def _bound_with_fake_driver(monkeypatch, driver):
    """fastpath.bind over a compiled kernel of _SIGNATURE whose triton launcher records its calls, with direct
    launches on through ``driver``: (launcher, triton's calls)."""
    from attnkit.backends.triton import direct_launch, fastpath

    monkeypatch.setattr(direct_launch, "ENABLED", True)
    monkeypatch.setattr(direct_launch, "cuda_driver", lambda: driver)
    triton_calls = []
    compiled = _compiled(_SIGNATURE)
    compiled.run = lambda *a: triton_calls.append(a)
    compiled.packed_metadata = "packed"
    compiled.launch_metadata = lambda grid, stream, *args: None
    launcher = fastpath.bind(None, compiled, (3,), _TAIL, torch.device("cuda", 0), False, lambda i: 9, lambda: 0)
    return launcher, triton_calls


def test_bound_launcher_falls_back_to_triton_when_the_driver_refuses(monkeypatch):
    """A launch the driver refuses (rc != 0) goes through triton's launcher, which raises its error if any."""
    driver = _driver_for_signature(rc=201)  # CUDA_ERROR_INVALID_CONTEXT
    launcher, triton_calls = _bound_with_fake_driver(monkeypatch, driver)
    lead = (_Ptr(0x1000), _Ptr(0x2000))
    launcher(*lead)
    assert len(driver.launches) == 1 and len(triton_calls) == 1
    assert triton_calls[0][:4] == (3, 1, 1, 9) and triton_calls[0][9:] == (*lead, *_TAIL)
    driver.rc = 0
    launcher(*lead)
    assert len(driver.launches) == 2 and len(triton_calls) == 1


def test_bound_launcher_leaves_hooked_launches_to_triton(monkeypatch):
    """With a launch hook set (a profiler), launches go through triton's launcher, which calls the hooks."""
    from types import SimpleNamespace

    from attnkit.backends.triton import fastpath

    monkeypatch.setattr(fastpath, "_hooks", lambda: SimpleNamespace(
        launch_enter_hook=SimpleNamespace(calls=[print]), launch_exit_hook=None))  # fmt: skip
    driver = _driver_for_signature()
    launcher, triton_calls = _bound_with_fake_driver(monkeypatch, driver)
    launcher(_Ptr(0), _Ptr(0))
    assert not driver.launches and len(triton_calls) == 1


def test_direct_launch_can_be_switched_off(monkeypatch):
    """direct_launch.ENABLED = False (A/B timing) builds no direct launcher: plans keep triton's launcher."""
    from attnkit.backends.triton import direct_launch

    assert direct_launch.build(_compiled(_SIGNATURE), (1, 1, 1), _TAIL, _driver_for_signature()) is not None
    monkeypatch.setattr(direct_launch, "ENABLED", False)
    assert direct_launch.build(_compiled(_SIGNATURE), (1, 1, 1), _TAIL, _driver_for_signature()) is None


def test_frontend_runner_repeats_the_first_call(monkeypatch):
    """attnkit.attention's repeated eager calls run the backend's bound forward (no launch.forward, no plan key):
    same bits as the first call, a fresh lse for return_lse=True, the shared lse buffer only where it is dropped;
    forced tiles go back through launch.forward; another stride layout is a call of its own, and right."""
    from attnkit.backends.triton import configs, fastpath, launch, tuning

    from attnkit.ops import _fastcall
    from attnkit.testing import attention_ref

    monkeypatch.setattr(launch, "fwd_plans", fastpath.Plans())
    _fastcall.clear()
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 37, 2, 16, generator=gen) for _ in range(3))
    first, lse1 = attnkit.attention(q, k, v, causal=True, backend="triton", return_lse=True)
    first_dropped = attnkit.attention(q, k, v, causal=True, backend="triton")
    assert sum(hit.runner is not None for hit in _fastcall._ATTENTION.values()) == 2
    real = launch.forward

    def no_forward(*args, **kwargs):
        raise AssertionError("went through launch.forward")

    monkeypatch.setattr(launch, "forward", no_forward)
    out, lse2 = attnkit.attention(q, k, v, causal=True, backend="triton", return_lse=True)
    assert torch.equal(out, first) and torch.equal(lse2, lse1) and lse2.data_ptr() != lse1.data_ptr()
    assert torch.equal(attnkit.attention(q, k, v, causal=True, backend="triton"), first_dropped)
    assert torch.equal(first, first_dropped)
    with tuning.forced_tiles(fwd=configs.Tile(16, 16, 4, 1)):
        with pytest.raises(AssertionError, match=r"launch\.forward"):
            attnkit.attention(q, k, v, causal=True, backend="triton")
    monkeypatch.setattr(launch, "forward", real)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same shape, other strides
    got = attnkit.attention(qt, k, v, causal=True, backend="triton")
    want = attention_ref(q.double(), k.double(), v.double(), causal=True)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lengths", ["int", "tensor", "tensor-checked"])
@pytest.mark.parametrize("kind", ["rows", "paged"])
@pytest.mark.parametrize("return_lse", [False, True], ids=["out", "lse"])
def test_decode_runner_repeats_the_op(kind, lengths, return_lse, monkeypatch):
    """Repeated decode steps through the frontend run the backend's bound step (Backend.kvcache_runner: no
    run_kvcache; with an int length and a contiguous cache, no lengths tensor either), with the caches, outputs
    and lse the general path gives (ATTNKIT_HOST_FASTPATH=0), step by step; one query and several."""
    from attnkit.ops import _fastcall, _kvcache_checks

    gen = torch.Generator().manual_seed(11)
    k_cache, v_cache, k, v, seqlens, _, table = _caches(kind, torch.float32, gen)
    extra = {"block_table": table} if table is not None else {}
    for seqlen_q in (1, 5):
        q = torch.randn(3, seqlen_q, 4, 16, generator=gen)

        def steps(fast: bool, q: torch.Tensor):
            monkeypatch.setenv("ATTNKIT_HOST_FASTPATH", "1" if fast else "0")
            if lengths == "tensor-checked":  # the GPU's way: the append kernel takes the range check
                from attnkit.ops import kvcache

                monkeypatch.setattr(kvcache, "_asserts_on_device", lambda t: True)
                monkeypatch.setattr(_library, "append_kv", _refuse)  # (the torch append; never with a runner)
            _fastcall.clear()
            kc, vc = k_cache.clone(), v_cache.clone()
            outs = []
            for step in range(3):
                if lengths == "int":
                    lens = 3 + 2 * step if kind == "rows" else 5 + 2 * step
                else:
                    lens = seqlens + 2 * step
                kn, vn = k[:, :2] + step, v[:, :2] - step
                outs.append(
                    attnkit.attention_with_kvcache(
                        q,
                        kc,
                        vc,
                        kn,
                        vn,
                        cache_seqlens=lens,
                        causal=True,
                        return_lse=return_lse,
                        backend="triton_cuda",
                        **extra,
                    )
                )
                if fast and step == 0:
                    assert [h.runner is not None for h in _fastcall._KVCACHE.values()] == [True]
                    monkeypatch.setattr(_library, "run_kvcache", _refuse)
                    if lengths == "int" and kind == "rows":  # the length goes to the append kernel as a number
                        monkeypatch.setattr(_kvcache_checks, "lengths", _refuse)
            monkeypatch.undo()
            return outs, kc, vc

        fast_outs, fast_k, fast_v = steps(True, q)
        if lengths == "tensor-checked":
            from attnkit.backends.triton import append_launch

            assert any(key[-1] is not None for key in append_launch.plans._plans), "no checked append ran"
        slow_outs, slow_k, slow_v = steps(False, q)
        assert torch.equal(fast_k, slow_k) and torch.equal(fast_v, slow_v)
        for a, b in zip(fast_outs, slow_outs):
            a, b = (a, b) if return_lse else ((a,), (b,))
            assert all(torch.equal(x, y) for x, y in zip(a, b))


def _refuse(*args, **kwargs):
    raise AssertionError("went through the general path")


def test_repeated_decode_with_a_bad_int_length_raises_and_writes_nothing():
    """The int-length fast path checks the length on the host as the general path does: an overflowing or negative
    length raises before anything is written, on a repeated step too."""
    from attnkit.ops import _fastcall

    _fastcall.clear()
    gen = torch.Generator().manual_seed(12)
    k_cache, v_cache = torch.randn(2, 40, 2, 16, generator=gen), torch.randn(2, 40, 2, 16, generator=gen)
    q, k, v = torch.randn(2, 1, 4, 16, generator=gen), torch.randn(2, 1, 2, 16, generator=gen), torch.randn(2, 1, 2, 16)
    for n in (5, 6):
        attnkit.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=n, backend="triton_cuda")
    assert [h.runner is not None for h in _fastcall._KVCACHE.values()] == [True]
    before = (k_cache.clone(), v_cache.clone())
    with pytest.raises(KVCacheOverflowError, match="room for 40"):
        attnkit.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=40, backend="triton_cuda")
    with pytest.raises(InvalidArgumentError, match="negative"):
        attnkit.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=-1, backend="triton_cuda")
    assert torch.equal(before[0], k_cache) and torch.equal(before[1], v_cache)


def test_repeated_full_cache_reads_take_the_bound_step(monkeypatch):
    """cache_seqlens=None (every row full, no append) takes the bound step too, with one lengths tensor kept for
    every step, and gives the general path's bits; a paged full cache keeps its page check on every step."""
    from attnkit.ops import _fastcall, _kvcache_checks

    _fastcall.clear()
    gen = torch.Generator().manual_seed(13)
    k_cache, v_cache = torch.randn(2, 40, 2, 16, generator=gen), torch.randn(2, 40, 2, 16, generator=gen)
    q = torch.randn(2, 3, 4, 16, generator=gen)
    first = attnkit.attention_with_kvcache(q, k_cache, v_cache, causal=True, backend="triton_cuda")
    monkeypatch.setattr(_kvcache_checks, "lengths", _refuse)
    monkeypatch.setattr(_library, "run_kvcache", _refuse)
    again = attnkit.attention_with_kvcache(q, k_cache, v_cache, causal=True, backend="triton_cuda")
    assert torch.equal(first, again)
    monkeypatch.undo()
    monkeypatch.setenv("ATTNKIT_HOST_FASTPATH", "0")
    assert torch.equal(attnkit.attention_with_kvcache(q, k_cache, v_cache, causal=True, backend="triton_cuda"), first)
    monkeypatch.delenv("ATTNKIT_HOST_FASTPATH")
    pages = torch.randn(6, 16, 2, 16, generator=gen)
    table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    attnkit.attention_with_kvcache(q, pages, pages, block_table=table, backend="triton_cuda")
    bad = table.clone()
    bad[1, 2] = 9
    with pytest.raises(InvalidArgumentError, match="outside"):
        attnkit.attention_with_kvcache(q, pages, pages, block_table=bad, backend="triton_cuda")


@pytest.mark.parametrize("seqlens", [(1, 37), (37, 1), (1, 1), (37, 2)], ids=["sq1", "sk1", "both1", "none"])
def test_a_length_of_one_takes_the_unspecialised_kernels(seqlens, monkeypatch):
    """triton 3.6 miscompiled a forward tile whose seqlen_k of 1 it had specialised into a constant (an illegal
    shared-memory address on the H200): a call with a length of 1 launches the copies of attn_fwd, attn_bwd_dkdv and
    attn_bwd_dq that keep the lengths runtime values, every other call the kernels themselves; both give the
    reference's answer and gradients (head dims 48/32, the fault's)."""
    from attnkit.backends.triton import bwd_kernel, fwd_kernel, launch, probes

    from attnkit.params import AttentionParams
    from attnkit.testing import attention_naive

    used = []

    class Recorder:
        def __init__(self, name, kernel):
            self.name, self.kernel, self.fn = name, kernel, kernel.fn

        def __getitem__(self, grid):
            used.append(self.name)
            return self.kernel[grid]

    for module, name in ((fwd_kernel, "attn_fwd"), (bwd_kernel, "attn_bwd_dkdv"), (bwd_kernel, "attn_bwd_dq")):
        monkeypatch.setattr(launch, name, Recorder(name, getattr(module, name)))
        one = f"{name}_length_one"
        monkeypatch.setattr(launch, one, Recorder(one, getattr(module, one)))
    monkeypatch.setenv("ATTNKIT_HOST_FASTPATH", "0")
    sq, sk = seqlens
    gen = torch.Generator().manual_seed(sq * 100 + sk)
    q = torch.randn(1, sq, 4, 48, generator=gen)
    k = torch.randn(1, sk, 2, 48, generator=gen)
    v = torch.randn(1, sk, 2, 32, generator=gen)
    dout = torch.randn(1, sq, 4, 32, generator=gen)
    params = AttentionParams(softmax_scale=0.2)
    out, lse = launch.forward(q, k, v, None, params, None, "nvidia")
    grads = launch.backward(dout, q, k, v, out, lse, None, params, None, "nvidia")
    suffix = "_length_one" if 1 in seqlens else ""
    assert used == [f"attn_fwd{suffix}", f"attn_bwd_dkdv{suffix}", f"attn_bwd_dq{suffix}"]
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = attention_naive(*leaves, softmax_scale=0.2, return_lse=True)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)
    for got, want in zip(grads, torch.autograd.grad(ref, leaves, dout.double())):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    if not probes.kernels_interpreted():
        for kernel in (fwd_kernel.attn_fwd_length_one, bwd_kernel.attn_bwd_dkdv_length_one,
                       bwd_kernel.attn_bwd_dq_length_one):  # fmt: skip
            assert {"seqlen_q", "seqlen_k"} <= set(kernel.do_not_specialize)
