"""Helpers of the fp8 tests (Triton under the interpreter and on the GPU; the CuPy fp8 forward on the GPU): build
quantized inputs, run a call through the public API, and measure it with the tolerance rule of docs/fp8.md.

Errors are measured against the exact attention of the dequantized inputs (float64); the bound is twice the error
of plain PyTorch doing the same computation in bfloat16 with P rounded to float8_e4m3fn the way the kernel rounds
it (``attention_fp8_ref(..., upcast=False)``), plus ``ATOL``. The error of plain bfloat16 without that rounding
(``p_fp8=False``) is reported too: it is what the rounding of P costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import attnkit
from attnkit import fp8
from attnkit.testing import attention_fp8_ref, max_abs_error

ATOL = 1e-2  # bfloat16 outputs of magnitude ~1: a couple of ulps, as for bf16 in triton_checks.ATOL
LSE_ATOL = 1e-4
E4M3 = torch.float8_e4m3fn


@dataclass
class Fp8Case:
    b: int = 2
    sq: int = 37
    sk: int = 37
    hq: int = 2
    hk: int = 1
    d: int = 64
    dv: int | None = None
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi: str | None = None  # None, "h" (Hq,) or "bh" (B, Hq)
    dropout_p: float = 0.0
    scale: float | None = None
    out_dtype: torch.dtype = torch.bfloat16
    q_sign: float = 1.0  # -1 flips q_descale: negative scores scale (the row max must follow the sign)
    seed: int = 0
    device: str = "cpu"

    def options(self) -> dict:
        return dict(causal=self.causal, window_size=self.window, softcap=self.softcap, softmax_scale=self.scale)

    def inputs(self) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor], torch.Tensor | None]:
        """(q8, k8, v8), descales, ALiBi slopes. Each (batch row, KV head) slice has its own magnitude, so the
        descales differ between slices and one applied to the wrong slice shows."""
        gen = torch.Generator().manual_seed(2000 + self.seed)
        dv = self.d if self.dv is None else self.dv
        tensors, scales = [], {}
        for name, shape, heads in (
            ("q", (self.b, self.sq, self.hq, self.d), self.hq),
            ("k", (self.b, self.sk, self.hk, self.d), self.hk),
            ("v", (self.b, self.sk, self.hk, dv), self.hk),
        ):
            mag = torch.rand(self.b, 1, self.hk, 1, generator=gen) * 1.5 + 0.5
            x = torch.randn(*shape, generator=gen) * mag.repeat_interleave(heads // self.hk, dim=2)
            x8, descale = fp8.quantize(x, self.hk)
            if name == "q":
                descale = descale * self.q_sign
            tensors.append(x8.to(self.device))
            scales[f"{name}_descale"] = descale.to(self.device)
        slopes = None
        if self.alibi == "h":
            slopes = (torch.rand(self.hq, generator=gen) * 0.5).to(self.device)
        elif self.alibi == "bh":
            slopes = (torch.rand(self.b, self.hq, generator=gen) * 0.5).to(self.device)
        return tuple(tensors), scales, slopes


@dataclass
class Fp8Report:
    errors: dict[str, tuple[float, float, float]]  # name -> (error, allowed, plain error)
    bf16_error: float  # plain bfloat16 without rounding P to fp8, for comparison

    def failures(self) -> list[str]:
        return [f"{n}: err {e:.3g} > allowed {a:.3g} (plain {p:.3g})" for n, (e, a, p) in self.errors.items() if e > a]


def assert_ok(report: Fp8Report) -> None:
    assert not report.failures(), report.failures()


def _entry(fast, exact, plain, factor: float, atol: float) -> tuple[float, float, float]:
    assert fast.shape == exact.shape, (fast.shape, exact.shape)
    err, plain_err = max_abs_error(fast, exact), max_abs_error(plain, exact)
    return err, factor * plain_err + atol, plain_err


def _seeded(fn, seed: int):
    """``fn()`` right after ``torch.manual_seed(seed)``: calls with dropout draw the same seed, so the same mask."""
    torch.manual_seed(seed)
    return fn()


def check_dense(case: Fp8Case, backend: str = "triton_cuda") -> Fp8Report:
    tensors, scales, slopes = case.inputs()
    common = dict(**scales, **case.options(), alibi_slopes=slopes, dropout_p=case.dropout_p, return_lse=True)
    out, lse = _seeded(
        lambda: attnkit.attention(*tensors, **common, out_dtype=case.out_dtype, backend=backend), case.seed
    )
    assert out.dtype == case.out_dtype and lse.dtype == torch.float32
    exact, exact_lse = _seeded(lambda: attention_fp8_ref(*tensors, **common), case.seed)
    plain, plain_lse = _seeded(lambda: attention_fp8_ref(*tensors, **common, upcast=False), case.seed)
    bf16 = _seeded(lambda: attention_fp8_ref(*tensors, **common, upcast=False, p_fp8=False), case.seed)
    errors = {"out": _entry(out, exact, plain, 2.0, ATOL), "lse": _entry(lse, exact_lse, plain_lse, 2.0, LSE_ATOL)}
    return Fp8Report(errors, max_abs_error(bf16[0], exact))


def check_varlen(lens_q, lens_k, hq=4, hk=2, d=64, causal=False, window=(-1, -1), seed=0, device="cpu",
                 backend="triton_cuda") -> Fp8Report:  # fmt: skip
    """Packed sequences against each sequence's dense references (its own row of descales)."""
    gen = torch.Generator().manual_seed(3000 + seed)
    batch = len(lens_q)
    q8, k8, v8 = (
        (torch.randn(sum(lens), heads, d, generator=gen) * 1.5).to(E4M3).to(device)
        for lens, heads in ((lens_q, hq), (lens_k, hk), (lens_k, hk))
    )
    scales = {n: (torch.rand(batch, hk, generator=gen) + 0.5).to(device) for n in fp8.DESCALE_NAMES}
    cq = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=device)
    ck = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=device)
    kw = dict(causal=causal, window_size=window)
    out, lse = attnkit.attention_varlen(
        q8, k8, v8, cq, ck, max(lens_q), max(lens_k), **scales, **kw, return_lse=True, backend=backend
    )
    exact, plain, bf16 = (torch.zeros(out.shape, dtype=torch.float64, device=device) for _ in range(3))
    exact_lse, plain_lse = (torch.full(lse.shape, float("-inf"), dtype=torch.float64, device=device) for _ in range(2))
    for bi in range(batch):
        rq = slice(int(cq[bi]), int(cq[bi + 1]))
        rk = slice(int(ck[bi]), int(ck[bi + 1]))
        if rq.start == rq.stop:
            continue
        one = (q8[None, rq], k8[None, rk], v8[None, rk])
        row = {n: s[bi : bi + 1] for n, s in scales.items()}
        if rk.start == rk.stop:  # no keys: out 0, lse -inf (what the zeros / -inf above already hold)
            continue
        e, el = attention_fp8_ref(*one, **row, **kw, return_lse=True)
        p, pl = attention_fp8_ref(*one, **row, **kw, return_lse=True, upcast=False)
        exact[rq], exact_lse[:, rq], plain[rq], plain_lse[:, rq] = e[0], el[0], p[0].double(), pl[0].double()
        bf16[rq] = attention_fp8_ref(*one, **row, **kw, upcast=False, p_fp8=False)[0].double()
    errors = {"out": _entry(out, exact, plain, 2.0, ATOL), "lse": _entry(lse, exact_lse, plain_lse, 2.0, LSE_ATOL)}
    return Fp8Report(errors, max_abs_error(bf16, exact))


def check_kvcache(layout: str, lens, sq=1, hq=4, hk=2, d=64, page=16, causal=True, window=(-1, -1), seed=0,
                  device="cpu", backend="triton_cuda", leftpad=None, num_splits=0) -> Fp8Report:  # fmt: skip
    """``attention_with_kvcache`` on an fp8 cache (appending two fp8 tokens): ``layout`` is "contiguous",
    "batch_idx" or "paged"; ``leftpad``: per-row cache_leftpad (row b attends to keys leftpad[b] ...);
    ``num_splits`` as in the operator. The split-KV kernel multiplies in bfloat16 (P is not rounded to fp8), so
    its bound is plain bfloat16's error."""
    gen = torch.Generator().manual_seed(4000 + seed)
    b = len(lens)

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen) * 1.5).to(E4M3).to(device)

    q8, k_new, v_new = rnd(b, sq, hq, d), rnd(b, 2, hk, d), rnd(b, 2, hk, d)
    scales = {n: (torch.rand(b, hk, generator=gen) + 0.5).to(device) for n in fp8.DESCALE_NAMES}
    capacity = max(lens) + 2
    kw = dict(causal=causal, window_size=window)
    extra: dict[str, torch.Tensor] = {}
    if layout == "paged":
        per_row = -(-capacity // page)
        k_cache, v_cache = rnd(b * per_row + 1, page, hk, d), rnd(b * per_row + 1, page, hk, d)
        perm = torch.randperm(b * per_row + 1, generator=gen)[: b * per_row]
        extra["block_table"] = perm.view(b, per_row).to(torch.int32).to(device)
    else:
        rows = b + 1 if layout == "batch_idx" else b
        k_cache, v_cache = rnd(rows, capacity + 3, hk, d), rnd(rows, capacity + 3, hk, d)
        if layout == "batch_idx":
            extra["cache_batch_idx"] = torch.randperm(rows, generator=gen)[:b].to(torch.int32).to(device)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    if leftpad is not None:
        extra["cache_leftpad"] = torch.tensor(leftpad, dtype=torch.int32, device=device)
    out, lse = attnkit.attention_with_kvcache(
        q8, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens, **extra, **scales, **kw, return_lse=True,
        num_splits=num_splits, backend=backend,
    )  # fmt: skip
    exact, plain = torch.zeros_like(out, dtype=torch.float64), torch.zeros_like(out, dtype=torch.float64)
    exact_lse, plain_lse = torch.zeros_like(lse, dtype=torch.float64), torch.zeros_like(lse, dtype=torch.float64)
    for bi in range(b):
        n = lens[bi] + 2
        if layout == "paged":
            pages = extra["block_table"][bi].long()
            keys, vals = (c[pages].flatten(0, 1)[:n] for c in (k_cache, v_cache))
        else:
            row = int(extra["cache_batch_idx"][bi]) if layout == "batch_idx" else bi
            keys, vals = k_cache[row, :n], v_cache[row, :n]
        first = 0 if leftpad is None else leftpad[bi]
        keys, vals = keys[first:], vals[first:]
        one = (q8[bi : bi + 1], keys[None], vals[None])
        row_scales = {name: s[bi : bi + 1] for name, s in scales.items()}
        e, el = attention_fp8_ref(*one, **row_scales, **kw, return_lse=True)
        p, pl = attention_fp8_ref(*one, **row_scales, **kw, return_lse=True, upcast=False, p_fp8=False)
        exact[bi], exact_lse[bi], plain[bi], plain_lse[bi] = e[0], el[0], p[0].double(), pl[0].double()
    errors = {"out": _entry(out, exact, plain, 2.0, ATOL), "lse": _entry(lse, exact_lse, plain_lse, 2.0, LSE_ATOL)}
    return Fp8Report(errors, errors["out"][2])
