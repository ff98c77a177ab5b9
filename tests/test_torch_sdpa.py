"""The torch_sdpa backend (PyTorch's own kernels with lse) against the float64 reference, and where auto uses it."""

from __future__ import annotations

import pytest
import torch
from helpers import make_spec, qkv, rand

import attnkit
from attnkit.testing import attention_ref, max_abs_error

ATOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-3, torch.float16: 1e-3}


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check(b, sq, sk, hq, hk, d, dtype, causal, device="cpu", seed=0):
    q, k, v = (x.to(device).requires_grad_(True) for x in qkv(b, sq, sk, hq, hk, d, dtype=dtype, seed=seed))
    out, lse = attnkit.attention(q, k, v, causal=causal, return_lse=True, backend="torch_sdpa")
    dout = rand(*out.shape, dtype=dtype, seed=seed + 9).to(device)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    exact, exact_lse = attention_ref(q, k, v, causal=causal, return_lse=True)
    exact_grads = torch.autograd.grad(exact, (q, k, v), dout.double())
    plain = attention_ref(q, k, v, causal=causal, upcast=False)
    plain_grads = torch.autograd.grad(plain, (q, k, v), dout)
    assert lse.shape == (b, hq, sq) and lse.dtype == attnkit.params.lse_dtype(dtype)
    assert max_abs_error(lse, exact_lse) <= 1e-4
    assert max_abs_error(out, exact) <= 2 * max_abs_error(plain, exact) + ATOL[dtype]
    for g, e, p in zip(grads, exact_grads, plain_grads):
        assert g.shape == e.shape
        assert max_abs_error(g, e) <= 3 * max_abs_error(p, e) + ATOL[dtype]


# Causal with seqlen_q > seqlen_k is declined (test_declines_what_it_cannot_do).
SHAPES = [
    (1, 1, False), (1, 1, True), (37, 37, False), (37, 37, True), (5, 113, False), (5, 113, True), (113, 37, False)
]  # fmt: skip


@pytest.mark.parametrize("sq,sk,causal", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_matches_reference_cpu(sq, sk, causal, dtype):
    _check(2, sq, sk, 4, 2, 16, dtype, causal, seed=sq + sk)


def test_auto_uses_it_on_cpu_only_for_what_it_supports():
    def chosen(**kw):
        tiny = dict(device_type="cpu", dtype=torch.float32, head_dim=8, head_dim_v=8, num_heads_q=2, num_heads_k=2,
                    batch=1, seqlen_q=9, seqlen_k=9)  # fmt: skip
        return attnkit.select_backend(make_spec(**{**tiny, **kw})).name

    assert chosen() == "torch_sdpa"
    assert chosen(features=frozenset({"causal", "gqa"}), num_heads_k=1) == "torch_sdpa"
    assert chosen(features=frozenset({"window"})) == "reference"
    assert chosen(features=frozenset({"causal"}), seqlen_q=10) == "reference"  # rows without keys
    assert chosen(features=frozenset({"dv_ne_d"}), head_dim_v=4) == "reference"
    assert chosen(op="varlen") == "reference"
    # On GPUs attnkit's own kernels stay ahead of it.
    sdpa = attnkit.registry.REGISTRY.get("torch_sdpa")
    for name in ("triton_cuda", "cupy_cuda"):
        assert attnkit.registry.REGISTRY.get(name).priority > sdpa.priority
    assert sdpa.priority > attnkit.registry.REGISTRY.get("reference").priority


def test_declines_what_it_cannot_do():
    q, k, v = qkv(1, 6, 3, 2, 2, 8, dtype=torch.float32)
    with pytest.raises(attnkit.BackendUnsupportedError) as info:
        attnkit.attention(q, k, v, causal=True, backend="torch_sdpa")
    assert any("seqlen_q > seqlen_k" in r for r in info.value.reasons)
    with pytest.raises(attnkit.BackendUnsupportedError, match="softcap"):
        attnkit.attention(q, k, v, softcap=5.0, backend="torch_sdpa")
    with pytest.raises(attnkit.BackendUnsupportedError, match="dropout"):
        attnkit.attention(q, k, v, dropout_p=0.1, backend="torch_sdpa")
    # auto falls back to the reference for the same calls and still gets them right
    out = attnkit.attention(q, k, v, causal=True)
    assert torch.equal(out[:, :3], torch.zeros_like(out[:, :3]))


def test_declines_cuda_tensors():
    """CPU only: CUDA specs are declined by the capability table (see the backend's docstring for why)."""
    spec = make_spec(compute_capability=(9, 0), dtype=torch.bfloat16, head_dim=128, head_dim_v=128, batch=1,
                     seqlen_q=512, seqlen_k=512, features=frozenset({"causal"}), requires_grad=True)  # fmt: skip
    assert any("cuda" in r for r in attnkit.registry.REGISTRY.get("torch_sdpa").why_not(spec))
