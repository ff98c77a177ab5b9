"""Dense attention through the Triton kernels (CPU interpreter) against float64, with the tolerance rule.

Outputs, lse and all three gradients are checked for every case; shapes are tiny but always span several key
and query blocks (the interpreter tiles are 32 x 16 and 16 x 32), so block skipping and boundary masking are
exercised.
"""

from __future__ import annotations

import pytest
import torch
from triton_checks import Case, assert_ok, backend, check_dense

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

LENGTHS = [(1, 1), (37, 37), (113, 203), (203, 113), (1, 37), (37, 1)]


@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("sq,sk", LENGTHS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_lengths_dtypes(dtype, sq, sk, causal):
    assert_ok(check_dense(Case(b=2, sq=sq, sk=sk, hq=2, hk=1, d=40, dtype=dtype, causal=causal, seed=sq * 7 + sk)))


@pytest.mark.parametrize(
    "d,dv",
    [
        (8, 8),
        (16, 16),
        (40, 40),
        (64, 64),
        (80, 80),
        (96, 96),
        (112, 112),
        (128, 128),
        (160, 160),
        (192, 192),
        (224, 224),
        (256, 256),
        (64, 32),
        (40, 96),
        (256, 16),
        (16, 200),
    ],
)
def test_head_dims(d, dv):
    assert_ok(check_dense(Case(b=1, sq=33, sk=50, hq=2, hk=2, d=d, dv=dv, dtype=BF16, causal=d % 32 == 0, seed=d)))


@pytest.mark.parametrize("window", [(3, 0), (0, 5), (7, 7), (0, 0), (-1, 4), (10, -1), (40, 40)])
@pytest.mark.parametrize("sq,sk", [(37, 53), (53, 37)])
def test_sliding_window(window, sq, sk):
    assert_ok(check_dense(Case(sq=sq, sk=sk, dtype=F16, window=window, seed=sum(window) + sq)))


@pytest.mark.parametrize("alibi,softcap", [(None, 2.5), ("h", 0.0), ("bh", 0.0), ("h", 2.5), ("bh", 2.5)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_alibi_softcap(alibi, softcap, causal):
    case = Case(sq=45, sk=61, dtype=F32 if causal else BF16, alibi=alibi, softcap=softcap, causal=causal, seed=3)
    assert_ok(check_dense(case))


@pytest.mark.parametrize("hq,hk", [(4, 1), (4, 2), (6, 3), (3, 3)])
def test_gqa(hq, hk):
    assert_ok(check_dense(Case(sq=29, sk=47, hq=hq, hk=hk, d=32, dtype=F16, causal=True, seed=hq + hk)))


def test_scale_override():
    assert_ok(check_dense(Case(sq=20, sk=30, dtype=F32, scale=0.9)))


def test_fully_masked_rows_are_zero_not_nan():
    """Sq > Sk with causal: the first Sq - Sk rows see no key (out 0, lse -inf, zero gradients, no NaN)."""
    case = Case(b=1, sq=70, sk=20, hq=2, hk=2, d=32, dtype=BF16, causal=True, seed=11)
    q, k, v, dout, _ = case.tensors()
    be = backend()
    out, lse = be.forward(q, k, v, None, case.params(), None)
    dq, dk, dv = be.backward(dout, q, k, v, out, lse, None, case.params(), None)
    masked = slice(0, 50)
    assert torch.equal(out[:, masked], torch.zeros_like(out[:, masked]))
    assert bool(torch.isneginf(lse[:, :, masked]).all())
    assert torch.equal(dq[:, masked], torch.zeros_like(dq[:, masked]))
    for t in (out, lse[:, :, 50:], dq, dk, dv):
        assert not bool(t.isnan().any())
    assert_ok(check_dense(case))


def test_bf16_dot_is_exact_under_interpreter():
    """The interpreter's bf16 tl.dot returns garbage; the kernels upcast their operands when interpreted. An
    all-ones problem has an exact answer (out = mean of v), so any garbage from the dot shows up here."""
    q = torch.ones(1, 40, 1, 32, dtype=BF16)
    k = torch.ones(1, 40, 1, 32, dtype=BF16)
    v = torch.arange(40, dtype=BF16)[None, :, None, None].expand(1, 40, 1, 32).contiguous()
    case = Case(d=32)
    out, lse = backend().forward(q, k, v, None, case.params(), None)
    assert torch.equal(out, torch.full_like(out, 19.5))
    torch.testing.assert_close(lse, torch.full_like(lse, 32 / 32**0.5 + float(torch.log(torch.tensor(40.0)))))


def test_bf16_stores_truncate_under_interpreter():
    """The interpreter converts float32 to bfloat16 by truncation (the GPU rounds to nearest), so interpreted
    bf16 outputs can be one ulp off where the GPU is half an ulp off; attnkit.fuzz allows for exactly that
    (fuzz.truncating_bf16). If this fails, triton fixed its interpreter: drop that allowance."""
    import triton
    import triton.language as tl

    @triton.jit
    def store_bf16(X, Y):
        offs = tl.arange(0, 4)
        tl.store(Y + offs, tl.load(X + offs).to(tl.bfloat16))

    x = torch.tensor([1.37109375 + 1e-6, -3.0897216796875, 2.0 - 2.0**-9 + 2.0**-12, 1.0])
    y = torch.empty(4, dtype=BF16)
    store_bf16[(1,)](x, y)
    truncated = (x.view(torch.int32) & ~0xFFFF).view(torch.float32).to(BF16)
    assert torch.equal(y, truncated) and not torch.equal(y, x.to(BF16))


def test_rocm_backend_runs_the_same_kernels_under_interpreter():
    assert_ok(check_dense(Case(sq=30, sk=41, dtype=F16, causal=True), name="triton_rocm"))
