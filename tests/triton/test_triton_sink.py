"""Learnable attention sinks through the Triton forward kernel (the backward only sees the sink-including lse),
against float64 with flash-attn's tolerance rule; the CPU runs go through the interpreter, ``-m gpu`` compiles."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.testing import attention_naive, max_abs_error

ATOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 2e-5}


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(b, sq, sk, hq, hk, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, s, h, d, generator=gen) for s, h in ((sq, hq), (sk, hk), (sk, hk)))
    sink = torch.randn(hq, generator=gen) * 2
    dout = torch.randn(b, sq, hq, d, generator=gen)
    dev = _device()
    q, k, v = (x.to(dev, dtype).requires_grad_(True) for x in (q, k, v))
    return q, k, v, sink.to(dev).requires_grad_(True), dout.to(dev, dtype)


def _check(sq, sk, causal, dtype, window=(-1, -1), seed=0, b=2, hq=4, hk=2, d=32):
    q, k, v, sink, dout = _inputs(b, sq, sk, hq, hk, d, dtype, seed)
    kw = dict(causal=causal, window_size=window)
    out, lse = attnkit.attention(q, k, v, learnable_sink=sink, return_lse=True, backend="triton_cuda", **kw)
    grads = torch.autograd.grad(out, (q, k, v, sink), dout)
    exact, exact_lse = attention_naive(q, k, v, learnable_sink=sink, return_lse=True, dtype=torch.float64, **kw)
    exact_grads = torch.autograd.grad(exact, (q, k, v, sink), dout.double())
    plain = attention_naive(q, k, v, learnable_sink=sink, dtype=dtype, **kw)
    plain_grads = torch.autograd.grad(plain, (q, k, v, sink), dout)
    assert max_abs_error(lse, exact_lse) <= 1e-4
    err, allowed = max_abs_error(out, exact), 2 * max_abs_error(plain, exact) + ATOL[dtype]
    assert err <= allowed, f"out: {err} > {allowed}"
    for name, g, e, p in zip("qkvs", grads, exact_grads, plain_grads):
        err, allowed = max_abs_error(g, e), 3 * max_abs_error(p, e) + ATOL[dtype] * max(1.0, e.abs().max().item())
        assert err <= allowed, f"d{name}: {err} > {allowed}"


@pytest.mark.parametrize("sq,sk", [(37, 37), (1, 113), (113, 5)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_sink_dense(sq, sk, dtype):
    _check(sq, sk, causal=True, dtype=dtype, seed=sq)


def test_sink_window_non_causal():
    _check(40, 50, causal=False, dtype=torch.float32, window=(7, 3), seed=4)


def test_sink_varlen_matches_reference():
    lengths_q, lengths_k = [5, 0, 37], [9, 3, 37]
    cq = torch.tensor([0, 5, 5, 42], dtype=torch.int32)
    ck = torch.tensor([0, 9, 12, 49], dtype=torch.int32)
    gen = torch.Generator().manual_seed(5)
    dev = _device()
    q = torch.randn(44, 4, 16, generator=gen).to(dev).requires_grad_(True)  # 2 rows of padding
    k = torch.randn(49, 2, 16, generator=gen).to(dev).requires_grad_(True)
    v = torch.randn(49, 2, 16, generator=gen).to(dev).requires_grad_(True)
    sink = (torch.randn(4, generator=gen) * 2).to(dev).requires_grad_(True)
    dout = torch.randn(44, 4, 16, generator=gen).to(dev)
    args = (q, k, v, cq.to(dev), ck.to(dev), max(lengths_q), max(lengths_k))
    kw = dict(causal=True, learnable_sink=sink, return_lse=True)
    out, lse = attnkit.attention_varlen(*args, backend="triton_cuda", **kw)
    ref, ref_lse = attnkit.attention_varlen(*args, backend="reference", **kw)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-4)
    g = torch.autograd.grad(out, (q, k, v, sink), dout)
    r = torch.autograd.grad(ref, (q, k, v, sink), dout)
    for a, b in zip(g, r):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_sink_gpu_sizes(dtype):
    _check(1024, 1024, causal=True, dtype=dtype, b=2, hq=8, hk=2, d=128, seed=1)
    _check(1, 4096, causal=True, dtype=dtype, b=4, hq=8, hk=8, d=64, seed=2)
