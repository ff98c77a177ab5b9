"""Edge cases of the public API through the Triton kernels (interpreter on the CPU), against the reference
backend or float64: odd index tensors, huge windows, negative scales, large softcaps, NaN confinement."""

from __future__ import annotations

import nan_checks
import pytest
import torch
import triton
import triton.language as tl
from attnkit.backends.triton.kernel_utils import tanh

import attnkit
from attnkit.testing import attention_ref, within_tolerance

TRITON = "triton_cuda"
ATOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 2e-5}


def _rand(*shape, seed, dtype=torch.float32, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _close(got: torch.Tensor, want: torch.Tensor, atol: float = 2e-5) -> None:
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=1e-4, equal_nan=True)


def _judge(q, k, v, atol_scale: float = 0.0, **kw) -> None:
    """triton_cuda's output and gradients against float64 with flash-attn's rule (plain: naive in q's dtype).
    ``atol_scale`` > 0 multiplies the small atol by the largest of itself, 1 and the exact tensor's magnitude."""
    inputs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    exact_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    plain_in = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    fast = attnkit.attention(*inputs, backend=TRITON, **kw)
    exact = attention_ref(*exact_in, **kw)
    plain = attention_ref(*plain_in, upcast=False, **kw)
    g = _rand(*fast.shape, seed=99, dtype=q.dtype).to(q.device)

    def atol(exact_t: torch.Tensor) -> float:
        return ATOL[q.dtype] * (max(1.0, atol_scale, float(exact_t.abs().max())) if atol_scale > 0 else 1.0)

    ok, err, allowed = within_tolerance(fast, exact, plain, factor=2.0, atol=atol(exact))
    assert ok, f"out: error {err:.3g} > allowed {allowed:.3g} ({kw})"
    grads = zip(
        ("dq", "dk", "dv"),
        torch.autograd.grad(fast, inputs, g),
        torch.autograd.grad(exact, exact_in, g.double()),
        torch.autograd.grad(plain, plain_in, g),
    )
    for name, fast_g, exact_g, plain_g in grads:
        ok, err, allowed = within_tolerance(fast_g, exact_g, plain_g, factor=3.0, atol=atol(exact_g))
        assert ok, f"{name}: error {err:.3g} > allowed {allowed:.3g} ({kw})"


def test_strided_cu_seqlens():
    """Offsets given as a strided view (stride 2, storage offset 2) are read by value, not as a dense array."""
    lens_q, lens_k = [5, 11, 0, 3], [7, 2, 4, 9]
    q, k, v = _rand(19, 4, 16, seed=1), _rand(22, 2, 16, seed=2), _rand(22, 2, 16, seed=3)
    spread_q = torch.full((12,), 99, dtype=torch.int32)
    spread_k = torch.full((12,), 99, dtype=torch.int32)
    spread_q[2::2], spread_k[2::2] = _cu(lens_q), _cu(lens_k)
    cq, ck = spread_q[2::2], spread_k[2::2]
    assert not cq.is_contiguous()
    for causal in (False, True):
        want = attnkit.attention_varlen(q, k, v, _cu(lens_q), _cu(lens_k), 11, 9, causal=causal, backend="reference")
        got = attnkit.attention_varlen(q, k, v, cq, ck, 11, 9, causal=causal, backend=TRITON)
        _close(got, want)


@pytest.mark.parametrize("window", [(-1, 2**31 - 1), (2**31 - 1, -1), (2**31 - 1, 2**31 - 1), (2**63, 0), (3, 2**40)])
def test_huge_windows(window):
    """Bounds near or past 2**31 must not overflow the kernels' int32 arithmetic (an overflow gives all-zero output)."""
    q, k, v = _rand(2, 37, 2, 16, seed=4), _rand(2, 21, 1, 16, seed=5), _rand(2, 21, 1, 16, seed=6)
    for x in (q, k, v):
        x.requires_grad_()
    want = attnkit.attention(q, k, v, window_size=window, backend="reference")
    got = attnkit.attention(q, k, v, window_size=window, backend=TRITON)
    _close(got, want)
    g = _rand(*want.shape, seed=7)
    want_grads = torch.autograd.grad(want, (q, k, v), g)
    got_grads = torch.autograd.grad(got, (q, k, v), g)
    for a, b in zip(got_grads, want_grads):
        _close(a, b, atol=1e-4)


def test_huge_dist_threshold():
    q1, k1, v = _rand(1, 19, 2, 16, seed=1), _rand(1, 23, 2, 16, seed=2), _rand(1, 23, 2, 16, seed=3)
    q2, k2 = _rand(1, 19, 2, 16, seed=4), _rand(1, 23, 2, 16, seed=5)
    for threshold in (2**31, 2**63, -(2**31) - 5, -(2**63)):
        want = attnkit.piecewise_attention(q1, k1, q2, k2, v, threshold, causal=True, backend="reference")
        got = attnkit.piecewise_attention(q1, k1, q2, k2, v, threshold, causal=True, backend=TRITON)
        _close(got, want)


@pytest.mark.parametrize("scale", [-5.0, -10.0, -20.0, -0.125])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_negative_softmax_scale(scale, causal, dtype):
    """The unmasked fast path takes the row max of the raw dot product: right only for scales >= 0, so the
    frontend folds a negative scale into q (NaN before, non-causal)."""
    q, k = _rand(2, 37, 2, 16, seed=1, dtype=dtype), _rand(2, 41, 1, 16, seed=2, dtype=dtype)
    v = _rand(2, 41, 1, 16, seed=3, dtype=dtype)
    # A score's rounding error is |scale| times its dot product's, and so are P's and every gradient's; dq and dk
    # also grow to magnitudes of 25-100. The atol, meant for errors on values of order 1, scales with both.
    # Plain PyTorch's own error, the rule's other term, varies with the CPU's BLAS (on an AMD EPYC, float32 dv:
    # 3e-6 plain against the kernel's 3.5e-5 at scale -5).
    _judge(q, k, v, atol_scale=abs(scale), softmax_scale=scale, causal=causal)


def test_negative_scale_piecewise():
    q1, k1, v = _rand(1, 19, 2, 16, seed=1), _rand(1, 23, 2, 16, seed=2), _rand(1, 23, 2, 16, seed=3)
    q2, k2 = _rand(1, 19, 2, 16, seed=4), _rand(1, 23, 2, 16, seed=5)
    want = attnkit.piecewise_attention(q1, k1, q2, k2, v, 4, softmax_scale=-7.0, backend="reference")
    got = attnkit.piecewise_attention(q1, k1, q2, k2, v, 4, softmax_scale=-7.0, backend=TRITON)
    _close(got, want, atol=1e-5)


@triton.jit
def _apply_tanh(X, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, tanh(tl.load(X + offs)))


def _check_kernel_tanh(device: str) -> None:
    mags = torch.cat([torch.logspace(-30, 1.5, 2000, dtype=torch.float64), torch.linspace(0.5, 0.6, 48).double()])
    x64 = torch.cat([mags, -mags, torch.zeros(1, dtype=torch.float64)])
    x = x64.float()
    n = triton.next_power_of_2(x.numel())
    xp = torch.zeros(n)
    xp[: x.numel()] = x
    xp = xp.to(device)
    y = torch.empty(n, device=device)
    _apply_tanh[(1,)](xp, y, N=n)
    got, want = y[: x.numel()].cpu().double(), torch.tanh(x.double())
    ulp = torch.finfo(torch.float32).eps * want.abs().clamp_min(torch.finfo(torch.float32).tiny)
    worst = float(((got - want).abs() / ulp).max())
    assert worst <= 4.0, f"tanh error {worst:.2f} ulp"
    xs = torch.zeros(8)
    xs[:5] = torch.tensor([float("inf"), -float("inf"), float("nan"), 1e30, -1e30])
    ys = torch.empty(8, device=device)
    _apply_tanh[(1,)](xs.to(device), ys, N=8)
    ys = ys.cpu()
    assert ys[:2].tolist() == [1.0, -1.0] and bool(ys[2].isnan()) and ys[3:5].tolist() == [1.0, -1.0]


def test_kernel_tanh_is_accurate_for_small_and_large_arguments():
    """Relative error within a few float32 ulps everywhere: 1 - 2/(e^2x + 1) alone lost all relative precision
    for small |x| (softcap 1e8: score errors ~1)."""
    _check_kernel_tanh("cpu")


@pytest.mark.parametrize("softcap", [1e4, 1e6, 1e8, 30.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_large_softcap(softcap, dtype):
    """A softcap far above the scores is plain attention; the kernels' tanh must keep its relative precision."""
    q, k = _rand(2, 37, 2, 16, seed=1, dtype=dtype), _rand(2, 29, 1, 16, seed=2, dtype=dtype)
    v = _rand(2, 29, 1, 16, seed=3, dtype=dtype)
    _judge(q, k, v, softcap=softcap, causal=True)
    _judge(q, k, v, softcap=softcap)


def test_huge_max_seqlen_does_not_size_the_grid():
    """max_seqlen_q=10**6 over 16 tokens ran for minutes (one program per claimed query block)."""
    q, k, v = _rand(16, 2, 16, seed=1), _rand(16, 2, 16, seed=2), _rand(16, 2, 16, seed=3)
    for x in (q, k, v):
        x.requires_grad_()
    cq, ck = _cu([9, 7]), _cu([4, 12])
    want = attnkit.attention_varlen(q, k, v, cq, ck, 9, 12, causal=True, backend="reference")
    got = attnkit.attention_varlen(q, k, v, cq, ck, 10**6, 2**40, causal=True, backend=TRITON)
    _close(got, want)
    g = _rand(16, 2, 16, seed=4)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
        _close(a, b, atol=1e-4)


def test_malformed_autotune_variable_is_rejected_under_the_interpreter(monkeypatch):
    """The interpreter uses fixed tiles, but a malformed ATTNKIT_TRITON_AUTOTUNE must still fail loudly."""
    q = _rand(1, 8, 2, 16, seed=1)
    monkeypatch.setenv("ATTNKIT_TRITON_AUTOTUNE", "maybe")
    calls = [
        lambda: attnkit.attention(q, q, q, backend=TRITON),
        lambda: attnkit.attention_varlen(q[0], q[0], q[0], _cu([8]), _cu([8]), 8, 8, backend=TRITON),
        lambda: attnkit.piecewise_attention(q, q, q, q, q, 2, backend=TRITON),
    ]
    for call in calls:
        with pytest.raises(attnkit.EnvironmentVariableError, match="ATTNKIT_TRITON_AUTOTUNE='maybe'"):
            call()
    monkeypatch.setenv("ATTNKIT_TRITON_AUTOTUNE", "0")
    x = q.clone().requires_grad_()
    out = attnkit.attention(x, x, x, backend=TRITON)
    monkeypatch.setenv("ATTNKIT_TRITON_AUTOTUNE", "maybe")
    with pytest.raises(attnkit.EnvironmentVariableError, match="ATTNKIT_TRITON_AUTOTUNE"):
        out.sum().backward()


@pytest.mark.parametrize(
    "kw",
    [{"causal": True}, {"window_size": (3, 1)}, {"softcap": 5.0}],
    ids=["causal", "window", "softcap"],
)
def test_nan_outside_a_rows_sequence_never_leaks(kw):
    nan_checks.check_varlen_padding(TRITON, **kw)
    nan_checks.check_varlen_other_sequences(TRITON, **kw)
    nan_checks.check_dense_rows_past_the_view(TRITON, **kw)


# ---- the same edge cases compiled on a GPU at real sizes (pytest -m gpu tests/triton/test_triton_edge_cases.py)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_kernel_tanh():
    _check_kernel_tanh("cuda")


GPU_OPTIONS = [
    {"softmax_scale": -5.0},
    {"softmax_scale": -0.4, "causal": True},
    {"softcap": 1e6},
    {"softcap": 1e8, "causal": True},
    {"softcap": 30.0, "window_size": (200, 17)},
    {"window_size": (-1, 2**31 - 1)},
    {"window_size": (2**63, 0)},
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kw", GPU_OPTIONS, ids=[str(kw) for kw in GPU_OPTIONS])
def test_gpu_edge_cases(kw, dtype, d):
    q = _rand(2, 1000, 4, d, seed=1, dtype=dtype).cuda()
    k, v = _rand(2, 1000, 2, d, seed=2, dtype=dtype).cuda(), _rand(2, 1000, 2, d, seed=3, dtype=dtype).cuda()
    _judge(q, k, v, **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_strided_offsets_and_huge_max_seqlen():
    """The strided-offsets call killed the process on the H200; the huge max_seqlen one ran for minutes."""
    lens_q, lens_k = [500, 1, 77, 0, 300], [400, 33, 77, 5, 1000]
    q = _rand(sum(lens_q), 4, 128, seed=1, dtype=torch.bfloat16).cuda()
    k = _rand(sum(lens_k), 2, 128, seed=2, dtype=torch.bfloat16).cuda()
    v = _rand(sum(lens_k), 2, 128, seed=3, dtype=torch.bfloat16).cuda()
    cq, ck = _cu(lens_q).cuda(), _cu(lens_k).cuda()
    spread_q = torch.full((2 * cq.numel(),), 10**6, dtype=torch.int32, device="cuda")
    spread_k = torch.full((2 * ck.numel(),), 10**6, dtype=torch.int32, device="cuda")
    spread_q[::2], spread_k[::2] = cq, ck
    want = attnkit.attention_varlen(q, k, v, cq, ck, 500, 1000, causal=True, backend="reference")
    got = attnkit.attention_varlen(q, k, v, spread_q[::2], spread_k[::2], 10**6, 2**40, causal=True, backend=TRITON)
    _close(got, want, atol=2e-2)


def test_negative_scale_through_the_custom_op():
    """The fold lives in the custom ops, so callers of the ops themselves (attnkit.distributed's blocks) get it."""
    from attnkit.ops import _library

    q, k, v = _rand(1, 37, 2, 16, seed=1), _rand(1, 41, 2, 16, seed=2), _rand(1, 41, 2, 16, seed=3)
    outs = {}
    # exact: float64 through the reference backend; plain: the reference in float32; fast: triton in float32.
    for role, name, dtype in (("exact", "reference", torch.float64), ("plain", "reference", torch.float32),
                              ("fast", TRITON, torch.float32)):  # fmt: skip
        x = q.to(dtype).requires_grad_()
        out, lse = _library.attention_forward(
            x, k.to(dtype), v.to(dtype), None, None, 37, 41, None, -20.0, False, -1, -1, 0.0, 0.0, 0, False, name
        )
        (dq,) = torch.autograd.grad(out, x, torch.ones_like(out))
        outs[role] = (out, lse, dq)
    for i, (what, factor) in enumerate((("out", 2.0), ("lse", 2.0), ("dq", 3.0))):
        exact = outs["exact"][i]
        # |scale| = 20 multiplies every score's rounding error: the atol grows with it (see _judge's atol_scale).
        atol = ATOL[torch.float32] * max(20.0, float(exact.abs().max()))
        ok, err, allowed = within_tolerance(outs["fast"][i], exact, outs["plain"][i], factor=factor, atol=atol)
        assert ok, f"{what}: error {err:.3g} > allowed {allowed:.3g}"
