"""merge_attention_states: merging attention over disjoint key sets gives attention over their union (dense and
varlen layouts, GQA, windows cut across parts), empty and NaN parts, out_dtype, gradients, and its bad input."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import assert_close, cu_seqlens, rand

import attnkit
from attnkit import InvalidArgumentError, InvalidArgumentTypeError
from attnkit.testing import attention_naive

NEG_INF = float("-inf")


def _split_attention(q, k, v, cuts, **kw):
    """Attention of q over each key range [cuts[i], cuts[i+1]) with the masks of the full problem (distance
    i + sk - sq - j), written out directly in float64: out and lse per range (an empty range gives lse -inf)."""
    sq, sk = q.shape[1], k.shape[1]
    outs, lses = [], []
    for a, b in itertools.pairwise(cuts):
        rows = torch.arange(sq)[:, None] + sk - sq
        cols = torch.arange(a, b)[None, :]
        d = rows - cols
        left, right = kw.get("window_size", (-1, -1))
        if kw.get("causal"):
            right = 0
        visible = torch.ones_like(d, dtype=torch.bool)
        if left >= 0:
            visible &= d <= left
        if right >= 0:
            visible &= d >= -right
        scale = q.shape[-1] ** -0.5
        group = q.shape[2] // k.shape[2]
        kk = k[:, a:b].repeat_interleave(group, 2).double()
        vv = v[:, a:b].repeat_interleave(group, 2).double()
        s = torch.einsum("bihd,bjhd->bhij", q.double(), kk) * scale
        s = s.masked_fill(~visible, NEG_INF)
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
        out = torch.einsum("bhij,bjhd->bihd", p, vv)
        outs.append(out)
        lses.append(lse)
    return outs, lses


@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(window_size=(7, 3))], ids=str)
@pytest.mark.parametrize("cuts", [(0, 37), (0, 1, 37), (0, 10, 30, 37), (0, 5, 5, 20, 36, 37)], ids=str)
def test_merge_equals_attention_over_the_union(cuts, kw):
    q, k, v = rand(2, 13, 4, 8, seed=1), rand(2, 37, 2, 8, seed=2), rand(2, 37, 2, 6, seed=3)
    outs, lses = _split_attention(q, k, v, list(cuts), **kw)
    out, lse = attnkit.merge_attention_states(outs, lses)
    exp_out, exp_lse = attention_naive(q, k, v, return_lse=True, **kw)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert_close(out, exp_out)
    assert_close(lse, exp_lse)


def test_merge_of_attnkit_outputs_dense_and_varlen():
    """Parts as attnkit returns them (float32 out and lse): keys split in two, dense and packed layouts."""
    q, k, v = rand(2, 5, 4, 16, seed=1, dtype=torch.float32), rand(2, 40, 2, 16, seed=2, dtype=torch.float32), \
        rand(2, 40, 2, 16, seed=3, dtype=torch.float32)  # fmt: skip
    parts = [attnkit.attention(q, k[:, a:b], v[:, a:b], return_lse=True) for a, b in ((0, 17), (17, 40))]
    out, lse = attnkit.merge_attention_states([p[0] for p in parts], [p[1] for p in parts])
    full, full_lse = attnkit.attention(q, k, v, return_lse=True)
    assert_close(out, full, atol=1e-6, rtol=1e-5)
    assert_close(lse, full_lse, atol=1e-6, rtol=1e-5)

    cu = cu_seqlens([5, 5])
    packed = [
        attnkit.attention_varlen(q.flatten(0, 1), k[:, a:b].flatten(0, 1), v[:, a:b].flatten(0, 1), cu,
                                 cu_seqlens([b - a, b - a]), 5, b - a, return_lse=True)
        for a, b in ((0, 17), (17, 40))
    ]  # fmt: skip
    vout, vlse = attnkit.merge_attention_states([p[0] for p in packed], [p[1] for p in packed])
    assert vout.shape == (10, 4, 16) and vlse.shape == (4, 10)
    assert_close(vout, full.flatten(0, 1), atol=1e-6, rtol=1e-5)
    assert_close(vlse, full_lse.permute(1, 0, 2).flatten(1), atol=1e-6, rtol=1e-5)


def test_empty_parts_are_ignored_and_all_empty_gives_zero():
    out_a, out_b = rand(1, 3, 2, 4, seed=1), rand(1, 3, 2, 4, seed=2)
    lse_a, lse_b = rand(1, 2, 3, seed=3), torch.full((1, 2, 3), NEG_INF, dtype=torch.float64)
    out_b[0, 1] = float("nan")  # an empty part's out is never read
    out, lse = attnkit.merge_attention_states([out_a, out_b], [lse_a, lse_b])
    assert torch.equal(out, out_a) and torch.equal(lse, lse_a)
    lse_a[0, 1, 2] = NEG_INF  # row (query 2, head 1): empty in every part
    out, lse = attnkit.merge_attention_states([out_a, out_b], [lse_a, lse_b])
    assert torch.equal(out[0, 2, 1], torch.zeros(4, dtype=torch.float64)) and lse[0, 1, 2] == NEG_INF
    assert torch.equal(out[0, :2], out_a[0, :2])


def test_nan_reaches_only_its_rows():
    outs = [rand(1, 3, 2, 4, seed=i) for i in range(3)]
    lses = [rand(1, 2, 3, seed=10 + i) for i in range(3)]
    lses[1][0, 0, 1] = float("nan")  # query 1, head 0
    outs[2][0, 2, 1, 3] = float("nan")  # query 2, head 1, channel 3
    out, lse = attnkit.merge_attention_states(outs, lses)
    assert torch.isnan(out[0, 1, 0]).all() and torch.isnan(lse[0, 0, 1])
    assert torch.isnan(out[0, 2, 1, 3]) and not torch.isnan(out[0, 2, 1, :3]).any()
    nan_rows = torch.zeros(1, 3, 2, 4, dtype=torch.bool)
    nan_rows[0, 1, 0], nan_rows[0, 2, 1, 3] = True, True
    assert not torch.isnan(out[~nan_rows]).any()


def test_single_part_stacked_input_and_out_dtype():
    out1, lse1 = rand(2, 3, 2, 4, seed=1, dtype=torch.bfloat16), rand(2, 2, 3, seed=2, dtype=torch.float32)
    out, lse = attnkit.merge_attention_states([out1], [lse1])
    assert torch.equal(out, out1) and torch.equal(lse, lse1) and lse.dtype == torch.float32
    outs = [rand(2, 3, 2, 4, seed=i, dtype=torch.float32) for i in range(3)]
    lses = [rand(2, 2, 3, seed=9 + i, dtype=torch.float32) for i in range(3)]
    listed = attnkit.merge_attention_states(outs, lses, out_dtype=torch.bfloat16)
    stacked = attnkit.merge_attention_states(torch.stack(outs), torch.stack(lses), out_dtype=torch.bfloat16)
    assert listed[0].dtype == torch.bfloat16 and torch.equal(listed[0], stacked[0])
    assert torch.equal(listed[1], stacked[1])
    exact = attnkit.merge_attention_states([o.double() for o in outs], [x.double() for x in lses])
    assert_close(listed[0], exact[0], atol=1e-2, rtol=1e-2)


def test_gradients():
    """The autograd formula against finite differences, in float64 (out and lse both used)."""
    outs = [rand(1, 3, 2, 4, seed=i, requires_grad=True) for i in range(3)]
    lses = [rand(1, 2, 3, seed=9 + i, requires_grad=True) for i in range(3)]

    def f(*tensors):
        out, lse = attnkit.merge_attention_states(list(tensors[:3]), list(tensors[3:]))
        return out, lse

    torch.autograd.gradcheck(f, (*outs, *lses))
    with_empty = [x.detach().clone() for x in lses]
    with_empty[1][0, 1] = NEG_INF
    leaves = [x.requires_grad_() for x in (*[o.detach().clone() for o in outs], *with_empty)]
    out, lse = f(*leaves)
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    assert torch.equal(leaves[1].grad[0, :, 1], torch.zeros_like(leaves[1].grad[0, :, 1]))  # empty part: no grad


def test_opcheck():
    args = (rand(2, 1, 3, 2, 4, dtype=torch.float32), rand(2, 1, 2, 3, dtype=torch.float32), torch.float32,
            "reference")  # fmt: skip
    torch.library.opcheck(torch.ops.attnkit.merge_states.default, args)


BAD = {
    "empty_list": (dict(outs=[], lses=[]), InvalidArgumentTypeError, ["outs", "non-empty"]),
    "not_tensors": (dict(outs="x", lses="y"), InvalidArgumentTypeError, ["outs", "str"]),
    "part_mismatch": (
        dict(outs=[torch.zeros(1, 3, 2, 4), torch.zeros(1, 4, 2, 4)], lses=[torch.zeros(1, 2, 3)] * 2),
        InvalidArgumentError,
        ["outs[1]", "(1, 4, 2, 4)", "(1, 3, 2, 4)"],
    ),
    "lse_layout": (
        dict(outs=[torch.zeros(1, 3, 2, 4)] * 2, lses=[torch.zeros(1, 3, 2)] * 2),
        InvalidArgumentError,
        ["lses", "(1, 2, 3)", "(1, 3, 2)"],
    ),
    "count_mismatch": (
        dict(outs=[torch.zeros(1, 3, 2, 4)] * 2, lses=[torch.zeros(1, 2, 3)] * 3),
        InvalidArgumentError,
        ["2 parts", "got 3"],
    ),
    "int_out": (
        dict(outs=[torch.zeros(1, 3, 2, 4, dtype=torch.int32)], lses=[torch.zeros(1, 2, 3)]),
        InvalidArgumentTypeError,
        ["outs dtype", "int32"],
    ),
    "rank": (dict(outs=[torch.zeros(3, 4)], lses=[torch.zeros(3)]), InvalidArgumentError, ["outs[0]", "(3, 4)"]),
    "out_dtype": (
        dict(outs=[torch.zeros(1, 3, 2, 4)], lses=[torch.zeros(1, 2, 3)], out_dtype=torch.int8),
        InvalidArgumentTypeError,
        ["out_dtype", "int8"],
    ),
    "zero_parts": (
        dict(outs=torch.zeros(0, 1, 3, 2, 4), lses=torch.zeros(0, 1, 2, 3)),
        InvalidArgumentError,
        ["no parts"],
    ),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input(name):
    kw, exc, needles = BAD[name]
    with pytest.raises(exc) as info:
        attnkit.merge_attention_states(**kw)
    assert all(n in str(info.value) for n in needles), str(info.value)


def test_auto_picks_the_reference_on_cpu_and_empty_rows(monkeypatch):
    from attnkit.backends.reference import backend as reference_backend

    calls = []
    real = reference_backend.ReferenceBackend.merge_states

    def spy(self, *args):
        calls.append(args[0].shape)
        return real(self, *args)

    monkeypatch.setattr(reference_backend.ReferenceBackend, "merge_states", spy)
    out, lse = attnkit.merge_attention_states([torch.zeros(0, 3, 2, 4)], [torch.zeros(0, 2, 3)])
    assert out.shape == (0, 3, 2, 4) and lse.shape == (0, 2, 3)
    assert calls == [(1, 0, 3, 2, 4)]
