"""torch.compile and torch.library checks of the custom ops (fake implementations, autograd registration)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import assert_close, cu_seqlens, qkv, rand

import attnkit
from attnkit.ops import _library  # noqa: F401  (registers torch.ops.attnkit.*)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Discover and load backends outside the compiled region (test_compile_first_call_in_fresh_process covers the
    # cold path).
    attnkit.list_backends()
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _fwd_bwd(fn, *inputs):
    out = fn(*inputs)
    grads = torch.autograd.grad(out.square().sum(), inputs)
    return out, grads


@pytest.mark.parametrize(
    "kw",
    [dict(causal=True), dict(window_size=(3, 1), softcap=2.0), dict(alibi=True)],
    ids=["causal", "window_softcap", "alibi"],
)
def test_compile_attention_matches_eager(kw):
    kw = dict(kw)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.rand(4)

    def fn(q, k, v):
        return attnkit.attention(q, k, v, backend="reference", **kw) * 2.0

    q, k, v = qkv(2, 13, 17, 4, 2, 8, dtype=torch.float32, requires_grad=True)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out_c, grads_c = _fwd_bwd(compiled, q, k, v)
    out_e, grads_e = _fwd_bwd(fn, q, k, v)
    assert_close(out_c, out_e, atol=1e-6, rtol=1e-6)
    for a, b in zip(grads_c, grads_e):
        assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_compile_lse_and_varlen():
    """Varlen validation reads cu_seqlens values (data-dependent), so it graph-breaks: no fullgraph here."""

    def fn(q, k, v, cq, ck):
        out, lse = attnkit.attention_varlen(q, k, v, cq, ck, 9, 11, causal=True, return_lse=True, backend="reference")
        return out.sum(-1) + lse.t()

    lens_q, lens_k = [4, 9], [11, 6]
    q = rand(13, 2, 4, dtype=torch.float32, requires_grad=True)
    k = rand(17, 1, 4, dtype=torch.float32, requires_grad=True, seed=1)
    v = rand(17, 1, 4, dtype=torch.float32, requires_grad=True, seed=2)
    cq, ck = cu_seqlens(lens_q), cu_seqlens(lens_k)
    compiled = torch.compile(fn, backend="aot_eager")
    out_c = compiled(q, k, v, cq, ck)
    out_e = fn(q, k, v, cq, ck)
    assert_close(out_c, out_e, atol=1e-6, rtol=1e-6)
    g_c = torch.autograd.grad(out_c.sum(), (q, k, v))
    g_e = torch.autograd.grad(out_e.sum(), (q, k, v))
    for a, b in zip(g_c, g_e):
        assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_compile_piecewise():
    def fn(q1, k1, q2, k2, v):
        return attnkit.piecewise_attention(q1, k1, q2, k2, v, 4, causal=True, backend="reference")

    q1, k1, v = qkv(1, 9, 9, 2, 1, 4, dtype=torch.float32, requires_grad=True)
    q2, k2, _ = qkv(1, 9, 9, 2, 1, 4, dtype=torch.float32, requires_grad=True, seed=5)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out_c, g_c = _fwd_bwd(compiled, q1, k1, q2, k2, v)
    out_e, g_e = _fwd_bwd(fn, q1, k1, q2, k2, v)
    assert_close(out_c, out_e, atol=1e-6, rtol=1e-6)
    for a, b in zip(g_c, g_e):
        assert_close(a, b, atol=1e-5, rtol=1e-5)


def _forward_args(q, k, v, *, varlen=None, alibi=None, dropout_p=0.0):
    cq, ck, mq, mk = varlen if varlen else (None, None, q.shape[-3], k.shape[-3])
    return (q, k, v, cq, ck, mq, mk, alibi, q.shape[-1] ** -0.5, True, -1, 0, 0.0, dropout_p, 1234, False, "reference")


def test_opcheck_attention_forward():
    q, k, v = qkv(1, 5, 6, 2, 1, 4, dtype=torch.float32, requires_grad=True)
    torch.library.opcheck(torch.ops.attnkit.attention_forward.default, _forward_args(q, k, v, alibi=torch.rand(2)))
    # dropout: the seed is an argument, so the op stays a pure function
    torch.library.opcheck(torch.ops.attnkit.attention_forward.default, _forward_args(q, k, v, dropout_p=0.25))


def test_opcheck_attention_forward_varlen():
    q = rand(7, 2, 4, dtype=torch.float32, requires_grad=True)
    k = rand(9, 2, 4, dtype=torch.float32, requires_grad=True, seed=1)
    v = rand(9, 2, 4, dtype=torch.float32, requires_grad=True, seed=2)
    args = _forward_args(q, k, v, varlen=(cu_seqlens([3, 4]), cu_seqlens([5, 4]), 4, 5))
    torch.library.opcheck(torch.ops.attnkit.attention_forward.default, args)


def test_opcheck_kvcache_forward():
    q = rand(2, 1, 2, 4, dtype=torch.float32)
    k_cache = rand(2, 8, 1, 4, dtype=torch.float32, seed=1)
    v_cache = rand(2, 8, 1, 4, dtype=torch.float32, seed=2)
    lens = torch.tensor([3, 8], dtype=torch.int32)
    args = (q, k_cache, v_cache, lens, None, None, None, None, 0.5, True, -1, 0, 0.0, 0, "reference")
    torch.library.opcheck(torch.ops.attnkit.kvcache_forward.default, args)


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

    q, k, v = qkv(1, 7, 9, 2, 1, 4, dtype=torch.float32, requires_grad=True)
    out_c, _g_c = _fwd_bwd(torch.compile(fn, backend="aot_eager", fullgraph=True), q, k, v)
    out_e, _g_e = _fwd_bwd(fn, q, k, v)
    assert_close(out_c, out_e, atol=1e-6, rtol=1e-6)


def test_compile_bakes_dispatch_until_reset(monkeypatch):
    from attnkit.backends.reference import ReferenceBackend

    calls = []

    class Counting(ReferenceBackend):
        name = "counting_ref"
        priority = -1

        def forward(self, *args):
            calls.append(1)
            return super().forward(*args)

    attnkit.register_backend("counting_ref", Counting)
    try:
        attnkit.list_backends()

        def fn(q):
            return attnkit.attention(q, q, q, causal=True)

        compiled = torch.compile(fn, backend="aot_eager")
        q = rand(1, 5, 2, 4, dtype=torch.float32)
        compiled(q)
        assert calls == []
        monkeypatch.setenv("ATTNKIT_BACKEND", "counting_ref")
        # Inside torch.compile the dispatch decision is made while tracing and baked into the graph (documented
        # in docs/dispatch.md); eager calls see the new value at once, compiled code after a reset. The two
        # backends (the compiled one is auto's CPU choice) agree to float32 rounding.
        assert_close(fn(q), compiled(q), atol=1e-6, rtol=1e-5)
        assert len(calls) == 1
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend="aot_eager")
        assert_close(compiled(q), fn(q))
        assert len(calls) == 3
    finally:
        attnkit.registry.REGISTRY.unregister("counting_ref")
