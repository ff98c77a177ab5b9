"""triton_cuda under torch.compile (inductor, fullgraph) and torch.library.opcheck, on the Triton interpreter.

Tiny shapes: the interpreter runs every program in Python, and each test compiles once (tests/test_compile.py
explains the budget). The GPU twin is tests/test_compile_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.ops import _library

F32, I32 = torch.float32, torch.int32
BACKEND = "triton_cuda"
ALL_CHECKS = (
    "test_schema",
    "test_autograd_registration",
    "test_faketensor",
    "test_aot_dispatch_static",
    "test_aot_dispatch_dynamic",
)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    attnkit.list_backends()
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _rand(*shape, seed, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=F32).requires_grad_(requires_grad)


def _strided(b, s, h, d, *, seed, requires_grad=False):
    """(B, S, H, D) stored as (B, H, S, D): contiguous only in the head dimension."""
    return _rand(b, h, s, d, seed=seed).transpose(1, 2).requires_grad_(requires_grad)


def _fwd_bwd(fn, inputs):
    out = fn(*inputs)
    weight = torch.linspace(-1.0, 1.0, out.numel()).view(out.shape)
    return out, torch.autograd.grad((out * weight).sum(), inputs)


def test_inductor_attention_dynamic_lengths():
    """Forward and backward through inductor with dynamic shapes: two lengths, one graph, equal to eager."""

    def fn(q, k, v):
        return attnkit.attention(q, k, v, causal=True, backend=BACKEND)

    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for n, (sq, sk) in enumerate(((7, 9), (13, 11))):
        q = _strided(1, sq, 2, 16, seed=n, requires_grad=True)
        k, v = _strided(1, sk, 1, 16, seed=n + 1, requires_grad=True), _rand(1, sk, 1, 16, seed=n + 2)
        v.requires_grad_()
        stance = torch.compiler.set_stance("fail_on_recompile") if n else torch.compiler.set_stance("default")
        with stance:
            out_c, grads_c = _fwd_bwd(compiled, (q, k, v))
        out_e, grads_e = _fwd_bwd(fn, (q, k, v))
        torch.testing.assert_close(out_c, out_e, atol=1e-6, rtol=1e-5)
        for a, b in zip(grads_c, grads_e):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_inductor_kvcache_decode():
    def step(q, k_cache, v_cache, k_new, v_new, lens):
        return attnkit.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, backend=BACKEND)

    k_cache, v_cache = _rand(2, 32, 1, 16, seed=1), _rand(2, 32, 1, 16, seed=2)
    k_eager, v_eager = k_cache.clone(), v_cache.clone()
    compiled = torch.compile(step, fullgraph=True)
    for n, lens in enumerate(([3, 9], [4, 10])):
        q, k_new, v_new = _rand(2, 1, 2, 16, seed=10 + n), _rand(2, 1, 1, 16, seed=20 + n), _rand(2, 1, 1, 16, seed=n)
        lens_t = torch.tensor(lens, dtype=I32)
        out_c = compiled(q, k_cache, v_cache, k_new, v_new, lens_t)
        out_e = step(q, k_eager, v_eager, k_new, v_new, lens_t)
        torch.testing.assert_close(out_c, out_e, atol=1e-6, rtol=1e-5)
        assert torch.equal(k_cache, k_eager) and torch.equal(v_cache, v_eager)


def test_opcheck_attention_and_kvcache():
    """The fakes give exactly the strides the Triton kernels allocate (strided inputs, dense and varlen)."""
    q = _strided(1, 5, 2, 16, seed=0, requires_grad=True)
    k, v = _strided(1, 6, 1, 16, seed=1, requires_grad=True), _strided(1, 6, 1, 16, seed=2, requires_grad=True)
    args = (q, k, v, None, None, 5, 6, None, 0.25, True, -1, 0, 0.0, 0.0, 0, False, BACKEND, None)
    torch.library.opcheck(torch.ops.attnkit.attention_forward.default, args, test_utils=ALL_CHECKS)
    with torch.no_grad():
        out, lse = _library.attention_forward(*args)
    dout = _strided(1, 5, 2, 16, seed=3)
    back = (dout, q.detach(), k.detach(), v.detach(), out, lse, *args[3:])
    torch.library.opcheck(torch.ops.attnkit.attention_backward.default, back, test_utils=ALL_CHECKS)

    qv, kv_ = q.detach()[0], k.detach()[0]
    cu_q, cu_k = torch.tensor([0, 2, 5], dtype=I32), torch.tensor([0, 4, 6], dtype=I32)
    varlen = (qv, kv_, kv_.clone(), cu_q, cu_k, 3, 4, None, 0.25, False, -1, -1, 0.0, 0.0, 0, False, BACKEND, None)
    torch.library.opcheck(torch.ops.attnkit.attention_forward.default, varlen, test_utils=ALL_CHECKS)

    kc, vc = _rand(2, 16, 1, 16, seed=4), _rand(2, 16, 1, 16, seed=5)
    lens = torch.tensor([3, 9], dtype=I32)
    kv_args = (_rand(2, 1, 2, 16, seed=6), kc, vc, _rand(2, 1, 1, 16, seed=7), _rand(2, 1, 1, 16, seed=8), lens,
               None, None, None, None, 0.25, False, -1, -1, 0.0, 0, BACKEND)  # fmt: skip
    torch.library.opcheck(torch.ops.attnkit.kvcache_forward.default, kv_args, test_utils=ALL_CHECKS)


def test_kernels_allocate_the_documented_layout():
    """The backend itself returns contiguous outputs and gradients for strided inputs (the op copies nothing)."""
    from attnkit.params import AttentionParams
    from attnkit.registry import REGISTRY

    backend = REGISTRY.get(BACKEND)
    q = _strided(1, 5, 2, 16, seed=0)
    k, v = _strided(1, 6, 1, 16, seed=1), _strided(1, 6, 1, 16, seed=2)
    params = AttentionParams(softmax_scale=0.25, causal=True, window_right=0)
    out, lse = backend.forward(q, k, v, None, params, None)
    grads = backend.backward(_strided(1, 5, 2, 16, seed=3), q, k, v, out, lse, None, params, None)
    for t in (out, lse, *grads):
        assert t.is_contiguous()


# ---- fp8 (forward only) ---------------------------------------------------------------------------------------

# torch's test_schema cannot compare float8 arguments on the CPU (tests/test_fp8_compile.py pins it and checks
# the schema's claims by hand); the other checks run.
FP8_CHECKS = tuple(c for c in ALL_CHECKS if c != "test_schema")


def _fp8(b, s, h, d, hk, *, seed):
    from attnkit import fp8

    return fp8.quantize(_rand(b, s, h, d, seed=seed), hk)


def test_inductor_fp8_attention_and_kvcache():
    """The fp8 kernels (dense forward, split-KV decoding over an fp8 cache) through inductor, fullgraph."""

    def fn(q, k, v, qd, kd, vd):
        return attnkit.attention(q, k, v, causal=True, q_descale=qd, k_descale=kd, v_descale=vd, backend=BACKEND)

    (q, qd), (k, kd), (v, vd) = _fp8(1, 7, 2, 16, 1, seed=0), _fp8(1, 9, 1, 16, 1, seed=1), _fp8(1, 9, 1, 16, 1, seed=2)
    out_c = torch.compile(fn, fullgraph=True)(q, k, v, qd, kd, vd)
    torch.testing.assert_close(out_c, fn(q, k, v, qd, kd, vd), atol=0, rtol=0)

    def step(q, k_cache, v_cache, k_new, v_new, lens):
        return attnkit.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, backend=BACKEND)

    k_cache, v_cache = _fp8(2, 32, 1, 16, 1, seed=3)[0], _fp8(2, 32, 1, 16, 1, seed=4)[0]
    k_eager, v_eager = k_cache.clone(), v_cache.clone()
    q, k_new, v_new = _fp8(2, 1, 2, 16, 1, seed=5)[0], _fp8(2, 1, 1, 16, 1, seed=6)[0], _fp8(2, 1, 1, 16, 1, seed=7)[0]
    lens = torch.tensor([3, 9], dtype=I32)
    out_c = torch.compile(step, fullgraph=True)(q, k_cache, v_cache, k_new, v_new, lens)
    out_e = step(q, k_eager, v_eager, k_new, v_new, lens)
    assert out_c.dtype == torch.bfloat16
    torch.testing.assert_close(out_c, out_e, atol=0, rtol=0)
    assert torch.equal(k_cache.view(torch.uint8), k_eager.view(torch.uint8))


def test_opcheck_fp8_ops():
    """The fp8 fakes give exactly what the Triton fp8 kernels allocate (strided inputs, out_dtype, lse float32)."""
    (q, qd), (k, kd), (v, vd) = _fp8(1, 5, 2, 16, 1, seed=0), _fp8(1, 6, 1, 16, 1, seed=1), _fp8(1, 6, 1, 16, 1, seed=2)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    args = (q, k, v, qd, kd, vd, None, None, 5, 6, None, torch.float32, 0.25, True, -1, 0, 0.0, 0.0, 0, False, BACKEND)
    torch.library.opcheck(torch.ops.attnkit.fp8_attention_forward.default, args, test_utils=FP8_CHECKS)
    kc, vc = _fp8(2, 16, 1, 16, 1, seed=4)[0], _fp8(2, 16, 1, 16, 1, seed=5)[0]
    q8, k_new, v_new = (_fp8(2, 1, h, 16, 1, seed=s)[0] for h, s in ((2, 6), (1, 7), (1, 8)))
    kv_args = (q8, kc, vc, k_new, v_new,
               torch.ones(2, 1), torch.ones(2, 1), torch.ones(2, 1), torch.tensor([3, 9], dtype=I32), None, None,
               None, None, torch.bfloat16, 0.25, False, -1, -1, 0.0, 0, BACKEND)  # fmt: skip
    torch.library.opcheck(torch.ops.attnkit.fp8_kvcache_forward.default, kv_args, test_utils=FP8_CHECKS)
