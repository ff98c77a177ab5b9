"""torch.compile and torch.library checks of the attnkit ops (CPU, reference backend).

* inductor, the default backend: every public operator under ``fullgraph=True`` with ``dynamic=False`` and
  ``dynamic=True``, forward and backward; compiled outputs and gradients equal eager, Dynamo sees one graph and no
  break (``torch._dynamo.explain``), and with ``dynamic=True`` new lengths run without a recompile (under
  ``torch.compiler.set_stance("fail_on_recompile")``). An inductor compile takes seconds on a 2-core CI machine
  (most of it compiling C++ kernels), so each test compiles once and only the attention block adds ops of its own
  around the attention call.
  tests/triton/test_triton_compile.py repeats the core of this on the Triton interpreter, tests/test_compile_gpu.py
  on a GPU (triton_cuda, cupy_cuda, CUDA graphs).
* aot_eager (cheap): options, dispatch and errors under compile.
* ``torch.library.opcheck`` on every op (schema, autograd registration, fake tensors, aot dispatch static and
  dynamic), with strided inputs: a fake kernel whose strides differ from the real outputs' fails.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
from typing import ClassVar

import pytest
import torch
from attnkit.backends.reference import ReferenceBackend
from helpers import assert_close, cu_seqlens, qkv, rand

import attnkit
from attnkit import dispatch
from attnkit.ops import _library
from attnkit.testing import attention_naive

F32, I32 = torch.float32, torch.int32
OPS = torch.ops.attnkit
ALL_CHECKS = (
    "test_schema",
    "test_autograd_registration",
    "test_faketensor",
    "test_aot_dispatch_static",
    "test_aot_dispatch_dynamic",
)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Backends are loaded at import; list_backends() also discovers entry points outside the compiled region
    # (test_compile_first_call_in_fresh_process covers the cold path).
    attnkit.list_backends()
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(fn, *, dynamic: bool, backend: str = "inductor"):
    return torch.compile(fn, backend=backend, fullgraph=True, dynamic=dynamic)


def _no_recompile(n: int):
    """After the first call (n == 0), any recompilation raises (a new length must reuse the graph)."""
    return torch.compiler.set_stance("fail_on_recompile") if n else contextlib.nullcontext()


def _assert_one_graph(fn, *args):
    explanation = torch._dynamo.explain(fn)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    torch._dynamo.reset()


def _grads(out: torch.Tensor, wrt) -> tuple[torch.Tensor, ...]:
    # A fixed, non-uniform upstream gradient: dout must not be a constant for the check to mean anything.
    weight = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype).view(out.shape)
    return torch.autograd.grad((out * weight).sum(), wrt)


def _assert_same(compiled_result, eager_result, atol=2e-5, rtol=1e-4):
    (out_c, grads_c), (out_e, grads_e) = compiled_result, eager_result
    assert_close(out_c, out_e, atol=atol, rtol=rtol)
    for gc, ge in zip(grads_c, grads_e):
        assert gc.shape == ge.shape
        assert_close(gc, ge, atol=atol, rtol=rtol)


# ---- inductor -------------------------------------------------------------------------------------------------


class _AttentionBlock(torch.nn.Module):
    """A transformer layer's attention: one fused q/k/v projection, GQA causal attention, an output projection.

    q, k and v are strided views of the projection (as in most models), so the op sees non-contiguous inputs."""

    def __init__(self, hq: int = 4, hk: int = 2, d: int = 16):
        super().__init__()
        self.hq, self.hk, self.d = hq, hk, d
        self.qkv = torch.nn.Linear(hq * d, (hq + 2 * hk) * d)
        self.out = torch.nn.Linear(hq * d, hq * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).split([self.hq * self.d, self.hk * self.d, self.hk * self.d], dim=-1)
        q = q.view(b, s, self.hq, self.d)
        k, v = k.view(b, s, self.hk, self.d), v.view(b, s, self.hk, self.d)
        y = attnkit.attention(q, k, v, causal=True, backend="reference")
        return self.out(y.reshape(b, s, self.hq * self.d))


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_inductor_attention_block(dynamic):
    torch.manual_seed(0)
    block = _AttentionBlock()
    params = tuple(block.parameters())
    lengths = (37, 53) if dynamic else (37,)
    _assert_one_graph(block, rand(2, 37, 64, dtype=F32))
    compiled = _compiled(block, dynamic=dynamic)
    for n, s in enumerate(lengths):
        x = rand(2, s, 64, dtype=F32, requires_grad=True, seed=n)
        with _no_recompile(n):
            out_c = compiled(x)
        out_e = block(x)
        _assert_same((out_c, _grads(out_c, (x, *params))), (out_e, _grads(out_e, (x, *params))))


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_inductor_varlen_like_hugging_face(dynamic):
    """Packed sequences as Hugging Face passes them to flash-attn: cu_seqlens tensors and int max lengths."""

    def fn(qkv_packed, cu, max_len):
        # q, k, v: strided views of one packed projection output, as in most models
        q, k, v = qkv_packed.unbind(1)
        return attnkit.attention_varlen(q, k, v, cu, cu, max_len, max_len, causal=True, backend="reference")

    # len(cu) stays clear of the other sizes (3, 4 heads, 8): duck sizing would tie them together.
    batches = ([5, 12, 7, 2], [9, 3, 20, 6, 1]) if dynamic else ([5, 12, 7, 2],)
    first = [rand(sum(batches[0]), 3, 4, 8, dtype=F32), cu_seqlens(batches[0]), max(batches[0])]
    _assert_one_graph(fn, *first)
    compiled = _compiled(fn, dynamic=dynamic)
    for n, lens in enumerate(batches):
        x = rand(sum(lens), 3, 4, 8, dtype=F32, requires_grad=True, seed=n)
        args = (x, cu_seqlens(lens), max(lens))
        with _no_recompile(n):
            out_c = compiled(*args)
        out_e = fn(*args)
        _assert_same((out_c, _grads(out_c, (x,))), (out_e, _grads(out_e, (x,))))


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_inductor_piecewise(dynamic):
    def fn(q1, k1, q2, k2, v):
        return attnkit.piecewise_attention(q1, k1, q2, k2, v, 4, causal=True, backend="reference")

    lengths = ((19, 23), (29, 41)) if dynamic else ((19, 23),)
    compiled = _compiled(fn, dynamic=dynamic)
    for n, (sq, sk) in enumerate(lengths):
        q1, k1, v = qkv(2, sq, sk, 4, 2, 8, dtype=F32, requires_grad=True, seed=10 * n)
        q2, k2, _ = qkv(2, sq, sk, 4, 2, 8, dtype=F32, requires_grad=True, seed=10 * n + 5)
        inputs = (q1, k1, q2, k2, v)
        if n == 0:
            _assert_one_graph(fn, *inputs)
        with _no_recompile(n):
            out_c = compiled(*inputs)
        out_e = fn(*inputs)
        _assert_same((out_c, _grads(out_c, inputs)), (out_e, _grads(out_e, inputs)))


def _decode_inputs(seed: int, batch: int = 2):
    q = rand(batch, 1, 4, 16, dtype=F32, seed=seed)
    k_new, v_new = rand(batch, 1, 2, 16, dtype=F32, seed=seed + 1), rand(batch, 1, 2, 16, dtype=F32, seed=seed + 2)
    return q, k_new, v_new


def test_inductor_kvcache_decode_static():
    """Decode steps with a cache_seqlens tensor: the in-place append survives compilation (the op declares it) and
    new lengths are new values, not new shapes, so even dynamic=False compiles once."""

    def step(q, k_cache, v_cache, k_new, v_new, lens):
        return attnkit.attention_with_kvcache(
            q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, causal=True, backend="reference"
        )

    k_cache, v_cache = rand(2, 40, 2, 16, dtype=F32, seed=1), rand(2, 40, 2, 16, dtype=F32, seed=2)
    k_eager, v_eager = k_cache.clone(), v_cache.clone()
    _assert_one_graph(step, *_decode_inputs(0)[:1], k_cache.clone(), v_cache.clone(), *_decode_inputs(0)[1:],
                      torch.tensor([3, 7], dtype=I32))  # fmt: skip
    compiled = _compiled(step, dynamic=False)
    for n, lens in enumerate(([3, 7], [4, 8], [5, 30])):
        q, k_new, v_new = _decode_inputs(10 * n)
        lens_t = torch.tensor(lens, dtype=I32)
        with _no_recompile(n):
            out_c = compiled(q, k_cache, v_cache, k_new, v_new, lens_t)
        out_e = step(q, k_eager, v_eager, k_new, v_new, lens_t)
        assert_close(out_c, out_e, atol=1e-6, rtol=1e-6)
        assert torch.equal(k_cache, k_eager) and torch.equal(v_cache, v_eager)
        assert torch.equal(k_cache[1, lens[1]], k_new[1, 0])


def test_inductor_kvcache_paged_dynamic_int_lengths():
    """A paged cache with cache_seqlens as a Python int (one length for the batch) that grows every step: with
    dynamic=True the int is symbolic, so the steps share one compiled graph."""

    def step(q, k_pages, v_pages, k_new, v_new, length, table):
        return attnkit.attention_with_kvcache(
            q, k_pages, v_pages, k_new, v_new, cache_seqlens=length, block_table=table, causal=True,
            backend="reference",
        )  # fmt: skip

    k_pages, v_pages = rand(6, 16, 2, 16, dtype=F32, seed=3), rand(6, 16, 2, 16, dtype=F32, seed=4)
    k_eager, v_eager = k_pages.clone(), v_pages.clone()
    table = torch.tensor([[4, 0, 2], [1, 5, 3]], dtype=I32)
    compiled = _compiled(step, dynamic=True)
    for n, length in enumerate((17, 33, 40)):
        q, k_new, v_new = _decode_inputs(10 * n)
        if n == 0:
            _assert_one_graph(step, q, k_pages.clone(), v_pages.clone(), k_new, v_new, length, table)
        with _no_recompile(n):
            out_c = compiled(q, k_pages, v_pages, k_new, v_new, length, table)
        out_e = step(q, k_eager, v_eager, k_new, v_new, length, table)
        assert_close(out_c, out_e, atol=1e-6, rtol=1e-6)
        assert torch.equal(k_pages, k_eager) and torch.equal(v_pages, v_eager)


class _SeedSpy(ReferenceBackend):
    name = "seed_spy"
    priority = -1
    seeds: ClassVar[list[tuple[str, int]]] = []

    def forward(self, q, k, v, alibi_slopes, params, varlen):
        self.seeds.append(("fwd", params.dropout_seed))
        return super().forward(q, k, v, alibi_slopes, params, varlen)

    def backward(self, dout, q, k, v, out, lse, alibi_slopes, params, varlen):
        self.seeds.append(("bwd", params.dropout_seed))
        return super().backward(dout, q, k, v, out, lse, alibi_slopes, params, varlen)


@pytest.fixture
def seed_spy():
    _SeedSpy.seeds = []
    attnkit.register_backend("seed_spy", _SeedSpy)
    yield _SeedSpy.seeds
    attnkit.registry.REGISTRY.unregister("seed_spy")


def test_inductor_dropout_draws_a_seed_per_run(seed_spy):
    """Dropout under compile: the seed is drawn inside the graph on every run (a Python int would be a graph
    break), backward regenerates the forward's mask, and torch.manual_seed makes runs reproducible."""

    def fn(q, k, v):
        return attnkit.attention(q, k, v, dropout_p=0.3, backend="seed_spy")

    q, k, v = qkv(1, 9, 11, 2, 1, 8, dtype=F32, requires_grad=True)
    compiled = _compiled(fn, dynamic=False)
    torch.manual_seed(7)
    out1 = compiled(q, k, v)
    grads = torch.autograd.grad(out1.sum(), (q, k, v))
    torch.manual_seed(7)
    with _no_recompile(1):
        out2 = compiled(q, k, v)
        out3 = compiled(q, k, v)
    (_, s1), (_, s1b), (_, s2), (_, s3) = seed_spy
    assert [kind for kind, _ in seed_spy] == ["fwd", "bwd", "fwd", "fwd"]
    assert s1 == s1b == s2 != s3 and s1 >= 0
    assert torch.equal(out1, out2) and not torch.equal(out1, out3)
    # The seed the graph drew gives the same mask as the written-out definition, forward and backward.
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    expected = attention_naive(q64, k64, v64, dropout_p=0.3, dropout_seed=s1)
    assert_close(out1, expected, atol=1e-5, rtol=1e-5)
    for g, e in zip(grads, torch.autograd.grad(expected.sum(), (q64, k64, v64))):
        assert_close(g, e, atol=1e-5, rtol=1e-5)


# ---- aot_eager: options, dispatch and errors under compile ----------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [dict(causal=True), dict(window_size=(3, 1), softcap=2.0), dict(alibi=True), dict(causal=True, sink=True)],
    ids=["causal", "window_softcap", "alibi", "sink"],
)
def test_compile_attention_matches_eager(kw):
    kw = dict(kw)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.rand(4)
    sink = rand(4, dtype=F32, seed=9, requires_grad=True) if kw.pop("sink", False) else None

    def fn(q, k, v, sink):
        return attnkit.attention(q, k, v, backend="reference", learnable_sink=sink, **kw) * 2.0

    q, k, v = qkv(2, 13, 17, 4, 2, 8, dtype=F32, requires_grad=True)
    wrt = (q, k, v) if sink is None else (q, k, v, sink)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out_c, out_e = compiled(q, k, v, sink), fn(q, k, v, sink)
    _assert_same((out_c, _grads(out_c, wrt)), (out_e, _grads(out_e, wrt)), atol=1e-6, rtol=1e-6)


def test_compile_lse_and_varlen():
    def fn(q, k, v, cq, ck):
        out, lse = attnkit.attention_varlen(q, k, v, cq, ck, 9, 11, causal=True, return_lse=True, backend="reference")
        return out.sum(-1) + lse.t()

    q = rand(13, 2, 4, dtype=F32, requires_grad=True)
    k = rand(17, 1, 4, dtype=F32, requires_grad=True, seed=1)
    v = rand(17, 1, 4, dtype=F32, requires_grad=True, seed=2)
    cq, ck = cu_seqlens([4, 9]), cu_seqlens([11, 6])
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out_c, out_e = compiled(q, k, v, cq, ck), fn(q, k, v, cq, ck)
    _assert_same((out_c, _grads(out_c, (q, k, v))), (out_e, _grads(out_e, (q, k, v))), atol=1e-6, rtol=1e-6)


def test_compiled_varlen_checks_offsets_on_the_device():
    """Under compile the cu_seqlens values cannot be read on the host: the same rules run as asserts in the graph
    (RuntimeError on the CPU; a device-side assert on a GPU)."""

    def fn(q, cq, ck):
        return attnkit.attention_varlen(q, q, q, cq, ck, 9, 9, backend="reference")

    q = rand(14, 2, 4, dtype=F32)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    good = cu_seqlens([5, 9])
    assert_close(compiled(q, good, good), fn(q, good, good))
    for bad, message in (([1, 5, 14], "start at 0"), ([0, 9, 5], "never decrease"), ([0, 2, 14], "max_seqlen_q")):
        with pytest.raises(RuntimeError, match=message):
            compiled(q, torch.tensor(bad, dtype=I32), good)


def test_compiled_kvcache_refuses_an_aliased_cache():
    """An append into caches that share memory is refused before anything is written, compiled as in eager: the
    op checks k_cache against v_cache (storage addresses, which Dynamo does not trace); torch itself refuses to
    compile an in-place write into a cache whose rows alias (stride 0)."""

    def step(q, k_cache, v_cache, k_new, v_new):
        return attnkit.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=3, backend="reference")

    q, k_new, v_new = rand(2, 1, 2, 4, dtype=F32), rand(2, 1, 1, 4, dtype=F32, seed=1), rand(2, 1, 1, 4, dtype=F32)
    kv = rand(2, 8, 1, 8, dtype=F32, seed=2)
    before = kv.clone()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    with pytest.raises(attnkit.InvalidArgumentError, match="share memory"):
        compiled(q, kv[..., :4], kv[..., 2:6], k_new, v_new)  # overlapping halves of one buffer
    assert torch.equal(kv, before)
    torch._dynamo.reset()
    shared = rand(1, 8, 1, 4, dtype=F32, seed=3).expand(2, 8, 1, 4)  # one row seen twice
    with pytest.raises(RuntimeError, match="single memory location"):
        compiled(q, shared, kv[..., :4].clone(), k_new, v_new)
    k_cache, v_cache = rand(2, 8, 1, 4, dtype=F32, seed=4), rand(2, 8, 1, 4, dtype=F32, seed=5)
    expected = step(q, k_cache.clone(), v_cache.clone(), k_new, v_new)
    assert_close(compiled(q, k_cache, v_cache, k_new, v_new), expected)


def test_compile_first_call_in_fresh_process():
    """The very first attnkit call of a process happening inside torch.compile(fullgraph=True) must trace."""
    code = textwrap.dedent("""
        import torch, attnkit

        def fn(q):
            return attnkit.attention(q, q, q, causal=True)

        q = torch.randn(1, 5, 2, 4, requires_grad=True)
        out = torch.compile(fn, backend="aot_eager", fullgraph=True)(q)
        out.sum().backward()
        assert torch.allclose(out, fn(q))
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_compile_default_backend_fullgraph():
    """backend='auto' (the default) reads the use_backend() context; that must not break fullgraph tracing."""

    def fn(q, k, v):
        return attnkit.attention(q, k, v, causal=True)

    q, k, v = qkv(1, 7, 9, 2, 1, 4, dtype=F32, requires_grad=True)
    with attnkit.use_backend("reference"):
        out_c = torch.compile(fn, backend="aot_eager", fullgraph=True)(q, k, v)
    assert_close(out_c, fn(q, k, v), atol=1e-6, rtol=1e-6)


class _Counting(ReferenceBackend):
    priority = -1
    calls: ClassVar[list[str]] = []

    def forward(self, *args):
        self.calls.append(f"{self.name}.fwd")
        return super().forward(*args)

    def backward(self, *args):
        self.calls.append(f"{self.name}.bwd")
        return super().backward(*args)


class _ShortOnly(_Counting):
    """Eligible for keys up to 40 long: a backend whose limits depend on the sequence length."""

    priority = 50

    def extra_why_not(self, spec):
        return ["too long"] if spec.seqlen_k > 40 else []


@pytest.fixture
def counting():
    _Counting.calls = []
    for name, cls in (("counting_ref", _Counting), ("short_only", _ShortOnly)):
        attnkit.register_backend(name, type(name, (cls,), {"name": name}))
    yield _Counting.calls
    for name in ("counting_ref", "short_only"):
        attnkit.registry.REGISTRY.unregister(name)


def test_compile_bakes_the_request_until_reset(counting, monkeypatch):
    """The request (use_backend, ATTNKIT_BACKEND, ATTNKIT_DISABLE) is read when Dynamo traces the call and baked
    into the graph like other configuration (docs/dispatch.md); eager calls see a change at once."""
    monkeypatch.setenv("ATTNKIT_DISABLE", "short_only")

    def fn(q):
        return attnkit.attention(q, q, q, causal=True)

    compiled = torch.compile(fn, backend="aot_eager")
    q = rand(1, 5, 2, 4, dtype=F32)
    compiled(q)
    assert counting == []
    monkeypatch.setenv("ATTNKIT_BACKEND", "counting_ref")
    # The compiled call still runs auto's CPU choice: the two backends agree to float32 rounding.
    assert_close(fn(q), compiled(q), atol=1e-6, rtol=1e-5)
    assert counting == ["counting_ref.fwd"]
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager")
    assert_close(compiled(q), fn(q), atol=1e-6, rtol=1e-5)
    assert counting == ["counting_ref.fwd"] * 3


def test_compiled_call_chooses_the_backend_per_shape_at_run_time(counting):
    """With dynamic shapes the op decides at run time from the real lengths (once per distinct key), so one graph
    serves lengths that different backends run; forward and backward of a call agree."""

    def fn(q, k, v):
        return attnkit.attention(q, k, v, causal=True)

    compiled = _compiled(fn, dynamic=True, backend="aot_eager")
    for n, (sk, expected) in enumerate(((23, "short_only"), (57, "reference"), (31, "short_only"))):
        q, k, v = qkv(1, 19, sk, 2, 1, 4, dtype=F32, requires_grad=True, seed=sk)
        counting.clear()
        with _no_recompile(n):
            out = compiled(q, k, v)
        out.sum().backward()
        ran = {"short_only": ["short_only.fwd", "short_only.bwd"], "reference": []}[expected]
        assert counting == ran
        assert_close(out, attnkit.attention(q, k, v, causal=True, backend="reference"), atol=1e-6, rtol=1e-6)


def test_backward_runs_on_the_forward_backend(counting):
    """A call's backward runs where its forward ran, even when the use_backend block has ended by then."""
    q, k, v = qkv(1, 7, 9, 2, 1, 4, dtype=F32, requires_grad=True)
    with attnkit.use_backend("counting_ref"):
        out = attnkit.attention(q, k, v, causal=True)
        compiled = torch.compile(lambda *a: attnkit.attention(*a, causal=True), backend="aot_eager", fullgraph=True)
        out_c = compiled(q, k, v)
    out.sum().backward()
    out_c.sum().backward()
    assert counting == ["counting_ref.fwd", "counting_ref.fwd", "counting_ref.bwd", "counting_ref.bwd"]


def test_compile_errors():
    """A bad argument found while tracing raises the eager error (fullgraph=False falls back to eager for the
    frame; fullgraph=True reports Dynamo's error carrying attnkit's message)."""
    q = rand(1, 9, 2, 8, dtype=F32)

    def bad_name(q):
        return attnkit.attention(q, q, q, backend="nonexistent")

    with pytest.raises(attnkit.InvalidArgumentError, match="nonexistent"):
        torch.compile(bad_name, backend="aot_eager")(q)
    with pytest.raises(Exception, match="nonexistent"):
        torch.compile(bad_name, backend="aot_eager", fullgraph=True)(q)

    def bad_heads(q, k):
        return attnkit.attention(q, k, k, backend="reference")

    with pytest.raises(attnkit.InvalidArgumentError, match="multiple"):
        torch.compile(bad_heads, backend="aot_eager")(rand(1, 9, 3, 8, dtype=F32), q)


# ---- torch.library.opcheck ------------------------------------------------------------------------------------


def _strided(*shape, seed, requires_grad=False):
    """A (B, S, H, D) tensor laid out as (B, H, S, D), contiguous only in its last dimension."""
    b, s, h, d = shape
    return rand(b, h, s, d, dtype=F32, seed=seed).transpose(1, 2).requires_grad_(requires_grad)


def _attention_args(q, k, v, *, varlen=None, alibi=None, dropout_p=0.0, backend="reference"):
    """attention_forward's arguments up to learnable_sink (None); dropout_seed_tensor is left to its default."""
    cq, ck, mq, mk = varlen if varlen else (None, None, q.shape[-3], k.shape[-3])
    scale = q.shape[-1] ** -0.5
    return (q, k, v, cq, ck, mq, mk, alibi, scale, True, -1, 0, 0.0, dropout_p, 1234, False, backend, None)


def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=ALL_CHECKS)


@pytest.mark.parametrize("gqa", [False, True])
def test_opcheck_attention(gqa):
    hk = 1 if gqa else 2
    q = _strided(2, 5, 2, 4, seed=0, requires_grad=True)
    k, v = _strided(2, 6, hk, 4, seed=1, requires_grad=True), _strided(2, 6, hk, 4, seed=2, requires_grad=True)
    _opcheck(OPS.attention_forward.default, _attention_args(q, k, v, alibi=torch.rand(2)))
    # dropout: the seed is an argument, so the op stays a pure function
    _opcheck(OPS.attention_forward.default, _attention_args(q, k, v, dropout_p=0.25))
    # a learnable sink (float32 (Hq,)), differentiable like q, k and v
    with_sink = list(_attention_args(q, k, v))
    with_sink[17] = rand(2, dtype=F32, seed=7, requires_grad=True)
    _opcheck(OPS.attention_forward.default, tuple(with_sink))
    # a traced call's request token: the op chooses the backend itself
    _opcheck(OPS.attention_forward.default, _attention_args(q, k, v, backend=dispatch.traced_token("auto", True)))
    with torch.no_grad():
        out, lse = _library.attention_forward(*_attention_args(q, k, v))
    dout = _strided(2, 5, 2, 4, seed=3)
    _opcheck(OPS.attention_backward.default, (dout, q.detach(), k.detach(), v.detach(), out, lse,
                                           *_attention_args(q, k, v)[3:]))  # fmt: skip


def test_opcheck_attention_torch_sdpa():
    """torch_sdpa (auto's CPU choice) returns strided outputs from ATen's kernels: the op hands back contiguous ones,
    as its fake kernel says."""
    q = _strided(2, 5, 2, 4, seed=0, requires_grad=True)
    k, v = _strided(2, 6, 1, 4, seed=1, requires_grad=True), _strided(2, 6, 1, 4, seed=2, requires_grad=True)
    args = _attention_args(q, k, v, backend="torch_sdpa")
    _opcheck(OPS.attention_forward.default, args)
    with torch.no_grad():
        out, lse = _library.attention_forward(*args)
    dout = _strided(2, 5, 2, 4, seed=3)
    _opcheck(OPS.attention_backward.default, (dout, q.detach(), k.detach(), v.detach(), out, lse, *args[3:]))


def test_opcheck_attention_varlen():
    q = rand(2, 7, 4, dtype=F32, requires_grad=True).transpose(0, 1)
    k = rand(2, 9, 4, dtype=F32, seed=1).transpose(0, 1).requires_grad_()
    v = rand(9, 2, 4, dtype=F32, requires_grad=True, seed=2)
    varlen = (cu_seqlens([3, 4]), cu_seqlens([5, 4]), 4, 5)
    args = _attention_args(q, k, v, varlen=varlen)
    _opcheck(OPS.attention_forward.default, args)
    with torch.no_grad():
        out, lse = _library.attention_forward(*args)
    _opcheck(OPS.attention_backward.default, (rand(7, 2, 4, dtype=F32, seed=3), q.detach(), k.detach(), v.detach(),
                                           out, lse, *args[3:]))  # fmt: skip


def test_opcheck_piecewise():
    q1, k1, q2, k2, v = (_strided(1, 6, 2, 4, seed=s, requires_grad=True) for s in range(5))
    args = (q1, k1, q2, k2, v, 2, 0.5, True, "reference")
    _opcheck(OPS.piecewise_forward.default, args)
    with torch.no_grad():
        out, lse = _library.piecewise_forward(*args)
    detached = tuple(x.detach() for x in (q1, k1, q2, k2, v))
    _opcheck(OPS.piecewise_backward.default, (_strided(1, 6, 2, 4, seed=9), *detached, out, lse, 2, 0.5, True,
                                           "reference"))  # fmt: skip


@pytest.mark.parametrize("layout", ["contiguous", "batch_idx", "paged", "no_append", "leftpad"])
def test_opcheck_kvcache(layout):
    """The op appends in place (declared (a!)/(b!)) and attends; opcheck verifies the schema's mutation claims."""
    q = rand(2, 1, 2, 4, dtype=F32)
    k_new, v_new = rand(2, 1, 1, 4, dtype=F32, seed=3), rand(2, 1, 1, 4, dtype=F32, seed=4)
    lens = torch.tensor([3, 7], dtype=I32)
    idx = table = None
    if layout == "paged":
        k_cache, v_cache = rand(4, 16, 1, 4, dtype=F32, seed=1), rand(4, 16, 1, 4, dtype=F32, seed=2)
        table = torch.tensor([[2, 0], [3, 1]], dtype=I32)
    else:
        k_cache, v_cache = rand(3, 8, 1, 4, dtype=F32, seed=1), rand(3, 8, 1, 4, dtype=F32, seed=2)
        if layout == "batch_idx":
            idx = torch.tensor([2, 0], dtype=I32)
        else:
            k_cache, v_cache = k_cache[:2], v_cache[:2]
    if layout == "no_append":
        k_new = v_new = None
    leftpad = torch.tensor([1, 2], dtype=I32) if layout == "leftpad" else None
    args = (q, k_cache, v_cache, k_new, v_new, lens, idx, table, leftpad, None, 0.5, True, -1, 0, 0.0, 0, "reference")
    _opcheck(OPS.kvcache_forward.default, args)


def test_ops_return_the_documented_layout():
    """Every op returns contiguous outputs and gradients whatever its inputs' strides (what the fake kernels
    promise), and the reference backend allocates them so itself (no copy in the op)."""
    q = _strided(2, 5, 2, 4, seed=0, requires_grad=True)
    k, v = _strided(2, 6, 1, 4, seed=1, requires_grad=True), _strided(2, 6, 1, 4, seed=2, requires_grad=True)
    params = attnkit.AttentionParams(softmax_scale=0.5, causal=True, window_right=0)
    backend = attnkit.registry.REGISTRY.get("reference")
    out, lse = backend.forward(q.detach(), k.detach(), v.detach(), None, params, None)
    grads = backend.backward(_strided(2, 5, 2, 4, seed=3), q.detach(), k.detach(), v.detach(), out, lse, None,
                             params, None)  # fmt: skip
    for t in (out, lse, *grads):
        assert t.is_contiguous()
    out = attnkit.attention(q, k, v, causal=True, backend="reference")
    # autograd.grad, not .grad: AccumulateGrad gives .grad its parameter's strides.
    for t in (out, *torch.autograd.grad(out, (q, k, v), _strided(2, 5, 2, 4, seed=3))):
        assert t.is_contiguous()
