"""The fp8 Triton kernels on a real GPU (sm_90) at real sizes: ``pytest -m gpu tests/triton/test_triton_fp8_gpu.py``.

Same bound as the interpreter tests (tests/fp8_checks.py, docs/fp8.md): error against the exact attention
of the dequantized inputs at most twice plain bfloat16 PyTorch rounding P to e4m3 the same way, + 0.01. On the GPU
the products run on fp8 tensor cores (wgmma, fast accumulation), the rounding of P is the hardware's, and TMA,
both V layouts and the split-KV decoding kernel's fp8 reads are exercised.
"""

from __future__ import annotations

import pytest
import torch
from fp8_checks import Fp8Case, assert_ok, check_dense, check_kvcache, check_varlen

import attnkit
from attnkit import fp8

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
        reason="needs a CUDA GPU with compute capability >= 9.0 (fp8 tensor cores)",
    ),
]

GRID = [
    # (b, sq, sk, hq, hk, d, dv, causal, window, softcap, alibi)
    (2, 2048, 2048, 4, 4, 64, None, False, (-1, -1), 0.0, None),
    (2, 2048, 2048, 4, 4, 64, None, True, (-1, -1), 0.0, None),
    (1, 4096, 4096, 4, 2, 128, None, False, (-1, -1), 0.0, None),
    (1, 4096, 4096, 4, 2, 128, None, True, (-1, -1), 0.0, None),
    (1, 1531, 1531, 4, 2, 96, None, True, (-1, -1), 0.0, None),
    (1, 1024, 1024, 2, 2, 256, None, True, (-1, -1), 0.0, None),
    (1, 2048, 2048, 4, 4, 128, None, False, (256, 0), 0.0, None),
    (1, 2048, 2048, 4, 4, 128, None, False, (-1, -1), 20.0, "bh"),
    (2, 2048, 2048, 8, 2, 128, 64, True, (-1, -1), 0.0, None),
    (1, 1000, 3000, 4, 4, 128, None, True, (-1, -1), 0.0, None),
    (1, 3000, 1000, 4, 4, 128, None, True, (-1, -1), 0.0, None),
    (3, 777, 1201, 6, 3, 80, None, False, (100, 50), 0.0, "h"),
]


@pytest.fixture(params=["transposed", "as_stored"])
def v_layout(request, monkeypatch):
    from attnkit.backends.triton import fp8_launch

    monkeypatch.setattr(fp8_launch, "V_LAYOUT", request.param)
    return request.param


@pytest.mark.parametrize("b,sq,sk,hq,hk,d,dv,causal,window,softcap,alibi", GRID)
def test_against_dequantized_float64(v_layout, b, sq, sk, hq, hk, d, dv, causal, window, softcap, alibi):
    case = Fp8Case(b=b, sq=sq, sk=sk, hq=hq, hk=hk, d=d, dv=dv, causal=causal, window=window, softcap=softcap,
                   alibi=alibi, seed=sq + d, device="cuda")  # fmt: skip
    assert_ok(check_dense(case))


# Head dims landing in each class of the fp8 tile table (padded <= 64, 128, 256), powers of two first (no column
# masks); both qualify for TMA where the class has TMA tiles (whole 16-byte rows).
CLASS_DIMS = {64: (64, 48), 128: (128, 96), 256: (256, 208)}
LENGTHS = ((1024, 1024), (1000, 1000), (777, 1531))


def _tiles():
    from attnkit.backends.triton import fp8_launch

    return [(block_d, tile) for block_d in CLASS_DIMS for tile in fp8_launch.candidates(block_d, tma=True)]


def _tile_id(entry) -> str:
    block_d, t = entry
    return f"d{block_d}-{t.block_m}x{t.block_n}w{t.num_warps}s{t.num_stages}{'-tma' if t.use_tma else ''}"


@pytest.mark.parametrize("entry", _tiles(), ids=_tile_id)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_every_candidate_tile(entry, causal):
    """The autotuner may pick any tile, and the interpreter cannot tell a miscompiled tile from a right one
    (benchmarks/NOTES-triton.md, head dim 256): each runs forced, at lengths that are tile multiples, odd ones and
    unequal ones (not multiples of 16, which triton specialises on). V_LAYOUT is "auto", so these dense Hopper
    calls read V^T whatever the tile (the V layout is chosen before the tile, as under autotuning)."""
    from attnkit.backends.triton import fp8_launch

    block_d, tile = entry
    failures = []
    for d in CLASS_DIMS[block_d]:
        for i, (sq, sk) in enumerate(LENGTHS):
            case = Fp8Case(b=2, sq=sq, sk=sk, hq=4, hk=2, d=d, causal=causal, seed=i + d, device="cuda")
            with fp8_launch.forced_tile(tile):
                report = check_dense(case)
            failures += [f"d={d} {sq}x{sk}: {f}" for f in report.failures()]
    assert not failures, failures


@pytest.mark.parametrize("causal", [False, True])
def test_pointer_path_without_tma(v_layout, monkeypatch, causal):
    from attnkit.backends.triton import fp8_launch

    monkeypatch.setattr(fp8_launch, "_tma_ok", lambda *args: False)
    assert_ok(check_dense(Fp8Case(b=2, sq=2048, sk=2048, hq=4, hk=2, d=128, causal=causal, seed=1, device="cuda")))


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0), reason="TMA is used on sm_90 only"
)
def test_dense_hopper_calls_use_tma():
    from attnkit.backends.triton import fp8_launch, launch

    (q8, k8, v8), _, _ = Fp8Case(b=2, sq=1024, sk=1024, hq=4, hk=2, d=128, device="cuda").inputs()
    prob = launch.problem_of(q8, k8, v8, None)
    assert fp8_launch._tma_ok(prob, k8, fp8_launch._transposed_v(v8, None), True, False)
    assert fp8_launch._tma_ok(prob, k8, v8, False, False)


@pytest.mark.parametrize("kw", [dict(q_sign=-1.0), dict(out_dtype=torch.float32), dict(dropout_p=0.2)])
def test_options(kw):
    assert_ok(check_dense(Fp8Case(b=1, sq=2048, sk=2048, hq=4, hk=2, d=128, seed=2, device="cuda", **kw)))


@pytest.mark.parametrize("causal", [False, True])
def test_varlen(v_layout, causal):
    assert_ok(check_varlen([1000, 0, 2047, 513], [1200, 64, 2047, 0], hq=8, hk=2, d=128, causal=causal,
                           device="cuda"))  # fmt: skip


@pytest.mark.parametrize("layout", ["contiguous", "batch_idx", "paged"])
@pytest.mark.parametrize("sq", [1, 4])
def test_kvcache(layout, sq):
    assert_ok(check_kvcache(layout, [1000, 5000, 77], sq=sq, hq=8, hk=2, d=128, page=64, device="cuda"))


def test_kvcache_repeated_calls_are_bitwise_equal():
    """The second call of a shape goes through the remembered launch (kvcache_launch's plans)."""
    gen = torch.Generator().manual_seed(0)
    q8 = torch.randn(4, 1, 16, 128, generator=gen).to(fp8.FP8_DTYPE).cuda()
    kc, vc = (torch.randn(4, 4096, 4, 128, generator=gen).to(fp8.FP8_DTYPE).cuda() for _ in range(2))
    scales = {n: (torch.rand(4, 4, generator=gen) + 0.5).cuda() for n in fp8.DESCALE_NAMES}
    lens = torch.tensor([100, 4096, 2000, 1], dtype=torch.int32, device="cuda")
    first = attnkit.attention_with_kvcache(q8, kc, vc, cache_seqlens=lens, **scales, backend="triton_cuda")
    second = attnkit.attention_with_kvcache(q8, kc, vc, cache_seqlens=lens, **scales, backend="triton_cuda")
    assert torch.equal(first, second)


def test_auto_picks_triton_and_nan_propagates():
    case = Fp8Case(b=1, sq=1024, sk=1024, hq=4, hk=2, d=128, causal=True, device="cuda")
    (q8, k8, v8), scales, _ = case.inputs()
    spec = attnkit.AttentionSpec(
        op="attention", device_type="cuda", compute_capability=torch.cuda.get_device_capability(), is_hip=False,
        dtype=fp8.FP8_DTYPE, head_dim=128, head_dim_v=128, num_heads_q=4, num_heads_k=2, batch=1, seqlen_q=1024,
        seqlen_k=1024, features=frozenset({"fp8", "gqa", "causal"}),
    )  # fmt: skip
    assert attnkit.dispatch.select_backend_name(spec, "auto") == "triton_cuda"
    q8 = q8.clone()
    q8[0, 700, 3, 5] = float("nan")
    out = attnkit.attention(q8, k8, v8, **scales, causal=True)
    assert out[0, 700, 3].isnan().all() and not out[0, 700, :3].isnan().any()
    assert not out[0, :700].isnan().any() and not out[0, 701:].isnan().any()
