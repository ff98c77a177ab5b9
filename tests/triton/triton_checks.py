"""Helpers shared by the Triton tests (CPU interpreter and GPU): build a case, run the backend directly, and
check it against float64 with flash-attn's tolerance rule.

The exact answer is :func:`attnkit.testing.attention_naive` in float64 (one einsum over the whole score matrix,
gradients by autograd), which shares no code with the kernels; the "plain" error is the same computation in
the inputs' dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from attnkit.params import AttentionParams, VarlenInfo
from attnkit.registry import REGISTRY
from attnkit.testing import attention_naive, max_abs_error

# Added to the tolerance rule's bound; the rule itself scales with plain PyTorch's error in the same dtype.
ATOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 2e-5}


def backend(name: str = "triton_cuda"):
    return REGISTRY.get(name)


@dataclass
class Case:
    b: int = 2
    sq: int = 37
    sk: int = 37
    hq: int = 2
    hk: int = 1
    d: int = 40
    dv: int | None = None
    dtype: torch.dtype = torch.float16
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi: str | None = None  # None, "h" (Hq,) or "bh" (B, Hq)
    dropout_p: float = 0.0
    deterministic: bool = False  # AttentionParams.deterministic (a bitwise reproducible backward)
    seed: int = 0
    device: str = "cpu"
    scale: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def head_dim_v(self) -> int:
        return self.d if self.dv is None else self.dv

    def params(self) -> AttentionParams:
        left, right = self.window
        if self.causal:
            right = 0
        return AttentionParams(
            softmax_scale=self.scale if self.scale is not None else 1.0 / math.sqrt(self.d),
            causal=self.causal, window_left=left, window_right=right, softcap=self.softcap,
            dropout_p=self.dropout_p, dropout_seed=0x1234_5678_9ABC + self.seed if self.dropout_p else 0,
            deterministic=self.deterministic,
        )  # fmt: skip

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """q, k, v, dout and the ALiBi slopes (or None), fresh random values from this case's seed."""
        gen = torch.Generator().manual_seed(1000 + self.seed)

        def rnd(*shape):
            return torch.randn(*shape, generator=gen, dtype=torch.float64).to(self.dtype).to(self.device)

        q = rnd(self.b, self.sq, self.hq, self.d)
        k = rnd(self.b, self.sk, self.hk, self.d)
        v = rnd(self.b, self.sk, self.hk, self.head_dim_v)
        dout = rnd(self.b, self.sq, self.hq, self.head_dim_v)
        slopes = None
        if self.alibi == "h":
            slopes = (torch.rand(self.hq, generator=gen) * 0.5).to(self.device)
        elif self.alibi == "bh":
            slopes = (torch.rand(self.b, self.hq, generator=gen) * 0.5).to(self.device)
        return q, k, v, dout, slopes


def naive(case: Case, q, k, v, slopes, dtype: torch.dtype, batch_offset: int = 0):
    p = case.params()
    return attention_naive(
        q, k, v, softmax_scale=p.softmax_scale, window_size=(p.window_left, p.window_right), alibi_slopes=slopes,
        softcap=p.softcap, dropout_p=p.dropout_p, dropout_seed=p.dropout_seed, return_lse=True, dtype=dtype,
        batch_offset=batch_offset,
    )  # fmt: skip


@dataclass
class Report:
    """Errors of the backend and of plain PyTorch against float64, per output."""

    errors: dict[str, tuple[float, float, float]]  # name -> (backend error, allowed, plain error)

    def failures(self) -> list[str]:
        return [f"{n}: err {e:.3g} > allowed {a:.3g} (plain {p:.3g})" for n, (e, a, p) in self.errors.items() if e > a]


def _grads(out: torch.Tensor, inputs: tuple[torch.Tensor, ...], dout: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(out, inputs, dout)


def check_dense(case: Case, name: str = "triton_cuda", grads: bool = True) -> Report:
    """Run forward (+ backward) of backend ``name`` on ``case`` and measure it with the tolerance rule."""
    be = backend(name)
    q, k, v, dout, slopes = case.tensors()
    params = case.params()
    out, lse = be.forward(q, k, v, slopes, params, None)
    exact_in = tuple(t.detach().double().requires_grad_() for t in (q, k, v))
    exact, exact_lse = naive(case, *exact_in, slopes, torch.float64)
    plain_in = tuple(t.detach().clone().requires_grad_() for t in (q, k, v))
    plain, _ = naive(case, *plain_in, slopes, case.dtype)
    errors = {"out": _rule(out, exact, plain, 2.0, case.dtype)}
    errors["lse"] = _lse_error(lse, exact_lse)
    if grads:
        got = be.backward(dout, q, k, v, out, lse, slopes, params, None)
        want = _grads(exact, exact_in, dout.double())
        base = _grads(plain, plain_in, dout)
        for g_name, g, w, p in zip(("dq", "dk", "dv"), got, want, base):
            errors[g_name] = _rule(g, w, p, 3.0, case.dtype)
    return Report(errors)


def _rule(fast, exact, plain, factor, dtype):
    assert fast.shape == exact.shape, (fast.shape, exact.shape)
    err = max_abs_error(fast, exact)
    plain_err = max_abs_error(plain, exact)
    return err, factor * plain_err + ATOL[dtype], plain_err


def _lse_error(lse: torch.Tensor, exact: torch.Tensor) -> tuple[float, float, float]:
    """lse is float32 in every dtype: a few ulps of its magnitude, and -inf exactly where no key is visible."""
    assert lse.dtype == torch.float32 and lse.shape == exact.shape, (lse.dtype, lse.shape, exact.shape)
    exact = exact.detach()
    if not torch.equal(torch.isinf(lse), torch.isinf(exact)) or bool(torch.isnan(lse).any()):
        return float("inf"), 0.0, 0.0
    finite = ~torch.isinf(exact)
    err = float((lse.double() - exact)[finite].abs().max()) if bool(finite.any()) else 0.0
    scale = float(exact[finite].abs().max()) if bool(finite.any()) else 0.0
    return err, 1e-5 * (1.0 + scale), 0.0


def assert_ok(report: Report) -> None:
    failures = report.failures()
    assert not failures, "; ".join(failures)


def varlen_inputs(
    lengths_q: list[int],
    lengths_k: list[int],
    hq: int,
    hk: int,
    d: int,
    dv: int,
    dtype: torch.dtype,
    device: str = "cpu",
    pad: int = 0,
    seed: int = 0,
):
    """Packed q/k/v/dout for the given lengths plus ``pad`` NaN rows past the last sequence."""
    gen = torch.Generator().manual_seed(2000 + seed)
    tq, tk = sum(lengths_q), sum(lengths_k)

    def rnd(rows, heads, dim):
        x = torch.randn(rows + pad, heads, dim, generator=gen, dtype=torch.float64).to(dtype)
        x[rows:] = float("nan")
        return x.to(device)

    cu_q = torch.tensor([0, *torch.tensor(lengths_q).cumsum(0).tolist()], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()], dtype=torch.int32, device=device)
    info = VarlenInfo(cu_q, cu_k, max(lengths_q), max(lengths_k))
    return rnd(tq, hq, d), rnd(tk, hk, d), rnd(tk, hk, dv), rnd(tq, hq, dv), info


def check_varlen(
    case: Case, lengths_q: list[int], lengths_k: list[int], name: str = "triton_cuda", pad: int = 0
) -> Report:
    """Varlen forward/backward against float64 run one sequence at a time (dropout counters use the sequence
    index as batch). Padding rows past the last sequence hold NaN and must come back as 0."""
    be = backend(name)
    q, k, v, dout, info = varlen_inputs(
        lengths_q, lengths_k, case.hq, case.hk, case.d, case.head_dim_v, case.dtype, case.device, pad, case.seed
    )
    _, _, _, _, slopes = Case(
        b=len(lengths_q), hq=case.hq, alibi=case.alibi, seed=case.seed, device=case.device
    ).tensors()
    params = case.params()
    out, lse = be.forward(q, k, v, slopes, params, info)
    dq, dk, dv = be.backward(dout, q, k, v, out, lse, slopes, params, info)
    errors: dict[str, tuple[float, float, float]] = {}
    tq, tk = sum(lengths_q), sum(lengths_k)
    for name_, t, rows in (("out", out, tq), ("dq", dq, tq), ("dk", dk, tk), ("dv", dv, tk)):
        bad = bool(t[:rows].isnan().any()) or bool((t[rows:] != 0).any())
        errors[f"{name_} padding"] = (1.0 if bad else 0.0, 0.0, 0.0)
    worst: dict[str, tuple[float, float, float]] = {}
    cq, ck = info.cu_seqlens_q.tolist(), info.cu_seqlens_k.tolist()
    for bi in range(len(lengths_q)):
        qs, ks = slice(cq[bi], cq[bi + 1]), slice(ck[bi], ck[bi + 1])
        s_slopes = None if slopes is None else (slopes if slopes.dim() == 1 else slopes[bi : bi + 1])
        ex_in = tuple(t[None, s].detach().double().requires_grad_() for t, s in ((q, qs), (k, ks), (v, ks)))
        pl_in = tuple(t[None, s].detach().clone().requires_grad_() for t, s in ((q, qs), (k, ks), (v, ks)))
        ex, ex_lse = naive(case, *ex_in, s_slopes, torch.float64, batch_offset=bi)
        pl, _ = naive(case, *pl_in, s_slopes, case.dtype, batch_offset=bi)
        parts = {"out": (out[qs][None], ex, pl, 2.0)}
        if lengths_q[bi] and lengths_k[bi]:
            d_ex = _grads(ex, ex_in, dout[qs][None].double())
            d_pl = _grads(pl, pl_in, dout[qs][None])
            for g_name, g, w, p in zip(("dq", "dk", "dv"), (dq[qs], dk[ks], dv[ks]), d_ex, d_pl):
                parts[g_name] = (g[None], w, p, 3.0)
        else:
            for g_name, g in (("dq", dq[qs]), ("dk", dk[ks]), ("dv", dv[ks])):
                parts[g_name] = (g[None], torch.zeros_like(g[None], dtype=torch.float64), g[None] * 0, 3.0)
        for key, (fast, exact, plain, factor) in parts.items():
            e = _rule(fast, exact, plain, factor, case.dtype)
            if key not in worst or e[0] - e[1] > worst[key][0] - worst[key][1]:
                worst[key] = e
        lse_b = lse[:, qs][None]  # (1, Hq, Sq_b)
        e = _lse_error(lse_b, ex_lse)
        if "lse" not in worst or e[0] - e[1] > worst["lse"][0] - worst["lse"][1]:
            worst["lse"] = e
    errors.update(worst)
    return Report(errors)
