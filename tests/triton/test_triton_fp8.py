"""The fp8 Triton kernels through the interpreter, against the exact attention of the dequantized inputs.

Under the interpreter the fp8 forward kernel multiplies in float32 (exact for e4m3 operands) but rounds P to e4m3
exactly as the GPU does (fp8_fwd_kernel.round_to_e4m3, checked bit for bit below), so these tests see the kernel's
own error: masks, GQA descale groups, varlen, both V layouts, block boundaries (interpreter tile 32 x 16). The
split-KV decoding kernel reads fp8 caches and multiplies in bfloat16 on the GPU (float32 here).
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from attnkit.backends.triton.fp8_fwd_kernel import round_to_e4m3
from fp8_checks import Fp8Case, assert_ok, check_dense, check_kvcache, check_varlen

import attnkit
from attnkit import fp8

LENGTHS = [(1, 1), (37, 37), (113, 203), (203, 113), (1, 37), (37, 1)]


@pytest.fixture(params=["transposed", "as_stored"])
def v_layout(request, monkeypatch):
    from attnkit.backends.triton import fp8_launch

    monkeypatch.setattr(fp8_launch, "V_LAYOUT", request.param)
    return request.param


@pytest.mark.parametrize("sq,sk", LENGTHS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_lengths(sq, sk, causal):
    assert_ok(check_dense(Fp8Case(sq=sq, sk=sk, hq=4, hk=2, causal=causal, seed=sq * 7 + sk)))


@pytest.mark.parametrize("sq,sk,causal", [(45, 70, True), (70, 45, False)])
def test_v_layouts(v_layout, sq, sk, causal):
    assert_ok(check_dense(Fp8Case(sq=sq, sk=sk, hq=4, hk=2, d=32, causal=causal, seed=sk)))


@pytest.mark.parametrize("d,dv", [(16, 16), (40, 40), (128, 128), (256, 256), (64, 32), (40, 96)])
def test_head_dims(d, dv):
    assert_ok(check_dense(Fp8Case(b=1, sq=33, sk=50, hq=2, hk=1, d=d, dv=dv, causal=d % 32 == 0, seed=d + dv)))


@pytest.mark.parametrize("window", [(3, 0), (0, 5), (7, 7), (-1, 4), (10, -1)])
@pytest.mark.parametrize("sq,sk", [(37, 53), (53, 37)])
def test_sliding_window(window, sq, sk):
    assert_ok(check_dense(Fp8Case(b=1, sq=sq, sk=sk, d=32, window=window, seed=sum(window) + sq)))


@pytest.mark.parametrize("alibi,softcap", [(None, 2.5), ("h", 0.0), ("bh", 2.5)])
def test_alibi_softcap(alibi, softcap):
    assert_ok(check_dense(Fp8Case(b=2, sq=45, sk=61, d=32, alibi=alibi, softcap=softcap, causal=True, seed=3)))


@pytest.mark.parametrize("hq,hk", [(4, 1), (6, 2), (3, 3)])
def test_gqa_descale_groups(hq, hk):
    """q_descale is per KV head: every query head of a group uses its KV head's factor."""
    assert_ok(check_dense(Fp8Case(b=2, sq=29, sk=47, hq=hq, hk=hk, d=32, causal=True, seed=hq + hk)))


@pytest.mark.parametrize("kw", [dict(q_sign=-1.0), dict(scale=-0.2), dict(scale=0.0), dict(q_sign=-1.0, softcap=3.0)])
def test_negative_and_zero_score_scales(kw):
    """A negative q_descale (or softmax_scale) flips the scores: the running max must be taken after scaling."""
    assert_ok(check_dense(Fp8Case(b=1, sq=40, sk=70, hq=2, hk=1, d=32, seed=5, **kw)))


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32])
def test_out_dtype(out_dtype):
    assert_ok(check_dense(Fp8Case(b=1, sq=40, sk=40, d=32, out_dtype=out_dtype, causal=True, seed=8)))


def test_dropout_draws_the_common_mask():
    assert_ok(check_dense(Fp8Case(b=2, sq=33, sk=47, hq=2, hk=1, d=32, dropout_p=0.3, seed=9)))


def test_forced_tiles():
    """Other tile shapes than the interpreter's default (keys per block > queries per block here), and a TMA tile
    refused where TMA cannot run."""
    from attnkit.backends.triton import configs, fp8_launch

    with fp8_launch.forced_tile(configs.Tile(16, 64, 4, 1)):
        assert_ok(check_dense(Fp8Case(b=1, sq=70, sk=150, hq=2, hk=1, d=32, causal=True, seed=12)))
    with fp8_launch.forced_tile(configs.Tile(64, 64, 4, 1, use_tma=True)), pytest.raises(attnkit.AttnkitError) as info:
        check_dense(Fp8Case(b=1, sq=8, sk=8, d=32))
    assert "TMA" in str(info.value)


def test_fully_masked_rows_zero_and_nan_propagation():
    case = Fp8Case(b=1, sq=70, sk=20, hq=2, hk=2, d=32, causal=True, seed=11)
    (q8, k8, v8), scales, _ = case.inputs()
    q8 = q8.clone()
    q8[0, 65, 1, 3] = float("nan")
    out, lse = attnkit.attention(q8, k8, v8, **scales, causal=True, return_lse=True, backend="triton_cuda")
    assert out[0, :50].eq(0).all() and torch.isneginf(lse[0, :, :50]).all()
    assert out[0, 65, 1].isnan().all() and not out[0, 65, 0].isnan().any()
    assert not out[0, :65].isnan().any() and not out[0, 66:].isnan().any()


@pytest.mark.parametrize(
    "lens_q,lens_k,causal",
    [([37, 0, 50], [37, 13, 61], True), ([5, 33, 1], [40, 33, 0], False), ([64, 17], [17, 64], True)],
)
def test_varlen(v_layout, lens_q, lens_k, causal):
    assert_ok(check_varlen(lens_q, lens_k, d=32, causal=causal, seed=sum(lens_q)))


def test_varlen_window():
    assert_ok(check_varlen([30, 45], [50, 45], d=32, window=(9, 2), seed=4))


@pytest.mark.parametrize("layout", ["contiguous", "batch_idx", "paged"])
@pytest.mark.parametrize("sq", [1, 5])
def test_kvcache(layout, sq):
    assert_ok(check_kvcache(layout, [13, 70, 0], sq=sq, d=32, seed=sq))


def test_kvcache_window_gqa():
    assert_ok(check_kvcache("paged", [40, 90], sq=3, hq=6, hk=2, d=32, window=(20, 0), seed=7))


@pytest.mark.parametrize("backend", ["triton_cuda", "reference"])
@pytest.mark.parametrize("layout,page,num_splits", [("contiguous", 16, 1), ("contiguous", 16, 3), ("paged", 64, 2),
                                                    ("paged", 16, 0)])  # fmt: skip
def test_kvcache_leftpad_and_splits(backend, layout, page, num_splits):
    """cache_leftpad and num_splits with an fp8 cache: one split (the kernel writes out_dtype directly), several
    (float32 partials, combined), pages holding whole key blocks and pages smaller than a block (gathered)."""
    report = check_kvcache(layout, [13, 70, 40], sq=2, d=32, page=page, leftpad=[5, 0, 33], num_splits=num_splits,
                           seed=11, backend=backend)  # fmt: skip
    assert_ok(report)


@triton.jit
def _round_kernel(X, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, round_to_e4m3(tl.load(X + offs)))


def test_interpreter_rounds_p_like_torch():
    """round_to_e4m3 (the interpreter's stand-in for the GPU's float32 -> e4m3 conversion) against torch, on
    every e4m3 value, the midpoints between neighbours (ties to even) and random values over the range of P."""
    grid = torch.arange(256, dtype=torch.uint8).view(fp8.FP8_DTYPE).float()
    grid = grid[grid.isfinite() & (grid >= 0)].sort().values
    mids = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([grid, mids, torch.rand(4000) * 256, torch.rand(2000) * 2**-5, torch.tensor([float("nan")])])
    n = triton.next_power_of_2(x.numel())
    x = torch.cat([x, torch.zeros(n - x.numel())])
    y = torch.empty_like(x)
    _round_kernel[(1,)](x, y, n)
    want = x.to(fp8.FP8_DTYPE).float()
    assert torch.equal(y.isnan(), want.isnan()) and torch.equal(y[~y.isnan()], want[~want.isnan()])


def test_error_of_fp8_p_against_bf16():
    """What rounding P to e4m3 costs, on a causal GQA case: the kernel sits within the bound (2x plain PyTorch
    doing the same rounding) and above plain bfloat16, which keeps P in bfloat16."""
    report = check_dense(Fp8Case(b=2, sq=113, sk=203, hq=4, hk=2, d=64, causal=True, seed=21))
    assert_ok(report)
    err = report.errors["out"][0]
    assert report.bf16_error < err < 8 * report.bf16_error, (err, report.bf16_error)
