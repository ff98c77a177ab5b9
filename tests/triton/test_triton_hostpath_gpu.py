"""The host fast path on a real GPU: repeated eager calls through the frontend's bound forward and decode step
(Backend.forward_runner / kvcache_runner), launched through the driver (direct_launch), give exactly what the
general path gives (ATTNKIT_HOST_FASTPATH=0: the op, the JIT, triton's launcher), call after call, with fresh
tensors of the same layouts; the tensor-length check runs as one kernel."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.ops import _fastcall

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture
def driver_launches(monkeypatch):
    """Counts the launches that go through the driver directly (none where direct launches are off)."""
    from attnkit.backends.triton import direct_launch

    calls = []
    driver = direct_launch.cuda_driver()
    if driver is not None:
        real = driver.launch

        def counted(*args):
            calls.append(args[0])
            return real(*args)

        monkeypatch.setattr(driver, "launch", counted)
    return calls


def _general_path(monkeypatch, fn, *args, **kwargs):
    monkeypatch.setenv("ATTNKIT_HOST_FASTPATH", "0")
    try:
        return fn(*args, **kwargs)
    finally:
        monkeypatch.delenv("ATTNKIT_HOST_FASTPATH")


@pytest.mark.parametrize("shape", [(2, 300, 8, 2, 64, True), (1, 128, 8, 8, 128, False), (3, 37, 4, 4, 80, True)],
                         ids=["gqa-causal-d64", "d128", "d80-causal"])  # fmt: skip
@pytest.mark.parametrize("return_lse", [False, True], ids=["out", "lse"])
def test_repeated_forward_equals_the_general_path(shape, return_lse, monkeypatch, driver_launches):
    from attnkit.backends.triton import direct_launch

    b, s, hq, hk, d, causal = shape
    # Default tiles: the autotuner may pick a TMA tile for d64 (near ties in its timing), and a TMA tile's global
    # scratch keeps triton's launcher, so the launch count below would depend on a timing race.
    monkeypatch.setenv("ATTNKIT_TRITON_AUTOTUNE", "0")
    _fastcall.clear()
    gen = torch.Generator(device="cuda").manual_seed(0)
    for step in range(4):
        q = torch.randn(b, s, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        k, v = (torch.randn(b, s, hk, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
        with torch.no_grad():
            fast = attnkit.attention(q, k, v, causal=causal, return_lse=return_lse, backend="triton_cuda")
            slow = _general_path(monkeypatch, attnkit.attention, q, k, v, causal=causal, return_lse=return_lse,
                                 backend="triton_cuda")  # fmt: skip
        fast, slow = (fast, slow) if return_lse else ((fast,), (slow,))
        assert all(torch.equal(x, y) for x, y in zip(fast, slow)), step
    assert any(hit.runner is not None for hit in _fastcall._ATTENTION.values())
    if direct_launch.ENABLED and d == 64:
        # The default d64 tile takes no TMA scratch, so its plan launches through the driver; the d80/d128 defaults
        # build tensor descriptors on the device (global scratch), which keeps triton's launcher (direct_launch).
        assert len(driver_launches) >= 3  # the repeated calls


def test_repeated_training_step_equals_the_general_path(monkeypatch, driver_launches):
    gen = torch.Generator(device="cuda").manual_seed(1)
    _fastcall.clear()

    def step(q, k, v, dout):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out = attnkit.attention(q, k, v, causal=True, backend="triton_cuda")
        out.backward(dout)
        return out.detach(), q.grad, k.grad, v.grad

    for n in range(3):
        q, k, v, dout = (torch.randn(2, 200, 4, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
                         for _ in range(4))  # fmt: skip
        fast = step(q, k, v, dout)
        slow = _general_path(monkeypatch, step, q, k, v, dout)
        assert all(torch.equal(x, y) for x, y in zip(fast, slow)), n


@pytest.mark.parametrize("lengths", ["int", "tensor", "tensor-fused-check"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("seqlen_q", [1, 4])
def test_repeated_decode_steps_equal_the_general_path(lengths, paged, seqlen_q, monkeypatch, driver_launches):
    from attnkit.backends.triton import direct_launch

    from attnkit.ops import kvcache

    monkeypatch.setattr(kvcache, "FUSED_RANGE_CHECK", lengths == "tensor-fused-check")

    gen = torch.Generator(device="cuda").manual_seed(2)
    batch, hq, hk, d, capacity, page = 3, 32, 8, 128, 1024, 256
    bf = dict(device="cuda", dtype=torch.bfloat16)
    if paged:
        k_cache = torch.randn(batch * capacity // page + 2, page, hk, d, generator=gen, **bf)
        order = torch.randperm(k_cache.shape[0], device="cuda", generator=gen)[: batch * capacity // page]
        extra = {"block_table": order.view(batch, -1).to(torch.int32)}
    else:
        k_cache = torch.randn(batch, capacity, hk, d, generator=gen, **bf)
        extra = {}
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(batch, seqlen_q, hq, d, generator=gen, **bf)

    def steps():
        _fastcall.clear()
        kc, vc = k_cache.clone(), v_cache.clone()
        outs = []
        for n in range(4):
            start = 500 + 3 * n
            lens = start if lengths == "int" else torch.tensor([start, start - 7, start + 100], dtype=torch.int32,
                                                               device="cuda")  # fmt: skip
            kn = torch.full((batch, 2, hk, d), float(n), **bf)
            with torch.no_grad():
                outs.append(
                    attnkit.attention_with_kvcache(
                        q,
                        kc,
                        vc,
                        kn,
                        -kn,
                        cache_seqlens=lens,
                        causal=True,
                        return_lse=True,
                        backend="triton_cuda",
                        **extra,
                    )
                )
        return outs, kc, vc

    fast_outs, fast_k, fast_v = steps()
    assert [hit.runner is not None for hit in _fastcall._KVCACHE.values()] == [True]
    slow_outs, slow_k, slow_v = _general_path(monkeypatch, steps)
    assert torch.equal(fast_k, slow_k) and torch.equal(fast_v, slow_v)
    for n, (a, b) in enumerate(zip(fast_outs, slow_outs)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), n
    if direct_launch.ENABLED:
        # Repeated steps: the append each, and the split unless it streams through TMA (its descriptors are built
        # on the device, in global scratch, which keeps triton's launcher; see direct_launch).
        from attnkit.backends.triton import kvcache_launch

        from attnkit.params import KVCacheInfo

        info = KVCacheInfo(torch.zeros(batch, dtype=torch.int32), None, extra.get("block_table"), None, 0)
        per_step = 1 if kvcache_launch.tma_eligible(k_cache, v_cache, info, kvcache_launch._BLOCK_N) else 2
        assert len(driver_launches) >= 3 * per_step


def test_repeated_full_cache_reads_equal_the_general_path(monkeypatch, driver_launches):
    """cache_seqlens=None: every row full, nothing appended; the bound step keeps one lengths tensor."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    k_cache, v_cache = (torch.randn(2, 3000, 8, 128, generator=gen, **bf) for _ in range(2))
    _fastcall.clear()
    for n in range(3):
        q = torch.randn(2, 1, 32, 128, generator=gen, **bf)
        with torch.no_grad():
            fast = attnkit.attention_with_kvcache(q, k_cache, v_cache, return_lse=True, backend="triton_cuda")
            slow = _general_path(monkeypatch, attnkit.attention_with_kvcache, q, k_cache, v_cache, return_lse=True,
                                 backend="triton_cuda")  # fmt: skip
        assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1]), n
    assert [hit.full_lengths is not None for hit in _fastcall._KVCACHE.values()] == [True]
