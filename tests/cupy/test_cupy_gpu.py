"""GPU correctness of the cupy_cuda backend against the float64 reference (run on a CUDA machine with -m gpu).

Every check follows flash-attn's tolerance rule: the backend's max error against the float64 reference must be
within 2x (outputs, LSE) or 3x (gradients) of the error of plain PyTorch computing in the same low precision,
plus a small atol. Inputs are fresh random draws; outputs come from memory poisoned with NaN beforehand.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # collected on CPU CI only to be deselected; never run there
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import attnkit  # noqa: E402
from attnkit.registry import REGISTRY  # noqa: E402
from attnkit.testing import attention_ref, attention_varlen_ref, max_abs_error  # noqa: E402

BACKEND = "cupy_cuda"
DEV = "cuda"
ATOL = 2e-3  # absorbs the rounding of a final bf16/fp16 store on near-zero entries


def _poison() -> None:
    """Leave NaN-filled blocks in PyTorch's caching allocator so outputs the kernels fail to write show up."""
    for n in (1 << 16, 1 << 20, 1 << 22):
        t = torch.full((n,), float("nan"), device=DEV)
        del t


def _check(name: str, fast: torch.Tensor, exact: torch.Tensor, plain: torch.Tensor, factor: float) -> None:
    assert not fast.isnan().any(), f"{name}: NaN in backend output"
    err = max_abs_error(fast, exact)
    allowed = factor * max_abs_error(plain, exact) + ATOL
    assert err <= allowed, f"{name}: max error {err:.3e} > allowed {allowed:.3e}"


def _run_case(b, sq, sk, hq, hk, d, dtype, *, causal=False, window=(-1, -1), softcap=0.0, alibi=False, grad=True):
    torch.manual_seed(zlib.crc32(repr((b, sq, sk, hq, hk, d, causal, window, softcap, alibi, dtype)).encode()))
    q = torch.randn(b, sq, hq, d, device=DEV, dtype=dtype)
    k = torch.randn(b, sk, hk, d, device=DEV, dtype=dtype)
    v = torch.randn(b, sk, hk, d, device=DEV, dtype=dtype)
    slopes = torch.rand(hq, device=DEV) * 0.3 if alibi else None
    kw = dict(causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes, return_lse=True)
    qs, ks, vs = (t.clone().requires_grad_(grad) for t in (q, k, v))
    _poison()
    out, lse = attnkit.attention(qs, ks, vs, backend=BACKEND, **kw)
    q64, k64, v64 = (t.double().requires_grad_(grad) for t in (q, k, v))
    out_ref, lse_ref = attention_ref(q64, k64, v64, **kw)
    ql, kl, vl = (t.clone().requires_grad_(grad) for t in (q, k, v))
    out_pl, lse_pl = attention_ref(ql, kl, vl, upcast=False, **kw)
    _check("out", out, out_ref, out_pl, 2.0)
    finite = lse_ref.isfinite()
    assert torch.equal(lse.isfinite(), finite), "lse: -inf pattern differs from the reference"
    _check("lse", lse[finite], lse_ref[finite].float(), lse_pl.float()[finite], 2.0)
    if not grad:
        return
    dout = torch.randn_like(q)
    _poison()
    out.backward(dout)
    out_ref.backward(dout.double())
    out_pl.backward(dout)
    for name, fast, exact, plain in (
        ("dq", qs.grad, q64.grad, ql.grad),
        ("dk", ks.grad, k64.grad, kl.grad),
        ("dv", vs.grad, v64.grad, vl.grad),
    ):
        _check(name, fast, exact, plain, 3.0)


DTYPES = [torch.float16, torch.bfloat16]
HEAD_DIMS = [32, 64, 96, 128, 256, 40, 72, 200]
# (batch, sq, sk, hq, hk, options)
CASES = [
    (2, 1, 1, 2, 2, {}),
    (1, 37, 37, 4, 4, {"causal": True}),
    (2, 113, 203, 4, 2, {}),
    (1, 203, 113, 6, 2, {"causal": True}),
    (1, 203, 37, 2, 1, {"causal": True}),  # first rows see no key
    (2, 113, 203, 2, 2, {"window": (17, 5)}),
    (1, 203, 203, 2, 2, {"softcap": 1.5}),
    (1, 113, 203, 4, 1, {"alibi": True, "causal": True}),
    (1, 203, 113, 2, 2, {"window": (0, 0), "softcap": 2.0, "alibi": True}),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_grid(dtype, d, case):
    b, sq, sk, hq, hk, opts = CASES[case]
    _run_case(b, sq, sk, hq, hk, d, dtype, **opts)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128])
def test_larger(dtype, causal, d):
    _run_case(2, 1024, 1024, 4, 2, d, dtype, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128, 40])
def test_varlen(dtype, causal, d):
    torch.manual_seed(d + causal)
    lens_q, lens_k = [1, 37, 113, 0, 203], [5, 37, 203, 9, 113]
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    hq, hk = 4, 2
    q = torch.randn(sum(lens_q), hq, d, device=DEV, dtype=dtype)
    k = torch.randn(sum(lens_k), hk, d, device=DEV, dtype=dtype)
    v = torch.randn(sum(lens_k), hk, d, device=DEV, dtype=dtype)
    args = (cu_q, cu_k, max(lens_q), max(lens_k))
    kw = dict(causal=causal, return_lse=True)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    _poison()
    out, lse = attnkit.attention_varlen(qs, ks, vs, *args, backend=BACKEND, **kw)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    out_ref, lse_ref = attention_varlen_ref(q64, k64, v64, *args, **kw)
    ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
    out_pl, _ = attention_varlen_ref(ql, kl, vl, *args, upcast=False, **kw)
    _check("out", out, out_ref, out_pl, 2.0)
    finite = lse_ref.isfinite()
    assert torch.equal(lse.isfinite(), finite)
    assert max_abs_error(lse[finite], lse_ref[finite]) < 1e-2
    dout = torch.randn_like(q)
    out.backward(dout)
    out_ref.backward(dout.double())
    out_pl.backward(dout)
    for name, fast, exact, plain in (("dq", qs.grad, q64.grad, ql.grad), ("dk", ks.grad, k64.grad, kl.grad),
                                     ("dv", vs.grad, v64.grad, vl.grad)):  # fmt: skip
        _check(name, fast, exact, plain, 3.0)


def _is_hopper() -> bool:
    return torch.cuda.get_device_capability() == (9, 0)


def test_hopper_forward_uses_wgmma():
    """On sm_90 the head-dim-64/128 forwards must take the wgmma kernel (the grid above then tests it)."""
    if not _is_hopper():
        pytest.skip(f"the wgmma forward exists for sm_90 only; this GPU is {torch.cuda.get_device_capability()}")
    from attnkit.backends.cupy import backend as cb
    from attnkit.backends.cupy import launcher

    dev = torch.cuda.current_device()
    for d in (40, 64, 128):
        source, _, _ = cb.forward_kernel(d, torch.bfloat16, cb._arch(dev), launcher.max_smem_optin(dev))
        assert source == "fwd_sm90.cu", d


@pytest.mark.parametrize("wgmma", ["0", "1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", [1, 3, 4, 5, 6, 8])
def test_both_forward_kernels(monkeypatch, wgmma, dtype, case):
    """The mma.sync and wgmma forwards agree with the reference on the same cases (on non-Hopper GPUs both
    settings run the mma.sync kernel)."""
    monkeypatch.setenv("ATTNKIT_CUPY_WGMMA", wgmma)
    b, sq, sk, hq, hk, opts = CASES[case]
    for d in (64, 128):
        _run_case(b, sq, sk, hq, hk, d, dtype, grad=False, **opts)


@pytest.mark.parametrize("d", [64, 128])
def test_long_keys_many_tiles(d):
    """Thousands of keys through the two-stage pipeline, uneven lengths, GQA, causal, forward and backward."""
    _run_case(1, 1500, 4133, 8, 2, d, torch.bfloat16, causal=True)


def test_noncontiguous_inputs():
    """Strided views (heads-major storage, a sliced head dim) reach the kernel through their strides or a copy."""
    torch.manual_seed(0)
    base = torch.randn(2, 8, 97, 64, device=DEV, dtype=torch.bfloat16)
    q = base.transpose(1, 2)  # (2, 97, 8, 64), non-contiguous, 16-byte aligned rows
    k = torch.randn(2, 97, 4, 80, device=DEV, dtype=torch.bfloat16)[..., :64]
    v = torch.randn(2, 97, 4, 64, device=DEV, dtype=torch.bfloat16)
    out = attnkit.attention(q, k, v, causal=True, backend=BACKEND)
    ref = attention_ref(q, k, v, causal=True)
    plain = attention_ref(q, k, v, causal=True, upcast=False)
    _check("out", out, ref, plain, 2.0)


def test_runs_on_current_stream():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 256, 2, 64, device=DEV, dtype=torch.float16) for _ in range(3))
    expected = attnkit.attention(q, k, v, backend=BACKEND)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = attnkit.attention(q, k, v, backend=BACKEND)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(got, expected)


def test_property_against_reference_and_triton():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    others = [n for n in ("triton_cuda",) if REGISTRY.get(n).unavailable_reason() is None]

    @hypothesis.settings(max_examples=int(os.environ.get("CUPY_PROPERTY_EXAMPLES", "30")), deadline=None)
    @hypothesis.given(
        b=st.integers(1, 2), sq=st.integers(1, 160), sk=st.integers(1, 160), hk=st.integers(1, 2),
        rep=st.integers(1, 3), d=st.sampled_from([16, 32, 48, 64, 80, 128, 160, 256]),
        causal=st.booleans(), wl=st.integers(-1, 40), wr=st.integers(-1, 40), softcap=st.sampled_from([0.0, 3.0]),
        alibi=st.booleans(), dtype=st.sampled_from(DTYPES),
    )  # fmt: skip
    def prop(b, sq, sk, hk, rep, d, causal, wl, wr, softcap, alibi, dtype):
        window = (wl, 0 if causal else wr)
        _run_case(b, sq, sk, hk * rep, hk, d, dtype, causal=causal, window=window, softcap=softcap, alibi=alibi)
        for other in others:
            torch.manual_seed(0)
            q = torch.randn(b, sq, hk * rep, d, device=DEV, dtype=dtype)
            k = torch.randn(b, sk, hk, d, device=DEV, dtype=dtype)
            v = torch.randn(b, sk, hk, d, device=DEV, dtype=dtype)
            kw = dict(causal=causal, window_size=window, softcap=softcap)
            mine = attnkit.attention(q, k, v, backend=BACKEND, **kw)
            try:
                theirs = attnkit.attention(q, k, v, backend=other, **kw)
            except attnkit.BackendUnsupportedError:
                continue
            ref = attention_ref(q, k, v, **kw)
            assert max_abs_error(mine, ref) <= 2 * max(max_abs_error(theirs, ref), 1e-3) + ATOL

    prop()


def _sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    candidate = Path("/usr/local/cuda/bin/compute-sanitizer")
    return str(candidate) if candidate.exists() else None


def test_compute_sanitizer_memcheck():
    tool = _sanitizer()
    if tool is None:
        pytest.skip("compute-sanitizer not found")
    script = Path(__file__).with_name("sanitizer_case.py")
    proc = subprocess.run(
        [tool, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, str(script)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "ERROR SUMMARY: 0 errors" in log, log[-4000:]
    assert "sanitizer case ok" in log


def test_scale_matches_math():
    """softmax_scale other than 1/sqrt(d) reaches the kernel (forward and backward)."""
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 64, 2, 64, device=DEV, dtype=torch.float16) for _ in range(3))
    out = attnkit.attention(q, k, v, softmax_scale=0.3, backend=BACKEND)
    ref = attention_ref(q, k, v, softmax_scale=0.3)
    plain = attention_ref(q, k, v, softmax_scale=0.3, upcast=False)
    _check("out", out, ref, plain, 2.0)
