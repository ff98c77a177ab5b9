"""torch.compile with inductor on a GPU: triton_cuda and cupy_cuda, and CUDA graphs for a decode step.

Run on a CUDA machine: ``pytest -m gpu tests/test_compile_gpu.py``. The CPU twins (reference backend, Triton
interpreter) are tests/test_compile.py and tests/triton/test_triton_compile.py.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import attnkit

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BF16, I32 = torch.bfloat16, torch.int32
BACKENDS = ["triton_cuda", "cupy_cuda"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    attnkit.list_backends()
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _available(name: str) -> None:
    why = attnkit.registry.REGISTRY.get(name).unavailable_reason()
    if why:
        pytest.skip(f"{name}: {why}")


def _no_recompile(n: int):
    return torch.compiler.set_stance("fail_on_recompile") if n else contextlib.nullcontext()


def _rand(*shape, seed, dtype=BF16):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=gen, device="cuda", dtype=dtype)


class _Block(torch.nn.Module):
    """Two linears around GQA causal attention, q/k/v strided views of the fused projection."""

    def __init__(self, backend: str, hq: int = 8, hk: int = 2, d: int = 64):
        super().__init__()
        self.backend, self.hq, self.hk, self.d = backend, hq, hk, d
        self.qkv = torch.nn.Linear(hq * d, (hq + 2 * hk) * d, device="cuda", dtype=BF16)
        self.out = torch.nn.Linear(hq * d, hq * d, device="cuda", dtype=BF16)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).split([self.hq * self.d, self.hk * self.d, self.hk * self.d], dim=-1)
        y = attnkit.attention(
            q.view(b, s, self.hq, self.d), k.view(b, s, self.hk, self.d), v.view(b, s, self.hk, self.d),
            causal=True, backend=self.backend,
        )  # fmt: skip
        return self.out(y.reshape(b, s, -1))


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_block_fullgraph(backend, dynamic):
    """The issue's repro: a two-linear block compiled with fullgraph=True, forward and backward; with dynamic=True
    two lengths share one graph. Compiled and eager agree to bf16 rounding of the linears."""
    _available(backend)
    torch.manual_seed(0)
    block = _Block(backend)
    explanation = torch._dynamo.explain(block)(_rand(2, 256, 512, seed=0))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, dynamic=dynamic)
    for n, s in enumerate((256, 384) if dynamic else (256,)):
        x = _rand(2, s, 512, seed=n).requires_grad_()
        with _no_recompile(n):
            out_c = compiled(x)
        out_e = block(x)
        dout = _rand(*out_e.shape, seed=100 + n)
        grads_c = torch.autograd.grad(out_c, (x, *block.parameters()), dout)
        grads_e = torch.autograd.grad(out_e, (x, *block.parameters()), dout)
        torch.testing.assert_close(out_c, out_e, atol=2e-2, rtol=2e-2)
        for a, b in zip(grads_c, grads_e):
            torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_and_varlen_exact_under_compile(backend):
    """With nothing but the op in the graph, compiled and eager run the same kernels on the same inputs: equal
    outputs and gradients (dynamic lengths, dense and varlen). cupy_cuda accumulates dQ with float atomics, so its
    gradients may differ in the last bit."""
    _available(backend)
    grad_tol = dict(atol=0, rtol=0) if backend == "triton_cuda" else dict(atol=1e-3, rtol=1.6e-2)

    def dense(q, k, v):
        return attnkit.attention(q, k, v, causal=True, backend=backend)

    def varlen(q, k, v, cu, max_len):
        return attnkit.attention_varlen(q, k, v, cu, cu, max_len, max_len, causal=True, backend=backend)

    compiled_dense = torch.compile(dense, fullgraph=True, dynamic=True)
    compiled_varlen = torch.compile(varlen, fullgraph=True, dynamic=True)
    # len(cu) differs from every other size (16 and 4 heads, 128): duck sizing would tie them and recompile.
    for n, lens in enumerate(([300, 77, 1024, 9], [5, 900, 64, 333, 17, 2])):
        s = max(lens)
        q, k, v = (_rand(2, s, h, 128, seed=10 * n + i).requires_grad_() for i, h in enumerate((16, 4, 4)))
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=I32, device="cuda")
        qp, kp, vp = (_rand(sum(lens), h, 128, seed=20 * n + i).requires_grad_() for i, h in enumerate((16, 4, 4)))
        for fn, compiled, args in ((dense, compiled_dense, (q, k, v)), (varlen, compiled_varlen, (qp, kp, vp, cu, s))):
            with _no_recompile(n):
                out_c = compiled(*args)
            out_e = fn(*args)
            dout = _rand(*out_e.shape, seed=7)
            torch.testing.assert_close(out_c, out_e, atol=0, rtol=0)
            for a, b in zip(torch.autograd.grad(out_c, args[:3], dout), torch.autograd.grad(out_e, args[:3], dout)):
                torch.testing.assert_close(a, b, **grad_tol)


class _Decoder(torch.nn.Module):
    """One decode step against a KV cache held as buffers (static addresses, as CUDA graphs need)."""

    def __init__(self, batch=4, capacity=4096, hk=8, d=128):
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(batch, capacity, hk, d, device="cuda", dtype=BF16))
        self.register_buffer("v_cache", torch.zeros(batch, capacity, hk, d, device="cuda", dtype=BF16))

    def forward(self, q, k_new, v_new, lens):
        return attnkit.attention_with_kvcache(
            q, self.k_cache, self.v_cache, k_new, v_new, cache_seqlens=lens, causal=True, backend="triton_cuda"
        )


def test_kvcache_decode_reduce_overhead():
    """mode="reduce-overhead": the decode step (checks, append, attention) runs as a CUDA graph replay; the cache
    writes land in the module's buffers exactly as in eager, step after step."""
    _available("triton_cuda")
    from torch._dynamo.utils import counters

    counters.clear()
    eager, graphed = _Decoder(), _Decoder()
    prefix = _rand(4, 1000, 8, 128, seed=1)
    for m in (eager, graphed):
        m.k_cache[:, :1000].copy_(prefix)
        m.v_cache[:, :1000].copy_(prefix.flip(-1))
    compiled = torch.compile(graphed, mode="reduce-overhead", fullgraph=True)
    lens = torch.tensor([1000, 998, 1000, 990], dtype=I32, device="cuda")
    with torch.no_grad():
        for step in range(6):
            q, k_new, v_new = (_rand(4, 1, h, 128, seed=10 * step + i) for i, h in enumerate((32, 8, 8)))
            out_c = compiled(q, k_new, v_new, lens).clone()  # replays reuse the output buffer
            out_e = eager(q, k_new, v_new, lens)
            # Same kernels, but a captured call may split the keys differently: rounding-level differences only.
            torch.testing.assert_close(out_c, out_e, atol=1e-2, rtol=1e-2)
            lens += 1
    torch.cuda.synchronize()
    assert torch.equal(graphed.k_cache, eager.k_cache) and torch.equal(graphed.v_cache, eager.v_cache)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


def _fp8_capable() -> None:
    _available("triton_cuda")
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("fp8 needs compute capability >= 9.0")


def test_fp8_attention_and_decode_under_compile():
    """fp8 (e4m3 with descales) through inductor, fullgraph, on the Hopper fp8 kernel: dynamic lengths without a
    recompile, outputs equal to eager; an fp8 KV-cache decode step under mode="reduce-overhead" (CUDA graphs)
    writes the fp8 cache exactly as eager does."""
    _fp8_capable()
    from attnkit import fp8

    def dense(q, k, v, qd, kd, vd):
        return attnkit.attention(q, k, v, causal=True, q_descale=qd, k_descale=kd, v_descale=vd, backend="triton_cuda")

    compiled = torch.compile(dense, fullgraph=True, dynamic=True)
    # Unequal lengths from the first call: equal ones would let duck sizing tie k's length to q's in the graph.
    for n, (sq, sk) in enumerate(((1000, 1200), (333, 2049))):
        (q, qd), (k, kd), (v, vd) = (fp8.quantize(_rand(2, s, h, 128, seed=10 * n + i, dtype=torch.float32), 4)
                                     for i, (s, h) in enumerate(((sq, 16), (sk, 4), (sk, 4))))  # fmt: skip
        with _no_recompile(n):
            out_c = compiled(q, k, v, qd, kd, vd)
        torch.testing.assert_close(out_c, dense(q, k, v, qd, kd, vd), atol=0, rtol=0)

    e4m3 = torch.float8_e4m3fn
    caches = [(_rand(4, 2048, 8, 128, seed=1) * 0.5).to(e4m3) for _ in range(2)]
    eager = [c.clone() for c in caches]
    ones = torch.ones(4, 8, device="cuda")

    def step(q, k_cache, v_cache, k_new, v_new, lens):
        return attnkit.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, causal=True,
                                              q_descale=ones, k_descale=ones * 0.5, v_descale=ones,
                                              backend="triton_cuda")  # fmt: skip

    graphed = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    lens = torch.tensor([1000, 998, 1000, 990], dtype=I32, device="cuda")
    with torch.no_grad():
        for n in range(4):
            q, k_new, v_new = (_rand(4, 1, h, 128, seed=50 + 10 * n + i).to(e4m3) for i, h in enumerate((32, 8, 8)))
            out_c = graphed(q, *caches, k_new, v_new, lens).clone()
            out_e = step(q, *eager, k_new, v_new, lens)
            torch.testing.assert_close(out_c, out_e, atol=1e-2, rtol=1e-2)
            lens += 1
    torch.cuda.synchronize()
    for c, e in zip(caches, eager):
        assert torch.equal(c.view(torch.uint8), e.view(torch.uint8))
