"""Dropout in the Triton kernels: the mask is attnkit.dropout's bit for bit, and backward regenerates it."""

from __future__ import annotations

import pytest
import torch
from triton_checks import Case, assert_ok, backend, check_dense, check_varlen, varlen_inputs

from attnkit import dropout as dropout_rng
from attnkit.params import AttentionParams


def _mask_probe(b: int, h: int, sq: int, sk: int, causal: bool):
    """q = 0 makes every visible key equally likely (1 / #visible); with V = identity, out[i, j] > 0 exactly
    where key j of row i is kept."""
    q = torch.zeros(b, sq, h, 16, dtype=torch.float32)
    k = torch.randn(b, sk, h, 16, dtype=torch.float32)
    v = torch.eye(sk, dtype=torch.float32)[None, :, None, :].expand(b, sk, h, sk).contiguous()
    return q, k, v


@pytest.mark.parametrize("p", [0.17, 0.5, 0.9])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_mask_is_attnkit_dropout_bit_for_bit(p, causal):
    b, h, sq, sk = 2, 3, 37, 64
    q, k, v = _mask_probe(b, h, sq, sk, causal)
    seed = 0x5DEE_CE66_D123_4567
    params = AttentionParams(
        softmax_scale=1.0, causal=causal, window_right=0 if causal else -1, dropout_p=p, dropout_seed=seed
    )
    out, _ = backend().forward(q, k, v, None, params, None)
    got = (out > 0).permute(0, 2, 1, 3)  # (b, h, sq, sk)
    want = dropout_rng.keep_mask(seed, p, torch.arange(b * h), torch.arange(sq), torch.arange(sk)).view(b, h, sq, sk)
    if causal:
        i, j = torch.arange(sq)[:, None], torch.arange(sk)[None, :]
        want = want & (j <= i + sk - sq)
    assert torch.equal(got, want)
    # Kept entries carry 1 / (#visible * (1 - p)) exactly as computed in float32.
    visible = (torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + sk - sq).sum(-1) if causal else sk
    expect = torch.where(want, 1.0 / (torch.as_tensor(visible, dtype=torch.float32)[..., None] * (1 - p)), 0.0)
    torch.testing.assert_close(out.permute(0, 2, 1, 3), expect, rtol=1e-6, atol=0)


def test_varlen_mask_uses_sequence_index_as_batch():
    lengths = [5, 20, 11]
    h, sk = 2, 32
    params = AttentionParams(softmax_scale=1.0, dropout_p=0.4, dropout_seed=987654321)
    q = torch.zeros(sum(lengths), h, 16)
    k = torch.randn(len(lengths) * sk, h, 16)
    v = torch.eye(sk)[:, None, :].expand(sk, h, sk).repeat(len(lengths), 1, 1).contiguous()
    from attnkit.params import VarlenInfo

    cu_q = torch.tensor([0, 5, 25, 36], dtype=torch.int32)
    cu_k = torch.tensor([0, sk, 2 * sk, 3 * sk], dtype=torch.int32)
    out, _ = backend().forward(q, k, v, None, params, VarlenInfo(cu_q, cu_k, 20, sk))
    for bi, n in enumerate(lengths):
        rows = out[cu_q[bi] : cu_q[bi + 1]] > 0  # (n, h, sk)
        want = dropout_rng.keep_mask(
            params.dropout_seed, 0.4, torch.arange(h) + bi * h, torch.arange(n), torch.arange(sk)
        )
        assert torch.equal(rows.permute(1, 0, 2), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_forward_backward_with_dropout(dtype, causal):
    assert_ok(check_dense(Case(sq=41, sk=57, hq=4, hk=2, d=24, dtype=dtype, causal=causal, dropout_p=0.3, seed=5)))


def test_dropout_with_alibi_softcap_window():
    case = Case(sq=50, sk=50, dtype=torch.float32, window=(9, 2), alibi="h", softcap=4.0, dropout_p=0.2, seed=8)
    assert_ok(check_dense(case))


def test_varlen_dropout_gradients():
    assert_ok(
        check_varlen(
            Case(hq=2, hk=1, d=32, dtype=torch.float32, causal=True, dropout_p=0.25, seed=4),
            [9, 0, 40],
            [30, 3, 35],
            pad=2,
        )
    )


def test_seed_changes_mask_and_same_seed_repeats():
    q, k, v, *_ = varlen_inputs([30], [30], 2, 2, 16, 16, torch.float32)
    q, k, v = q[None], k[None], v[None]
    be = backend()
    p1 = AttentionParams(softmax_scale=0.25, dropout_p=0.5, dropout_seed=1)
    p2 = AttentionParams(softmax_scale=0.25, dropout_p=0.5, dropout_seed=2)
    a, _ = be.forward(q, k, v, None, p1, None)
    b, _ = be.forward(q, k, v, None, p1, None)
    c, _ = be.forward(q, k, v, None, p2, None)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
