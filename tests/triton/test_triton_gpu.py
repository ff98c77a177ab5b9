"""The Triton backend on a real GPU at real sizes (``pytest -m gpu tests/triton/test_triton_gpu.py``).

Same checks as the interpreter tests (float64 exact answer, flash-attn tolerance rule), plus what only shows at
size or on hardware: long sequences, every head-dim class, TMA and pointer paths, bitwise determinism, 64-bit
offsets, NaN-poisoned varlen padding.
"""

from __future__ import annotations

import pytest
import torch
from triton_checks import Case, assert_ok, backend, check_dense, check_varlen

from attnkit import dropout as dropout_rng
from attnkit.params import AttentionParams
from attnkit.testing import attention_naive, piecewise_attention_ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32

GRID = [
    # (b, sq, sk, hq, hk, d, dv, dtype, causal, window, softcap, alibi)
    (2, 2048, 2048, 4, 4, 64, None, BF16, False, (-1, -1), 0.0, None),
    (2, 2048, 2048, 4, 4, 64, None, BF16, True, (-1, -1), 0.0, None),
    (1, 1531, 1531, 4, 2, 96, None, BF16, True, (-1, -1), 0.0, None),
    (1, 4096, 4096, 4, 4, 128, None, BF16, False, (-1, -1), 0.0, None),
    (1, 4096, 4096, 4, 4, 128, None, BF16, True, (-1, -1), 0.0, None),
    (1, 16384, 16384, 2, 1, 128, None, BF16, True, (-1, -1), 0.0, None),
    (1, 1024, 1024, 2, 2, 192, None, BF16, False, (-1, -1), 0.0, None),
    (1, 1024, 1024, 2, 2, 256, None, BF16, True, (-1, -1), 0.0, None),
    (1, 2048, 2048, 4, 4, 128, None, F16, False, (256, 0), 0.0, None),
    (1, 2048, 2048, 4, 4, 128, None, F16, False, (-1, -1), 20.0, "bh"),
    (1, 1024, 1024, 2, 2, 64, None, F32, False, (-1, -1), 0.0, None),
    (1, 1000, 1000, 2, 2, 128, None, F32, True, (-1, -1), 0.0, None),
    (2, 2048, 2048, 8, 2, 128, 64, BF16, True, (-1, -1), 0.0, None),
    (1, 1000, 3000, 4, 4, 128, None, BF16, True, (-1, -1), 0.0, None),
    (1, 3000, 1000, 4, 4, 128, None, BF16, True, (-1, -1), 0.0, None),
]

DROPOUT_GRID = [
    # (b, sq, sk, hq, hk, d, dtype, causal): forward and backward against float64 with the same dropout mask
    (2, 1000, 1000, 4, 2, 64, BF16, True),
    (1, 1531, 777, 4, 4, 128, F16, False),
    (1, 1000, 1000, 2, 1, 256, BF16, True),
]


@pytest.mark.parametrize("b,sq,sk,hq,hk,d,dtype,causal", DROPOUT_GRID)
def test_dropout_forward_backward_against_float64(b, sq, sk, hq, hk, d, dtype, causal):
    case = Case(b=b, sq=sq, sk=sk, hq=hq, hk=hk, d=d, dtype=dtype, causal=causal, dropout_p=0.17, device="cuda",
                seed=sq + d)  # fmt: skip
    assert_ok(check_dense(case))


@pytest.mark.parametrize("b,sq,sk,hq,hk,d,dv,dtype,causal,window,softcap,alibi", GRID)
def test_against_float64(b, sq, sk, hq, hk, d, dv, dtype, causal, window, softcap, alibi):
    case = Case(
        b=b,
        sq=sq,
        sk=sk,
        hq=hq,
        hk=hk,
        d=d,
        dv=dv,
        dtype=dtype,
        causal=causal,
        window=window,
        softcap=softcap,
        alibi=alibi,
        device="cuda",
        seed=sq + d,
    )
    assert_ok(check_dense(case))


def test_pointer_path_when_not_tma_eligible():
    """Misaligned K/V (offset by one element) must take the pointer path and still be right."""
    case = Case(b=1, sq=1024, sk=1024, hq=2, hk=2, d=128, dtype=BF16, causal=True, device="cuda")
    q, k, v, dout, _ = case.tensors()
    k, v = _misaligned(k), _misaligned(v)
    params = case.params()
    out, lse = backend().forward(q, k, v, None, params, None)
    grads = backend().backward(dout, q, k, v, out, lse, None, params, None)
    exact_in = [t.double().requires_grad_() for t in (q, k, v)]
    plain_in = [t.clone().requires_grad_() for t in (q, k, v)]
    exact = attention_naive(*exact_in, causal=True)
    plain = attention_naive(*plain_in, causal=True)
    assert _err(out, exact) <= 2 * _err(plain, exact) + 1e-2
    g_exact = torch.autograd.grad(exact, exact_in, dout.double())
    g_plain = torch.autograd.grad(plain, plain_in, dout)
    for got, want, base in zip(grads, g_exact, g_plain):
        assert _err(got, want) <= 3 * _err(base, want) + 1e-2


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = flat[1:].view(t.shape)
    view.copy_(t)
    assert view.data_ptr() % 16
    return view


def test_deterministic_backward_bitwise():
    """deterministic=True (with dropout): two forwards and two backwards of the same inputs give the same bits."""
    case = Case(b=2, sq=2048, sk=2048, hq=8, hk=2, d=128, dtype=BF16, causal=True, device="cuda", dropout_p=0.1,
                deterministic=True)  # fmt: skip
    q, k, v, dout, _ = case.tensors()
    params = case.params()
    be = backend()
    out1, lse1 = be.forward(q, k, v, None, params, None)
    out2, lse2 = be.forward(q, k, v, None, params, None)
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)
    g1 = be.backward(dout, q, k, v, out1, lse1, None, params, None)
    g2 = be.backward(dout, q, k, v, out1, lse1, None, params, None)
    for a, b_ in zip(g1, g2):
        assert torch.equal(a, b_)


def test_varlen_nan_padding_does_not_leak():
    case = Case(hq=4, hk=2, d=128, dtype=BF16, causal=True, device="cuda")
    assert_ok(check_varlen(case, [1000, 1, 2047, 0, 513], [1000, 17, 2047, 5, 0], pad=64))


def test_varlen_window_alibi_fp16():
    case = Case(hq=4, hk=4, d=64, dtype=F16, window=(100, 50), alibi="bh", device="cuda")
    assert_ok(check_varlen(case, [777, 1024, 3], [900, 1024, 40], pad=16))


def test_dropout_mask_bitexact():
    """With q = 0 every visible key has probability 1/Sk, so out[i, j] (V = identity) is keep(i, j) / (Sk (1-p))."""
    b, h, sq, sk, p = 2, 3, 1000, 256, 0.3
    q = torch.zeros(b, sq, h, 64, dtype=BF16, device="cuda")
    k = torch.randn(b, sk, h, 64, dtype=BF16, device="cuda")
    v = torch.eye(sk, dtype=BF16, device="cuda")[None, :, None, :].expand(b, sk, h, sk).contiguous()
    params = AttentionParams(softmax_scale=0.125, dropout_p=p, dropout_seed=0x7FFF_1234_ABCD_0001)
    out, _ = backend().forward(q, k, v, None, params, None)
    got = out.float() > 0
    bh = torch.arange(b * h, device="cuda")
    want = (
        dropout_rng.keep_mask(
            params.dropout_seed, p, bh, torch.arange(sq, device="cuda"), torch.arange(sk, device="cuda")
        )
        .view(b, h, sq, sk)
        .permute(0, 2, 1, 3)
    )
    assert torch.equal(got, want)


def test_piecewise_gpu():
    b, s, h, d, thr = 2, 2048, 4, 64, 512
    gen = torch.Generator().manual_seed(5)
    inputs = [torch.randn(b, s, h, d, generator=gen).to(BF16).cuda() for _ in range(5)]
    dout = torch.randn(b, s, h, d, generator=gen).to(BF16).cuda()
    params = AttentionParams(softmax_scale=d**-0.5, causal=True, window_right=0)
    out, lse = backend().piecewise_forward(*inputs, thr, params)
    grads = backend().piecewise_backward(dout, *inputs, out, lse, thr, params)  # dq1, dk1, dq2, dk2, dv
    exact_in = [t.double().requires_grad_() for t in inputs]
    plain_in = [t.clone().requires_grad_() for t in inputs]
    exact = piecewise_attention_ref(*exact_in, thr, causal=True, upcast=False)
    plain = piecewise_attention_ref(*plain_in, thr, causal=True, upcast=False)
    assert _err(out, exact) <= 2 * _err(plain, exact) + 1e-2
    g_exact = torch.autograd.grad(exact, exact_in, dout.double())
    g_plain = torch.autograd.grad(plain, plain_in, dout)
    order = (0, 1, 2, 3, 4)  # inputs are (q1, k1, q2, k2, v), the same order as the backend's gradients
    for i in order:
        assert _err(grads[i], g_exact[i]) <= 3 * _err(g_plain[i], g_exact[i]) + 1e-2, i


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def test_int64_batch_offsets():
    """q/k/v with more than 2**31 elements: the last batches live past the int32 range."""
    b, s, h, d = 16400, 1024, 1, 128
    assert b * s * h * d > 2**31
    gen = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(b, s, h, d, dtype=BF16, device="cuda", generator=gen)
    k = torch.randn(b, s, h, d, dtype=BF16, device="cuda", generator=gen)
    v = torch.randn(b, s, h, d, dtype=BF16, device="cuda", generator=gen)
    params = AttentionParams(softmax_scale=d**-0.5, causal=True, window_right=0)
    out, _ = backend().forward(q, k, v, None, params, None)
    tail = slice(b - 3, b)
    ref = attention_naive(q[tail].double(), k[tail].double(), v[tail].double(), causal=True)
    plain = attention_naive(q[tail], k[tail], v[tail], causal=True)
    assert float((out[tail].double() - ref).abs().max()) <= 2 * float((plain.double() - ref).abs().max()) + 1e-2
    del q, k, v, out
    torch.cuda.empty_cache()


def test_int64_row_offsets():
    """A key tensor whose row stride puts later rows past 2**31 elements from the base (IDX64 path)."""
    sk, d, row_stride = 80, 64, 2**25
    storage = torch.zeros(sk * row_stride, dtype=BF16, device="cuda")
    k = storage.as_strided((1, sk, 1, d), (0, row_stride, d, 1))
    k.copy_(torch.randn(1, sk, 1, d, dtype=BF16, device="cuda"))
    q = torch.randn(1, 33, 1, d, dtype=BF16, device="cuda")
    v = torch.randn(1, sk, 1, d, dtype=BF16, device="cuda")
    params = AttentionParams(softmax_scale=d**-0.5)
    out, lse = backend().forward(q, k, v, None, params, None)
    dout = torch.randn_like(out)
    dq, dk, dv = backend().backward(dout, q, k, v, out, lse, None, params, None)
    exact_in = [t.double().requires_grad_() for t in (q, k, v)]
    plain_in = [t.clone().requires_grad_() for t in (q, k, v)]
    exact = attention_naive(*exact_in)
    plain = attention_naive(*plain_in)
    assert _err(out, exact) <= 2 * _err(plain, exact) + 1e-2
    want = torch.autograd.grad(exact, exact_in, dout.double())
    base = torch.autograd.grad(plain, plain_in, dout)
    for got, w, p in zip((dq, dk, dv), want, base):
        assert _err(got, w) <= 3 * _err(p, w) + 1e-2
    del storage, k
    torch.cuda.empty_cache()


def test_fp32_ieee_dots(monkeypatch):
    """The CUDA-core fp32 path (slower, spills) stays correct; tf32x3 is the default (see launch.dot_precision)."""
    from attnkit.backends.triton import launch

    monkeypatch.setattr(launch, "FP32_DOT_PRECISION", "ieee")
    case = Case(b=1, sq=512, sk=700, hq=2, hk=1, d=128, dtype=F32, causal=True, device="cuda")
    assert_ok(check_dense(case))


@pytest.mark.parametrize(
    "case",
    [
        Case(b=2, sq=1000, sk=1000, hq=4, hk=2, d=128, dtype=BF16, causal=True, device="cuda", seed=31),
        Case(b=1, sq=777, sk=900, hq=4, hk=4, d=96, dv=64, dtype=F16, window=(100, 3), softcap=15.0, alibi="bh",
             device="cuda", seed=32),
    ],
)  # fmt: skip
def test_fast_launch_and_persistent_grid_bitwise(case, monkeypatch):
    """The host fast path (second call with the same key) and the persistent forward grid give the full
    path's bits; outputs are poisoned first, so unwritten elements show."""
    from attnkit.backends.triton import configs, fastpath, launch

    monkeypatch.setattr(launch, "fwd_plans", fastpath.Plans())
    poisoned = lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(launch, "empty", poisoned)
    q, k, v, _, slopes = case.tensors()
    params = case.params()
    full = launch.forward(q, k, v, slopes, params, None, "nvidia")
    assert len(launch.fwd_plans) == 1
    fast = launch.forward(q, k, v, slopes, params, None, "nvidia")
    assert all(torch.equal(a, b) for a, b in zip(full, fast))
    assert not torch.isnan(full[0]).any()
    default = configs.default("fwd", "nvidia", configs.head_block(case.d), 2, tma=True)
    tile = configs.Tile(
        default.block_m, default.block_n, default.num_warps, default.num_stages, default.use_tma, None, 1
    )
    from attnkit.backends.triton import tuning

    monkeypatch.setattr(tuning, "tile_for", lambda kind, *a, **kw: tile)
    monkeypatch.setattr(fastpath, "ENABLED", False)
    persistent = launch.forward(q, k, v, slopes, params, None, "nvidia")
    assert all(torch.equal(a, b) for a, b in zip(full, persistent))


_BAD_LENGTH_CHILD = r"""
import sys, torch, attnkit
from attnkit.ops import kvcache
kvcache.FUSED_RANGE_CHECK = sys.argv[2] == "fused"
dev = "cuda"
k_cache = torch.zeros(2, 64, 2, 64, device=dev, dtype=torch.bfloat16); v_cache = torch.zeros_like(k_cache)
q = torch.randn(2, 1, 4, 64, device=dev, dtype=torch.bfloat16)
k = torch.randn(2, 1, 2, 64, device=dev, dtype=torch.bfloat16)
v = torch.randn_like(k)
with torch.no_grad():
    for n in (5, 6):  # the second call is a repeated one (the frontend's cache of checked calls)
        lens = torch.tensor([n, n], dtype=torch.int32, device=dev)
        attnkit.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens, backend="triton_cuda")
    torch.cuda.synchronize()
    print("GOOD CALLS DONE", flush=True)
    lens = torch.tensor([3, int(sys.argv[1])], dtype=torch.int32, device=dev)
    try:
        attnkit.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens, backend="triton_cuda")
        torch.cuda.synchronize()
        print("NO ERROR", flush=True)
    except Exception as e:
        print("RAISED", type(e).__name__, str(e).splitlines()[0], flush=True)
"""


@pytest.mark.parametrize("check", ["kernel", "fused"])  # a check launch, or the append kernel's own assert
@pytest.mark.parametrize("bad", [64, -1], ids=["no-room", "negative"])
def test_repeated_decode_with_a_bad_tensor_length_stops_with_a_device_assert(bad, check):
    """A repeated decode step checks tensor lengths on the device, without a sync: a length without room for the
    new token, or a negative one, ends in a device-side assert (the process's CUDA context is lost, hence the
    subprocess), never in a silent write or a wrong answer."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _BAD_LENGTH_CHILD, str(bad), check], capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert "GOOD CALLS DONE" in r.stdout, r.stdout + r.stderr[-2000:]
    assert "NO ERROR" not in r.stdout
    assert "RAISED" in r.stdout and "assert" in r.stdout.lower(), r.stdout + r.stderr[-2000:]
