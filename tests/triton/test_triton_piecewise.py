"""FlagAttention-style piecewise attention: keys closer than ``dist_threshold`` score with q1.k1, the rest with
q2.k2 (distance d = i + Sk - Sq - j)."""

from __future__ import annotations

import pytest
import torch
from triton_checks import ATOL, backend

from attnkit.params import AttentionParams
from attnkit.testing import max_abs_error, piecewise_attention_ref


def _inputs(b, sq, sk, hq, hk, d, dv, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(b, sq, hq, d), (b, sk, hk, d), (b, sq, hq, d), (b, sk, hk, d), (b, sk, hk, dv), (b, sq, hq, dv)]
    return [torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


@pytest.mark.parametrize("threshold", [-5, 0, 1, 20, 10**6])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("sq,sk", [(45, 61), (61, 45)])
def test_piecewise(threshold, causal, sq, sk):
    dtype = torch.bfloat16 if causal else torch.float32
    q1, k1, q2, k2, v, dout = _inputs(2, sq, sk, 4, 2, 32, 24, dtype, seed=threshold % 97 + sq)
    params = AttentionParams(softmax_scale=32**-0.5, causal=causal, window_right=0 if causal else -1)
    out, lse = backend().piecewise_forward(q1, k1, q2, k2, v, threshold, params)
    grads = backend().piecewise_backward(dout, q1, k1, q2, k2, v, out, lse, threshold, params)

    exact_in = [t.double().requires_grad_() for t in (q1, k1, q2, k2, v)]
    plain_in = [t.clone().requires_grad_() for t in (q1, k1, q2, k2, v)]
    exact, exact_lse = piecewise_attention_ref(*exact_in, threshold, causal=causal, upcast=False, return_lse=True)
    plain = piecewise_attention_ref(*plain_in, threshold, causal=causal, upcast=False)
    assert max_abs_error(out, exact) <= 2 * max_abs_error(plain, exact) + ATOL[dtype]
    assert torch.equal(torch.isinf(lse), torch.isinf(exact_lse))
    finite = ~torch.isinf(exact_lse)
    assert float((lse.double() - exact_lse.detach())[finite].abs().max()) < 1e-4
    g_exact = torch.autograd.grad(exact, exact_in, dout.double())
    g_plain = torch.autograd.grad(plain, plain_in, dout)
    for name, got, want, base in zip(("dq1", "dk1", "dq2", "dk2", "dv"), grads, g_exact, g_plain):
        assert got.shape == want.shape, name
        assert max_abs_error(got, want) <= 3 * max_abs_error(base, want) + ATOL[dtype], name
