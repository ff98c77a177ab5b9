"""``attnkit check``: every available backend against the float64 reference, on this machine's device.

For each backend and case: forward and backward on fresh random inputs, max errors of out/dq/dk/dv against the
reference run in float64, and pass/fail by flash-attn's rule (error <= 2x, for gradients 3x, the error of plain
PyTorch in the same precision, plus a small atol), and the time per forward+backward call.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import BackendUnsupportedError, NoBackendError
from .ops.attention import attention
from .ops.varlen import attention_varlen
from .registry import REGISTRY
from .testing import attention_ref, attention_varlen_ref, max_abs_error


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    seqlen_q: int
    seqlen_k: int
    heads_q: int
    heads_k: int
    head_dim: int
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi: bool = False
    varlen: bool = False


def default_cases(device: torch.device, large: bool) -> list[Case]:
    s = 1024 if large else 113
    s2 = 512 if large else 37
    d = 128 if large else 64
    odd = 1000 if large else 45  # not a multiple of any tile, nor of 16
    return [
        Case("dense", 2, s, s, 4, 4, d),
        Case("causal Sq<Sk gqa", 2, s2, s, 8, 2, d, causal=True),
        Case("window+softcap+alibi", 1, s, s2, 4, 4, d, window=(32, 8), softcap=20.0, alibi=True),
        Case("varlen causal", 3, s2, s2, 4, 2, d, causal=True, varlen=True),
        Case("causal d256 odd len", 2, odd, odd, 4, 2, 256, causal=True),
    ]


@dataclass
class Row:
    backend: str
    case: str
    dtype: str
    status: str
    errors: dict[str, float]
    allowed: dict[str, float]
    ms: float | None


def _inputs(case: Case, dtype: torch.dtype, device: torch.device, gen: torch.Generator):
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device="cpu").to(device=device, dtype=dtype).requires_grad_()

    if case.varlen:
        lens_q = [max(1, case.seqlen_q - 7 * i) for i in range(case.batch)]
        lens_k = [max(1, case.seqlen_k - 5 * i) for i in range(case.batch)]
        q = rnd(sum(lens_q), case.heads_q, case.head_dim)
        k = rnd(sum(lens_k), case.heads_k, case.head_dim)
        v = rnd(sum(lens_k), case.heads_k, case.head_dim)
        cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=device)
        cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=device)
        return (q, k, v), (cu_q, cu_k, max(lens_q), max(lens_k))
    q = rnd(case.batch, case.seqlen_q, case.heads_q, case.head_dim)
    k = rnd(case.batch, case.seqlen_k, case.heads_k, case.head_dim)
    v = rnd(case.batch, case.seqlen_k, case.heads_k, case.head_dim)
    return (q, k, v), None


def _run(fn, tensors, extra, kwargs, backend):
    if extra is None:
        return fn(*tensors, **kwargs, backend=backend) if backend else fn(*tensors, **kwargs)
    return fn(*tensors, *extra, **kwargs, backend=backend) if backend else fn(*tensors, *extra, **kwargs)


def _fwd_bwd(fn, tensors, extra, kwargs, grad, backend=None):
    out = _run(fn, tensors, extra, kwargs, backend)
    grads = torch.autograd.grad(out, tensors, grad)
    return [out, *grads]


def check_case(
    backend: str, case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0, refs: dict | None = None
) -> Row:
    """One backend on one case. ``refs`` (optional) keeps the reference results between backends: the inputs come
    from ``seed`` alone, so every backend of a case is compared with the same exact and plain answers."""
    gen = torch.Generator().manual_seed(seed)
    tensors, extra = _inputs(case, dtype, device, gen)
    kwargs = dict(causal=case.causal, window_size=case.window, softcap=case.softcap)
    if case.alibi:
        kwargs["alibi_slopes"] = (torch.rand(case.heads_q, generator=gen) * 0.5).to(device)
    fn, ref_fn = (attention_varlen, attention_varlen_ref) if case.varlen else (attention, attention_ref)
    label = str(dtype).removeprefix("torch.")
    try:
        out = _run(fn, tensors, extra, kwargs, backend)
        grad = torch.randn(out.shape, generator=gen).to(device=device, dtype=dtype)
        fast = [out, *torch.autograd.grad(out, tensors, grad)]
    except (BackendUnsupportedError, NoBackendError) as exc:  # the backend declines this case: not a failure
        return Row(backend, case.name, label, f"skip: {str(exc).splitlines()[-1].strip(' -')}", {}, {}, None)
    except Exception as exc:  # it accepted the case and then failed (a compile error, a crash): loud, and go on
        first = (str(exc).splitlines() or [""])[0]
        return Row(backend, case.name, label, f"FAIL: {type(exc).__name__}: {first}", {}, {}, None)
    key = (case, dtype, str(device), seed)
    if refs is not None and key in refs:
        exact, plain = refs[key]
    else:
        exact = _fwd_bwd(lambda *a, **k: ref_fn(*a, **k, upcast=True), tensors, extra, kwargs, grad.double())
        plain = _fwd_bwd(lambda *a, **k: ref_fn(*a, **k, upcast=False), tensors, extra, kwargs, grad)
        if refs is not None:
            refs[key] = (exact, plain)
    names = ("out", "dq", "dk", "dv")
    errors, allowed, ok = {}, {}, True
    for i, name in enumerate(names):
        factor = 2.0 if name == "out" else 3.0
        atol = 1e-5 if dtype in (torch.float32, torch.float64) else 1e-3
        errors[name] = max_abs_error(fast[i], exact[i])
        allowed[name] = factor * max_abs_error(plain[i], exact[i]) + atol
        ok &= errors[name] <= allowed[name]
    ms = _time(lambda: _fwd_bwd(fn, tensors, extra, kwargs, grad, backend), device)
    return Row(backend, case.name, label, "pass" if ok else "FAIL", errors, allowed, ms)


def _time(fn, device: torch.device, repeats: int = 5) -> float:
    if device.type != "cuda":
        # On the CPU the Triton backends run in the interpreter, seconds a call: the correctness call above was
        # the warm-up, and one more call gives the (indicative) time.
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    fn()  # warm-up: compilation and autotuning stay out of the number
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def run_check(
    backends: Sequence[str] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
    large: bool | None = None,
) -> list[Row]:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtypes is None:
        dtypes = [torch.float16, torch.bfloat16] if device.type == "cuda" else [torch.float32, torch.bfloat16]
    large = device.type == "cuda" if large is None else large
    names = (
        list(backends) if backends else [n for n in REGISTRY.names() if REGISTRY.get(n).unavailable_reason() is None]
    )
    rows, refs = [], {}
    for name in names:
        for dtype in dtypes:
            for case in default_cases(device, large):
                rows.append(check_case(name, case, dtype, device, refs=refs))
    return rows


def format_rows(rows: list[Row]) -> str:
    columns = ("out err", "dq err", "dk err", "dv err", "ms/call")
    header = f"{'backend':<12} {'case':<22} {'dtype':<9} {'status':<6} " + " ".join(f"{c:>9}" for c in columns[:4])
    header += f" {columns[4]:>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        if not r.errors:
            lines.append(f"{r.backend:<12} {r.case:<22} {r.dtype:<9} {r.status}")
            continue
        errs = " ".join(f"{r.errors[n]:>9.2e}" for n in ("out", "dq", "dk", "dv"))
        lines.append(f"{r.backend:<12} {r.case:<22} {r.dtype:<9} {r.status:<6} {errs} {r.ms:>8.2f}")
    passed = sum(r.status == "pass" for r in rows)
    failed = sum(r.status.startswith("FAIL") for r in rows)
    skipped = len(rows) - passed - failed
    lines.append(f"{passed} passed, {failed} failed, {skipped} skipped")
    return "\n".join(lines)
