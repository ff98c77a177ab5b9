"""GPU correctness of the CuPy fp8 forward (fwd_sm90_ws.cu on e4m3 wgmma, with the V^T pass fp8_vt.cu).

The bound is docs/fp8.md's, the one the Triton fp8 kernel meets (tests/fp8_checks.py): error against the exact
attention of the dequantized inputs at most twice plain bfloat16 PyTorch rounding P to e4m3 the same way, + 0.01.
Each case asserts that the fp8 kernel is what ran (the launcher's per-kernel counter). Needs an sm_90 GPU.
"""

from __future__ import annotations

import dataclasses
import zlib

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # collected on CPU CI only to be deselected; never run there
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
if torch.cuda.get_device_capability() != (9, 0):
    pytest.skip("the CuPy fp8 forward exists for sm_90 only", allow_module_level=True)

from attnkit.backends.cupy import backend as cb  # noqa: E402
from attnkit.backends.cupy import config, launcher, ws_fwd  # noqa: E402
from fp8_checks import Fp8Case, assert_ok, check_dense  # noqa: E402

import attnkit  # noqa: E402
from attnkit import fp8  # noqa: E402
from attnkit.params import AttentionParams  # noqa: E402
from attnkit.testing import attention_fp8_ref, max_abs_error  # noqa: E402

BACKEND = "cupy_cuda"


@pytest.fixture(autouse=True)
def _kernels_on(monkeypatch):
    monkeypatch.delenv("ATTNKIT_CUPY_TMA", raising=False)
    monkeypatch.delenv("ATTNKIT_CUPY_WGMMA", raising=False)


@pytest.mark.parametrize(
    ("b", "sk", "hk", "d", "strided"),
    [
        (1, 1, 1, 128, False),
        (2, 37, 2, 16, False),
        (2, 203, 3, 48, True),
        (1, 4096, 2, 128, True),
        (3, 100, 1, 96, False),
    ],
)
def test_vt_pass_equals_the_reference(b, sk, hk, d, strided):
    gen = torch.Generator(device="cuda").manual_seed(sk + d)
    if strided:  # V inside a packed (b, s, 2, hk, d) KV tensor
        v = (torch.randn(b, sk, 2, hk, d, device="cuda", generator=gen) * 3).to(fp8.FP8_DTYPE)[:, :, 1]
    else:
        v = (torch.randn(b, sk, hk, d, device="cuda", generator=gen) * 3).to(fp8.FP8_DTYPE)
    vt = ws_fwd.transposed_v(launcher.Launcher(v.device), cb._arch(v.device.index or 0), v)
    torch.cuda.synchronize()
    assert torch.equal(vt.view(torch.uint8), ws_fwd.transposed_v_reference(v).view(torch.uint8))


GRID = [
    # (b, sq, sk, hq, hk, d, causal, window, softcap, alibi)
    (2, 1, 1, 2, 1, 128, False, (-1, -1), 0.0, None),
    (2, 37, 37, 4, 2, 128, False, (-1, -1), 0.0, None),
    (2, 113, 203, 4, 2, 128, True, (-1, -1), 0.0, None),
    (2, 203, 113, 4, 2, 128, True, (-1, -1), 0.0, None),  # rows before the diagonal see no key: 0, lse -inf
    (1, 1, 203, 4, 1, 64, True, (-1, -1), 0.0, None),
    (1, 2048, 2048, 4, 4, 64, False, (-1, -1), 0.0, None),
    (1, 4096, 4096, 4, 2, 128, False, (-1, -1), 0.0, None),
    (1, 4096, 4096, 4, 2, 128, True, (-1, -1), 0.0, None),
    (1, 1531, 1531, 4, 2, 96, True, (-1, -1), 0.0, None),
    (1, 2048, 2048, 4, 4, 128, False, (256, 0), 0.0, None),
    (1, 2048, 2048, 4, 4, 128, False, (-1, -1), 20.0, "bh"),
    (2, 1000, 3000, 8, 2, 128, True, (-1, -1), 0.0, None),
    (1, 3000, 1000, 4, 4, 128, True, (-1, -1), 0.0, None),
    (3, 777, 1201, 6, 3, 80, False, (100, 50), 0.0, "h"),
    (2, 300, 300, 4, 2, 48, False, (-1, -1), 0.0, None),
    (2, 129, 257, 2, 2, 16, True, (-1, -1), 30.0, None),
]


@pytest.mark.parametrize("b,sq,sk,hq,hk,d,causal,window,softcap,alibi", GRID)
def test_against_dequantized_float64(b, sq, sk, hq, hk, d, causal, window, softcap, alibi):
    case = Fp8Case(b=b, sq=sq, sk=sk, hq=hq, hk=hk, d=d, causal=causal, window=window, softcap=softcap,
                   alibi=alibi, seed=sq + sk + d, device="cuda")  # fmt: skip
    before = launcher.LAUNCH_COUNTS[ws_fwd.KERNEL]
    assert_ok(check_dense(case, backend=BACKEND))
    assert launcher.LAUNCH_COUNTS[ws_fwd.KERNEL] == before + 1


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("q_sign", [1.0, -1.0])
def test_output_dtypes_and_negative_descales(out_dtype, q_sign):
    case = Fp8Case(b=2, sq=300, sk=500, hq=4, hk=2, d=128, causal=True, out_dtype=out_dtype, q_sign=q_sign,
                   seed=7, device="cuda")  # fmt: skip
    assert_ok(check_dense(case, backend=BACKEND))


def test_a_nan_in_q_stays_in_its_row():
    case = Fp8Case(b=1, sq=256, sk=256, hq=2, hk=1, d=128, seed=3, device="cuda")
    (q8, k8, v8), scales, _ = case.inputs()
    q8 = q8.clone()
    q8[0, 100, 1, 5] = float("nan")
    out = attnkit.attention(q8, k8, v8, **scales, backend=BACKEND)
    assert torch.isnan(out[0, 100, 1]).all()
    mask = torch.ones_like(out, dtype=torch.bool)
    mask[0, 100, 1] = False
    assert not torch.isnan(out[mask]).any()


def test_the_cupy_and_triton_fp8_kernels_agree():
    case = Fp8Case(b=1, sq=512, sk=512, hq=4, hk=2, d=128, seed=11, device="cuda")
    (q8, k8, v8), scales, _ = case.inputs()
    ran = attnkit.attention(q8, k8, v8, **scales, backend=BACKEND)
    ref = attnkit.attention(q8, k8, v8, **scales, backend="triton_cuda")
    # Two fp8 kernels of the same numerics (P rounded to e4m3 after the same 2^8 shift): close to each other.
    assert (ran.float() - ref.float()).abs().max().item() < 0.05


@pytest.mark.parametrize("variant", sorted(config.fp8_ws_ablations()))
@pytest.mark.parametrize("causal", [False, True])
def test_ablation_variants_meet_the_bound(variant, causal):
    """Every schedule variant the ablation bench times is itself within the bound (and keeps NaN rows NaN)."""
    case = Fp8Case(
        b=2, sq=1000, sk=1500, hq=4, hk=2, d=128, causal=causal, seed=zlib.crc32(variant.encode()) % 1000, device="cuda"
    )
    (q8, k8, v8), scales, _ = case.inputs()
    q8 = q8.clone()
    q8[1, 7, 3, 0] = float("nan")
    cfg = dataclasses.replace(config.fp8_ws_fwd_config(128, torch.bfloat16), **config.fp8_ws_ablations()[variant])
    params = AttentionParams(softmax_scale=128**-0.5, causal=causal, window_right=0 if causal else -1)
    launch = launcher.Launcher(q8.device)
    sc = fp8.Fp8Scales(*scales.values(), torch.bfloat16)
    out, _ = ws_fwd.fp8_forward(launch, cb._arch(q8.device.index or 0), q8, k8, v8, None, params, sc, cfg)
    assert torch.isnan(out[1, 7, 3]).all()
    out[1, 7, 3] = 0
    kw = dict(causal=causal)
    exact = attention_fp8_ref(q8, k8, v8, **scales, **kw)
    plain = attention_fp8_ref(q8, k8, v8, **scales, **kw, upcast=False)
    exact[1, 7, 3], plain[1, 7, 3] = 0, 0
    assert max_abs_error(out, exact) <= 2 * max_abs_error(plain, exact) + 0.01
