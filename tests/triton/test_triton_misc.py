"""Layout, determinism and robustness of the Triton kernels (CPU interpreter)."""

from __future__ import annotations

import pytest
import torch
from attnkit.backends.triton import configs, launch
from triton_checks import Case, assert_ok, backend, check_dense


def _run(q, k, v, dout, params, slopes=None):
    be = backend()
    out, lse = be.forward(q, k, v, slopes, params, None)
    return (out, lse, *be.backward(dout, q, k, v, out, lse, slopes, params, None))


def test_deterministic_backward_is_bitwise_reproducible():
    case = Case(sq=45, sk=61, hq=4, hk=1, dtype=torch.bfloat16, causal=True, dropout_p=0.2, alibi="h", seed=1)
    q, k, v, dout, slopes = case.tensors()
    first = _run(q, k, v, dout, case.params(), slopes)
    second = _run(q, k, v, dout, case.params(), slopes)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_strided_inputs_match_contiguous_bitwise():
    """Strides are kernel arguments: packed-QKV slices, head-major storage and a strided head dim give
    bit-identical results to contiguous copies (the loads change, the arithmetic does not)."""
    b, s, h, d = 2, 37, 2, 32
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(b, s, 3, h, d, generator=gen).to(torch.float16)
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    v = torch.randn(b, h, s, 2 * d, generator=gen).to(torch.float16).transpose(1, 2)[..., ::2]  # head dim stride 2
    dout = torch.randn(b, h, s, d, generator=gen).to(torch.float16).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous() or dout.is_contiguous())
    params = Case(d=d, causal=True).params()
    strided = _run(q, k, v, dout, params)
    dense = _run(q.contiguous(), k.contiguous(), v.contiguous(), dout.contiguous(), params)
    for a, b_ in zip(strided, dense):
        assert torch.equal(a, b_)


def test_outputs_are_fully_written(monkeypatch):
    """Outputs are allocated NaN-filled: every element must be written (masked rows included)."""

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(launch, "_empty", poisoned)
    case = Case(b=2, sq=61, sk=29, hq=4, hk=2, d=40, dv=24, dtype=torch.float32, causal=True, seed=2)
    q, k, v, dout, _ = case.tensors()
    for t in _run(q, k, v, dout, case.params()):
        assert not bool(t.isnan().any())
    assert_ok(check_dense(case))


def test_int64_index_path_matches(monkeypatch):
    """The 64-bit in-sequence offset variant (used when rows * stride passes 2**31) computes the same result."""
    case = Case(sq=40, sk=70, hq=2, hk=1, dtype=torch.float16, window=(20, 3), seed=3)
    q, k, v, dout, _ = case.tensors()
    base = _run(q, k, v, dout, case.params())
    monkeypatch.setattr(launch, "_needs_idx64", lambda prob, tensors: True)
    wide = _run(q, k, v, dout, case.params())
    for a, b in zip(base, wide):
        assert torch.equal(a, b)


def test_needs_idx64_threshold():
    q = torch.empty(0)
    prob = launch.Problem(1, 1, 1, 2**21, 2**21, 128, 128, None)
    big_row = torch.empty_strided((1, 2, 1, 128), (0, 2**11, 128, 1))
    assert launch._needs_idx64(prob, [big_row])  # 2**21 rows x 2**11 elements > 2**31
    small = launch.Problem(1, 1, 1, 1024, 1024, 128, 128, None)
    assert not launch._needs_idx64(small, [big_row, q.new_empty(1, 1024, 1, 128)])


def test_tma_descriptor_path_under_interpreter(monkeypatch):
    """The Hopper variant (K/V, Q/dO through tensor descriptors) runs in the interpreter too: same answers."""
    tiles = {
        kind: configs.Tile(t.block_m, t.block_n, t.num_warps, t.num_stages, use_tma=True)
        for kind, t in configs.INTERPRETER_TILES.items()
    }
    monkeypatch.setattr(configs, "INTERPRETER_TILES", tiles)
    assert_ok(check_dense(Case(sq=45, sk=61, hq=4, hk=2, d=40, dv=24, dtype=torch.bfloat16, causal=True, seed=4)))
    assert_ok(check_dense(Case(sq=33, sk=20, dtype=torch.float32, window=(5, 1), dropout_p=0.3, seed=5)))


def test_empty_problems():
    be = backend()
    params = Case(d=16).params()
    q = torch.randn(2, 0, 2, 16)
    k = torch.randn(2, 5, 2, 16)
    out, lse = be.forward(q, k, k, None, params, None)
    assert out.shape == (2, 0, 2, 16) and lse.shape == (2, 2, 0)
    q = torch.randn(2, 4, 2, 16)
    k0 = torch.randn(2, 0, 2, 16)
    out, lse = be.forward(q, k0, k0, None, params, None)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())
    dq, dk, dv = be.backward(torch.ones_like(out), q, k0, k0, out, lse, None, params, None)
    assert torch.equal(dq, torch.zeros_like(q)) and dk.shape == k0.shape and dv.shape == k0.shape


def test_interpreter_switch_after_import_is_reported(monkeypatch):
    backend().forward(*Case().tensors()[:3], None, Case().params(), None)  # kernels imported interpreted
    monkeypatch.delenv("TRITON_INTERPRET")
    from attnkit.errors import AttnkitError

    with pytest.raises(AttnkitError, match="TRITON_INTERPRET"):
        launch._interpreted()
