"""GPU correctness of the warp-specialized Hopper backward (bwd_sm90_ws.cu) against the float64 reference.

Run on an H100/H200 with ``-m gpu``. Gradients follow flash-attn's rule: the kernel's max error against the float64
reference is within 3x that of plain PyTorch in the same low precision (2x for the forward output), plus a small
atol. Every case also checks which backward kernel actually ran, so a silent fallback to bwd_sm90.cu cannot pass
as a test of the new kernel.
"""

from __future__ import annotations

import zlib

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # collected on CPU CI only to be deselected; never run there
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
if torch.cuda.get_device_capability() != (9, 0):
    pytest.skip("bwd_sm90_ws.cu runs on sm_90 (H100/H200) only", allow_module_level=True)

from attnkit.backends.cupy import config, launcher, ws_bwd  # noqa: E402

import attnkit  # noqa: E402
from attnkit.testing import attention_ref, max_abs_error  # noqa: E402

BACKEND = "cupy_cuda"
DEV = "cuda"
ATOL = 2e-3
DTYPES = [torch.float16, torch.bfloat16]
LENGTHS = [1, 37, 113, 128, 203, 1000, 4096]
# Every head dim with its default tiles, and again with each tile ablation (a change of block_m) it builds.
TILES = [
    pytest.param((d, change), id=f"d{d}" + (f"-{name}" if name else ""))
    for d in config.SM90_BWD_HEAD_DIMS
    for name, change in [("", {}), *((n, c) for n, c in config.ws_bwd_ablations(d).items() if "block_m" in c)]
]


@pytest.fixture
def launched(monkeypatch):
    """Names of the kernels the backend launches during the test."""
    names: list[str] = []
    real = launcher.Launcher.__call__

    def spy(self, spec, name, grid, threads, smem, args):
        names.append(name)
        return real(self, spec, name, grid, threads, smem, args)

    monkeypatch.setattr(launcher.Launcher, "__call__", spy)
    monkeypatch.delenv("ATTNKIT_CUPY_WGMMA", raising=False)
    monkeypatch.setenv("ATTNKIT_CUPY_TMA_BWD", "1")  # the default, set against a caller's environment
    return names


_BACKEND_CONFIG = ws_bwd.ws_backward_config  # the backend's own choice, before any test patches it


def _use_tiles(monkeypatch, change: dict) -> None:
    """The backend's warp-specialized backward with these Sm90WsBwdConfig changes (none: its defaults); a later
    call replaces an earlier one instead of stacking on it."""
    import dataclasses

    def patched(*args, **kwargs):
        cfg = _BACKEND_CONFIG(*args, **kwargs)
        return None if cfg is None else dataclasses.replace(cfg, **change)

    monkeypatch.setattr(ws_bwd, "ws_backward_config", patched if change else _BACKEND_CONFIG)


def _poison() -> None:
    for n in (1 << 16, 1 << 20, 1 << 24):
        t = torch.full((n,), float("nan"), device=DEV)
        del t


def _check(name: str, fast: torch.Tensor, exact: torch.Tensor, plain: torch.Tensor, factor: float) -> None:
    assert not fast.isnan().any(), f"{name}: NaN in backend output"
    err = max_abs_error(fast, exact)
    allowed = factor * max_abs_error(plain, exact) + ATOL
    assert err <= allowed, f"{name}: max error {err:.3e} > allowed {allowed:.3e}"


def _inputs(b, sq, sk, hq, hk, d, dtype, seed_key):
    torch.manual_seed(zlib.crc32(repr(seed_key).encode()))
    q = torch.randn(b, sq, hq, d, device=DEV, dtype=dtype)
    k = torch.randn(b, sk, hk, d, device=DEV, dtype=dtype)
    v = torch.randn(b, sk, hk, d, device=DEV, dtype=dtype)
    return q, k, v


def _run(launched, q, k, v, *, expect_ws=True, **kw):
    """Forward + backward through cupy_cuda, the float64 reference and plain low precision; checks all three
    gradients (and the output) by the tolerance rule and which backward kernel ran."""
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    _poison()
    out = attnkit.attention(qs, ks, vs, backend=BACKEND, **kw)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out_ref = attention_ref(q64, k64, v64, **kw)
    ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out_pl = attention_ref(ql, kl, vl, upcast=False, **kw)
    _check("out", out, out_ref, out_pl, 2.0)
    dout = torch.randn_like(out)
    launched.clear()
    _poison()
    out.backward(dout)
    out_ref.backward(dout.double())
    out_pl.backward(dout)
    assert (ws_bwd.KERNEL in launched) == expect_ws, launched
    for name, fast, exact, plain in (
        ("dq", qs.grad, q64.grad, ql.grad),
        ("dk", ks.grad, k64.grad, kl.grad),
        ("dv", vs.grad, v64.grad, vl.grad),
    ):
        _check(name, fast, exact, plain, 3.0)
    return qs.grad, ks.grad, vs.grad


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("length", LENGTHS)
def test_lengths(launched, monkeypatch, length, tile, dtype, causal):
    d, change = tile
    _use_tiles(monkeypatch, change)
    q, k, v = _inputs(1, length, length, 2, 2, d, dtype, (length, d, dtype, causal))
    _run(launched, q, k, v, causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize(
    ("sq", "sk"), [(113, 203), (203, 113), (37, 1000), (1000, 37), (1, 203), (203, 1), (128, 4096)]
)
def test_uneven_lengths(launched, monkeypatch, sq, sk, tile, causal):
    """sq != sk both ways (causal: the diagonal aligned bottom-right, first query rows may see no key)."""
    d, change = tile
    _use_tiles(monkeypatch, change)
    q, k, v = _inputs(2, sq, sk, 4, 2, d, torch.bfloat16, (sq, sk, d, causal))
    _run(launched, q, k, v, causal=causal)


FEATURES = [
    dict(window_size=(17, 5)),
    dict(window_size=(0, 0)),
    dict(window_size=(100, -1)),
    dict(softcap=1.5),
    dict(softcap=30.0, causal=True),
    dict(alibi="head", causal=True),
    dict(alibi="batch"),
    dict(window_size=(33, 0), softcap=2.0, alibi="head"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("case", range(len(FEATURES)))
def test_features(launched, monkeypatch, case, tile, dtype):
    d, change = tile
    _use_tiles(monkeypatch, change)
    kw = dict(FEATURES[case])
    b, hq = 2, 4
    q, k, v = _inputs(b, 203, 1000, hq, 2, d, dtype, (case, d, dtype))
    alibi = kw.pop("alibi", None)
    if alibi == "head":
        kw["alibi_slopes"] = torch.rand(hq, device=DEV) * 0.3
    elif alibi == "batch":
        kw["alibi_slopes"] = torch.rand(b, hq, device=DEV) * 0.3
    _run(launched, q, k, v, **kw)


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize(("hq", "hk"), [(8, 2), (8, 1), (6, 3)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gqa(launched, monkeypatch, hq, hk, causal, tile):
    d, change = tile
    _use_tiles(monkeypatch, change)
    q, k, v = _inputs(2, 300, 517, hq, hk, d, torch.bfloat16, (hq, hk, causal, d))
    _run(launched, q, k, v, causal=causal)


@pytest.mark.parametrize("d", [40, 120])  # padded 65..96 map to kernel dim 96, which this kernel does not build
def test_padded_head_dims(launched, d):
    """Head dims below the kernel's 64/128: TMA zero-fills the columns past d and drops them on the dQ add."""
    q, k, v = _inputs(1, 203, 113, 4, 2, d, torch.float16, (d,))
    _run(launched, q, k, v, causal=True)


def test_strided_inputs(launched):
    """Heads-major storage reaches the tensor maps through its strides; a sliced head dim through a copy."""
    torch.manual_seed(3)
    q = torch.randn(2, 8, 333, 128, device=DEV, dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(2, 333, 4, 160, device=DEV, dtype=torch.bfloat16)[..., :128]
    v = torch.randn(2, 4, 333, 128, device=DEV, dtype=torch.bfloat16).transpose(1, 2)
    _run(launched, q, k, v, causal=True)


@pytest.mark.parametrize("tile", TILES)
def test_long_many_blocks(launched, monkeypatch, tile):
    """Thousands of keys and queries, GQA, causal: many pipeline rounds per CTA, both mbarrier parities."""
    d, change = tile
    _use_tiles(monkeypatch, change)
    q, k, v = _inputs(1, 1500, 4133, 8, 2, d, torch.bfloat16, ("long", d))
    _run(launched, q, k, v, causal=True)


@pytest.mark.parametrize("d", [64, 128])
def test_agrees_with_bwd_sm90(launched, monkeypatch, d):
    """The old and new Hopper backward compute the same gradients up to float rounding of the dQ sums."""
    q, k, v = _inputs(2, 777, 900, 4, 2, d, torch.bfloat16, ("agree", d))
    torch.manual_seed(11)  # the same dout for both runs (the only random draw in _run)
    new = _run(launched, q, k, v, causal=True)
    monkeypatch.setenv("ATTNKIT_CUPY_TMA_BWD", "0")
    torch.manual_seed(11)
    old = _run(launched, q, k, v, expect_ws=False, causal=True)
    assert "attnkit_bwd_sm90" in launched
    # Two bf16 implementations differ by rounding: by no more than the rule allows plain bf16 against float64.
    ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    torch.manual_seed(11)
    dout = torch.randn(q.shape, device=DEV, dtype=q.dtype)
    attention_ref(ql, kl, vl, causal=True, upcast=False).backward(dout)
    attention_ref(q64, k64, v64, causal=True).backward(dout.double())
    for a, b, plain, exact in zip(new, old, (ql.grad, kl.grad, vl.grad), (q64.grad, k64.grad, v64.grad)):
        assert max_abs_error(a, b) <= 3.0 * max_abs_error(plain, exact) + ATOL


@pytest.mark.parametrize("kw", [dict(causal=True), dict(), dict(softcap=5.0, window_size=(300, 40))],
                         ids=["causal", "full", "softcap-window"])  # fmt: skip
@pytest.mark.parametrize("d", [64, 128])
def test_every_schedule_equals_the_serial_one(launched, monkeypatch, d, kw):
    """The default schedule and each ablation of config.ws_bwd_ablations(d) do each CTA's arithmetic in the serial
    schedule's order: dK and dV are bitwise equal (under softcap the early-dV schedule folds tanh' into P^T before
    the product with dP^T, the 16-bit dS^T factor rounds P^T once more, and another query step masks other tiles
    than the serial one's, so there dK, and dV for the step, agree to rounding); dQ (summed across CTAs in no fixed
    order) agrees to rounding."""
    import dataclasses

    q, k, v = _inputs(2, 1100, 1500, 8, 2, d, torch.bfloat16, ("schedule", d, tuple(kw)))
    schedules = {"default": {}, **config.ws_bwd_ablations(d)}
    grads, early, block_m, ds_bf16 = {}, {}, {}, {}
    for name, change in schedules.items():
        _use_tiles(monkeypatch, change)
        variant = dataclasses.replace(config.sm90_ws_bwd_config(d, torch.bfloat16), **change)
        early[name], block_m[name], ds_bf16[name] = variant.early_dv, variant.block_m, variant.ds_bf16
        torch.manual_seed(5)
        grads[name] = _run(launched, q, k, v, **kw)
    dq0, dk0, dv0 = grads.pop("serial")
    for name, (dq1, dk1, dv1) in grads.items():
        if block_m[name] != block_m["serial"]:
            assert max_abs_error(dk1, dk0) <= 1e-2 * dk0.abs().max().item(), name
            assert max_abs_error(dv1, dv0) <= 1e-2 * dv0.abs().max().item(), name
        elif ds_bf16[name] or (early[name] and "softcap" in kw):
            assert max_abs_error(dk1, dk0) <= 1e-2 * dk0.abs().max().item(), name
            assert torch.equal(dv1, dv0), name
        else:
            assert torch.equal(dk1, dk0) and torch.equal(dv1, dv0), name
        assert max_abs_error(dq1, dq0) <= 1e-2 * dq0.abs().max().item(), name


def test_selection_on_this_gpu(launched, monkeypatch):
    """Dense d 64/128 takes the new kernel; the switch, varlen and d = 256 keep the others."""
    q, k, v = (t.requires_grad_() for t in _inputs(1, 64, 64, 2, 2, 128, torch.bfloat16, ("sel",)))
    attnkit.attention(q, k, v, backend=BACKEND).sum().backward()
    assert ws_bwd.KERNEL in launched
    launched.clear()
    monkeypatch.setenv("ATTNKIT_CUPY_TMA_BWD", "0")
    attnkit.attention(q, k, v, backend=BACKEND).sum().backward()
    assert ws_bwd.KERNEL not in launched and "attnkit_bwd_sm90" in launched
    monkeypatch.setenv("ATTNKIT_CUPY_TMA_BWD", "1")
    launched.clear()
    cu = torch.tensor([0, 30, 64], dtype=torch.int32, device=DEV)
    qv, kv, vv = (t.detach()[0].clone().requires_grad_() for t in (q, k, v))
    attnkit.attention_varlen(qv, kv, vv, cu, cu, 34, 34, backend=BACKEND).sum().backward()
    assert ws_bwd.KERNEL not in launched
    launched.clear()
    big = [torch.randn(1, 64, 2, 256, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    attnkit.attention(*big, backend=BACKEND).sum().backward()
    assert ws_bwd.KERNEL not in launched


def test_nan_stays_nan(launched):
    q, k, v = _inputs(1, 130, 130, 2, 2, 64, torch.bfloat16, ("nan",))
    q[0, 5, 1, 3] = float("nan")
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    attnkit.attention(qs, ks, vs, backend=BACKEND).sum().backward()
    assert ws_bwd.KERNEL in launched
    assert qs.grad[0, 5, 1].isnan().any() and ks.grad[0, :, 1].isnan().any()
    assert not qs.grad[0, :, 0].isnan().any()  # the other head is untouched
