"""GPU correctness of the warp-specialised Hopper forward (fwd_sm90_ws.cu) against the float64 reference.

Every check follows flash-attn's rule: the kernel's max error against the float64 reference must be within 2x
(outputs, LSE) or 3x (gradients, which run the unchanged backward on this forward's LSE) of plain PyTorch's error
in the same low precision, plus a small atol. Each case also asserts that the WS kernel is what ran, through the
launcher's per-kernel launch counter. Needs an sm_90 GPU (H100/H200); skipped elsewhere.
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
    pytest.skip("the warp-specialised forward exists for sm_90 only", allow_module_level=True)

from attnkit.backends.cupy import config, launcher, ws_fwd  # noqa: E402

import attnkit  # noqa: E402
from attnkit.params import AttentionParams  # noqa: E402
from attnkit.testing import attention_ref, max_abs_error  # noqa: E402

BACKEND = "cupy_cuda"
DEV = "cuda"
ATOL = 2e-3  # absorbs the rounding of a final bf16/fp16 store on near-zero entries
DTYPES = [torch.float16, torch.bfloat16]
LENGTHS = (1, 37, 113, 128, 203, 1000, 4096)


@pytest.fixture(autouse=True)
def _ws_on(monkeypatch):
    monkeypatch.delenv("ATTNKIT_CUPY_TMA", raising=False)
    monkeypatch.delenv("ATTNKIT_CUPY_WGMMA", raising=False)
    # Head dim 64 normally takes this kernel only from 8k keys on: here it serves every length.
    monkeypatch.setattr(config, "SM90_WS_D64_MIN_SEQLEN_K", 0)


@pytest.mark.parametrize(("d", "sk", "ws"), [(64, 4096, False), (64, 8192, True), (128, 203, True)])
def test_auto_picks_the_kernel_by_head_dim_and_keys(monkeypatch, d, sk, ws):
    monkeypatch.setattr(config, "SM90_WS_D64_MIN_SEQLEN_K", 8192)
    q, k, v = _inputs(1, 64, sk, 2, 2, d, torch.bfloat16, ("route", d, sk))
    before = launcher.LAUNCH_COUNTS[ws_fwd.KERNEL]
    attnkit.attention(q, k, v, backend=BACKEND)
    torch.cuda.synchronize()
    assert launcher.LAUNCH_COUNTS[ws_fwd.KERNEL] == before + int(ws)


def _poison() -> None:
    """Leave NaN-filled blocks in PyTorch's caching allocator so outputs the kernel fails to write show up."""
    for n in (1 << 16, 1 << 20, 1 << 24):
        t = torch.full((n,), float("nan"), device=DEV)
        del t


def _check(name: str, fast: torch.Tensor, exact: torch.Tensor, plain: torch.Tensor, factor: float) -> None:
    assert not fast.isnan().any(), f"{name}: NaN in kernel output"
    err = max_abs_error(fast, exact)
    allowed = factor * max_abs_error(plain, exact) + ATOL
    assert err <= allowed, f"{name}: max error {err:.3e} > allowed {allowed:.3e}"


def _inputs(b, sq, sk, hq, hk, d, dtype, seed_key, layout="bshd"):
    torch.manual_seed(zlib.crc32(repr(seed_key).encode()))
    if layout == "bshd":
        q = torch.randn(b, sq, hq, d, device=DEV, dtype=dtype)
        k = torch.randn(b, sk, hk, d, device=DEV, dtype=dtype)
        v = torch.randn(b, sk, hk, d, device=DEV, dtype=dtype)
    else:  # heads-major storage viewed as (b, s, h, d), and K/V packed into one buffer
        q = torch.randn(b, hq, sq, d, device=DEV, dtype=dtype).transpose(1, 2)
        kv = torch.randn(b, sk, 2, hk, d, device=DEV, dtype=dtype)
        k, v = kv[:, :, 0], kv[:, :, 1]
    return q, k, v


def _run(b, sq, sk, hq, hk, d, dtype, *, causal=False, window=(-1, -1), softcap=0.0, alibi=False, grad=False,
         layout="bshd"):  # fmt: skip
    key = (b, sq, sk, hq, hk, d, dtype, causal, window, softcap, alibi, layout)
    q, k, v = _inputs(b, sq, sk, hq, hk, d, dtype, key, layout)
    slopes = torch.rand(hq, device=DEV) * 0.3 if alibi else None
    kw = dict(causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes, return_lse=True)
    # detach() keeps each tensor's strides, so the strided layouts reach the kernel as they are.
    qs, ks, vs = (t.detach().requires_grad_(grad) for t in (q, k, v))
    _poison()
    before = launcher.LAUNCH_COUNTS[ws_fwd.KERNEL]
    out, lse = attnkit.attention(qs, ks, vs, backend=BACKEND, **kw)
    torch.cuda.synchronize()
    assert launcher.LAUNCH_COUNTS[ws_fwd.KERNEL] == before + 1, "the call did not run fwd_sm90_ws.cu"
    q64, k64, v64 = (t.detach().double().requires_grad_(grad) for t in (q, k, v))
    out_ref, lse_ref = attention_ref(q64, k64, v64, **kw)
    ql, kl, vl = (t.detach().clone().requires_grad_(grad) for t in (q, k, v))
    out_pl, lse_pl = attention_ref(ql, kl, vl, upcast=False, **kw)
    _check("out", out, out_ref, out_pl, 2.0)
    finite = lse_ref.isfinite()
    assert torch.equal(lse.isfinite(), finite), "lse: -inf pattern differs from the reference"
    _check("lse", lse[finite], lse_ref[finite].float(), lse_pl.float()[finite], 2.0)
    if not grad:
        return
    dout = torch.randn_like(out)
    out.backward(dout)
    out_ref.backward(dout.double())
    out_pl.backward(dout)
    for name, fast, exact, plain in (("dq", qs.grad, q64.grad, ql.grad), ("dk", ks.grad, k64.grad, kl.grad),
                                     ("dv", vs.grad, v64.grad, vl.grad)):  # fmt: skip
        _check(name, fast, exact, plain, 3.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("length", LENGTHS)
def test_lengths(length, causal, d, dtype):
    """Square lengths across tile boundaries (1 row; tails of 37/113/203; exactly one tile; many tiles)."""
    b, h = (1, 2) if length >= 1000 else (2, 4)
    _run(b, length, length, h, h, d, dtype, causal=causal)


# (sq, sk): more keys than queries and the other way round, with tile tails on both sides.
UNEQUAL = [(37, 203), (203, 37), (113, 1000), (1000, 113), (128, 4096), (4096, 203), (1, 1000), (1000, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("lens", UNEQUAL, ids=[f"{a}x{b}" for a, b in UNEQUAL])
def test_unequal_lengths(lens, causal, dtype):
    sq, sk = lens
    for d in (64, 128):
        _run(1, sq, sk, 4, 2, d, dtype, causal=causal)  # GQA 2:1 too


FEATURES = [
    {"window": (17, 5)},
    {"window": (256, 0)},
    {"window": (0, 0)},
    {"window": (-1, 64)},
    # Windows wider than the sequences: the kernels' per-row key bounds clamp them.
    {"window": (5000, 2**31 - 1)},
    {"window": (2**31 - 1, 3), "alibi": True},
    {"softcap": 1.5},
    {"softcap": 30.0, "causal": True},
    {"alibi": True},
    {"alibi": True, "causal": True},
    {"window": (100, 0), "softcap": 2.0, "alibi": True},
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("feature", range(len(FEATURES)))
def test_masks_softcap_alibi(feature, d, dtype):
    opts = FEATURES[feature]
    _run(1, 1000, 1000, 4, 4, d, dtype, **opts)
    _run(2, 203, 113, 4, 1, d, dtype, **opts)  # first rows see no key when causal; GQA 4:1


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("d", [40, 80, 96, 72])
def test_other_head_dims(d, dtype):
    """Head dims between the kernel dims run on the 64/128 kernel, TMA zero-filling the columns in between."""
    _run(2, 203, 1000, 4, 2, d, dtype, causal=True)
    _run(1, 1000, 203, 2, 2, d, dtype)


@pytest.mark.parametrize("d", [64, 128])
def test_gqa_groups(d):
    for hq, hk in ((8, 1), (8, 2), (6, 3)):
        _run(2, 500, 700, hq, hk, d, torch.bfloat16, causal=True)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", [64, 128])
def test_strided_inputs(d, causal):
    """Heads-major q and packed K/V reach the kernel through their own strides (no copy)."""
    _run(2, 1000, 1000, 4, 2, d, torch.bfloat16, causal=causal, layout="bhsd")
    _run(1, 203, 37, 4, 4, d, torch.float16, causal=causal, layout="bhsd")


@pytest.mark.parametrize("d", [64, 128])
def test_gradients_through_the_ws_lse(d):
    """The backward consumes this forward's LSE: its gradients check the natural-log convention end to end."""
    _run(2, 1000, 1000, 4, 2, d, torch.bfloat16, causal=True, grad=True)
    _run(1, 203, 500, 4, 4, d, torch.float16, softcap=5.0, alibi=True, grad=True)


def test_fully_masked_rows_and_nan_propagation():
    # Causal with sk < sq: the first sq - sk rows see no key -> zeros and lse = -inf (checked in _run).
    _run(1, 1000, 37, 2, 2, 128, torch.bfloat16, causal=True)
    q, k, v = _inputs(1, 256, 256, 2, 2, 128, torch.bfloat16, "nan")
    q[0, 5, 1, 3] = float("nan")
    out = attnkit.attention(q, k, v, backend=BACKEND)
    assert out[0, 5, 1].isnan().all() and not out[0, :5].isnan().any() and not out[0, 5, 0].isnan().any()


def test_matches_fwd_sm90(monkeypatch):
    """Same inputs through both Hopper forwards: outputs agree to rounding (the schedule differs, not the math)."""
    q, k, v = _inputs(2, 4096, 4096, 8, 2, 128, torch.bfloat16, "both")
    out_ws, lse_ws = attnkit.attention(q, k, v, causal=True, backend=BACKEND, return_lse=True)
    before = launcher.LAUNCH_COUNTS["attnkit_fwd_sm90"]
    monkeypatch.setenv("ATTNKIT_CUPY_TMA", "0")
    out_old, lse_old = attnkit.attention(q, k, v, causal=True, backend=BACKEND, return_lse=True)
    assert launcher.LAUNCH_COUNTS["attnkit_fwd_sm90"] == before + 1
    assert max_abs_error(out_ws, out_old) < 2e-2
    assert max_abs_error(lse_ws, lse_old) < 1e-3


VARIANTS = [(d, name) for d in (64, 128) for name in config.ws_fwd_ablations(d)]


@pytest.mark.parametrize(("d", "variant"), VARIANTS, ids=[f"d{d}-{name}" for d, name in VARIANTS])
def test_ablation_variants(variant, d):
    """Every schedule the benchmark times is itself correct (the lever must not buy speed with errors)."""
    for sq, sk, causal in ((1000, 1000, True), (203, 4096, False), (4096, 113, True)):
        q, k, v = _inputs(2, sq, sk, 4, 2, d, torch.bfloat16, (variant, d, sq, sk))
        cfg = dataclasses.replace(config.sm90_ws_fwd_config(d, torch.bfloat16), **config.WS_FWD_ABLATIONS[variant])
        params = AttentionParams(softmax_scale=d**-0.5, causal=causal, window_right=0 if causal else -1)
        _poison()
        out, lse = ws_fwd.ws_forward(q, k, v, params, cfg)
        ref, lse_ref = attention_ref(q.double(), k.double(), v.double(), causal=causal, return_lse=True)
        plain = attention_ref(q, k, v, causal=causal, upcast=False)
        _check(f"out {variant}", out, ref, plain, 2.0)
        finite = lse_ref.isfinite()
        assert torch.equal(lse.isfinite(), finite)
        assert max_abs_error(lse[finite], lse_ref[finite]) < 1e-2


def test_repeated_calls_are_deterministic():
    q, k, v = _inputs(2, 4096, 4096, 4, 4, 128, torch.bfloat16, "det")
    first = attnkit.attention(q, k, v, causal=True, backend=BACKEND)
    for _ in range(3):
        assert torch.equal(attnkit.attention(q, k, v, causal=True, backend=BACKEND), first)


# The three-consumer tile (192 query rows) through the frontend: every row-block boundary it adds (191/192/193,
# 383/385), the masks, GQA, strides, head dims that run on the 64 kernel, and the backward on its LSE.
WG3_CASES = [
    *[dict(b=2, sq=n, sk=n, causal=c) for n in (1, 37, 191, 192, 193, 385, 1000) for c in (False, True)],
    *[
        dict(b=1, sq=a, sk=n, causal=c)
        for a, n in ((203, 37), (37, 203), (1000, 113), (4096, 203))
        for c in (False, True)
    ],
    *[dict(b=1, sq=1000, sk=1000, **f) for f in FEATURES],
    dict(b=2, sq=500, sk=700, hq=8, hk=1, causal=True),
    dict(b=2, sq=1000, sk=1000, layout="bhsd", causal=True),
    dict(b=2, sq=203, sk=1000, d=40, causal=True),
    dict(b=1, sq=1000, sk=203, d=48, dtype=torch.float16),
    dict(b=2, sq=1000, sk=1000, hk=2, causal=True, grad=True),
]


@pytest.mark.parametrize("case", range(len(WG3_CASES)))
def test_three_consumer_tile(monkeypatch, case):
    monkeypatch.setitem(config.WS_FWD_TILES, 64, config.WS_FWD_ABLATIONS["wg3"])
    assert config.sm90_ws_fwd_config(64, torch.bfloat16).consumers == 3
    kw = dict(WG3_CASES[case])
    b, sq, sk = kw.pop("b"), kw.pop("sq"), kw.pop("sk")
    hq, hk = kw.pop("hq", 4), kw.pop("hk", 4)
    d, dtype = kw.pop("d", 64), kw.pop("dtype", torch.bfloat16)
    _run(b, sq, sk, hq, hk, d, dtype, **kw)
