"""``attnkit check --fuzz SECONDS``: a differential fuzzer of every backend against an independent float64 answer.

Each case is drawn from one integer seed (shape, dtype, mask options, operator), so a failure prints the seed and
``attnkit check --fuzz-replay SEED`` runs exactly that case again. Every available backend that accepts the case
runs it through the public operators (``attention``, ``attention_varlen``, ``attention_with_kvcache``); a backend
that declines (``BackendUnsupportedError``) is counted as not eligible, any other exception is a failure.

The exact answer is :func:`attnkit.testing.attention_naive` in float64 (one einsum over the whole score matrix,
gradients by autograd): it shares no code with the backends. Judging is flash-attn's rule on the whole tensor:
``max|fast - exact| <= factor * max|plain - exact| + atol``, where ``plain`` is the same naive computation in the
inputs' dtype, ``factor`` is 2 for outputs and 3 for gradients, and ``atol`` is an absolute floor (it is what
judges elements whose exact value is 0, such as dq of a row that sees one key). Besides the values it checks:
lse; a repeated call gives the first call's bits (the Triton host fast path); ``deterministic=True`` backwards
are bitwise reproducible; dropout masks follow ``torch.manual_seed``; NaN in varlen padding rows and in cache
slots past the valid lengths never reaches an output; a KV-cache append writes exactly the new slots.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import random
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from . import dropout as dropout_rng
from . import fuzz_fp8
from .errors import BackendUnsupportedError
from .ops.attention import attention
from .ops.kvcache import attention_with_kvcache
from .ops.varlen import attention_varlen
from .registry import REGISTRY
from .testing import attention_naive, max_abs_error

OPS = ("attention", "varlen", "kvcache")
# Absolute floors of the tolerance rule, per dtype (errors of O(1) outputs and gradients). Where the exact gradient
# is 0 (a row that sees one key: dS = P (dP - delta) = 0), plain PyTorch is exactly 0 too and the floor is the whole
# allowance; a fused kernel leaves the float32 rounding of dP - delta there, |dout| |v| sqrt(D) 2^-22 and more with
# tf32x3 products: 2.3e-5 was seen on an H200 for float32 at head dim 200, hence the larger float32 gradient floor.
ATOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 2e-5}
GRAD_ATOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-4}
HEAD_DIMS = (16, 24, 32, 36, 40, 48, 64, 64, 72, 80, 96, 100, 112, 128, 128, 136, 160, 192, 200, 224, 248, 256, 256)
SPECIAL_LENGTHS = (1, 2, 15, 16, 17, 37, 63, 64, 65, 113, 127, 128, 129, 203, 255, 256, 257, 511, 1000, 1023,
                   1024, 1025, 2047, 2049, 3000, 4096)  # fmt: skip
PAGE_SIZES = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Limits:
    """Size bounds of the drawn cases: the float64 answer materialises batch x heads x seqlen_q x seqlen_k."""

    max_seqlen: int = 4096
    max_batch: int = 4
    max_heads_q: int = 16
    max_scores: int = 2**25  # batch * heads_q * seqlen_q * seqlen_k
    max_head_dim: int = 256

    @staticmethod
    def for_device(device: torch.device) -> Limits:
        if device.type == "cuda":
            return Limits()
        # The interpreter runs Triton kernels in numpy: small cases only.
        return Limits(max_seqlen=48, max_batch=2, max_heads_q=4, max_scores=2**13, max_head_dim=64)


@dataclass(frozen=True)
class Case:
    seed: int
    op: str
    dtype: torch.dtype
    batch: int
    seqlen_q: int
    seqlen_k: int  # attention/varlen: keys per sequence (max); kvcache: keys attended (cache + new) at most
    heads_q: int
    heads_k: int
    head_dim: int
    head_dim_v: int
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi: str | None = None  # None, "h" (nheads,) or "bh" (batch, nheads)
    dropout_p: float = 0.0
    deterministic: bool = False
    softmax_scale: float | None = None
    sink: bool = False  # a learnable_sink logit per query head (attention, varlen)
    lengths_q: tuple[int, ...] = ()  # varlen
    lengths_k: tuple[int, ...] = ()
    cache_lens: tuple[int, ...] = ()  # kvcache: tokens in each cache row before the append
    new_len: int = 0  # kvcache: appended tokens (0: no append)
    capacity: int = 0  # kvcache: slots per cache row
    page_size: int = 0  # kvcache: 0 = contiguous cache
    batch_idx: tuple[int, ...] = ()  # kvcache: cache row of each batch row (contiguous caches)
    # float8_e4m3fn inputs with descales (attnkit.fuzz_fp8); ``dtype`` is then the output dtype
    fp8: bool = False
    fp8_flip_q: bool = False  # q_descale negated: the scores change sign

    @property
    def label(self) -> str:
        """The operator, marked ``/fp8`` for fp8 cases (the summary counts them apart)."""
        return f"{self.op}/fp8" if self.fp8 else self.op

    def describe(self) -> str:
        opts = [f"causal={self.causal}"] if self.causal else []
        if self.window != (-1, -1):
            opts.append(f"window={self.window}")
        if self.softcap:
            opts.append(f"softcap={self.softcap:g}")
        if self.alibi:
            opts.append(f"alibi={self.alibi}")
        if self.dropout_p:
            opts.append(f"dropout={self.dropout_p}")
        if self.deterministic:
            opts.append("deterministic")
        if self.softmax_scale is not None:
            opts.append(f"scale={self.softmax_scale:.3g}")
        if self.sink:
            opts.append("sink")
        if self.fp8:
            opts.append("fp8 (negated q_descale)" if self.fp8_flip_q else "fp8")
        shape = f"B={self.batch} Sq={self.seqlen_q} Sk={self.seqlen_k} Hq={self.heads_q} Hk={self.heads_k} "
        shape += f"D={self.head_dim} Dv={self.head_dim_v}"
        if self.op == "varlen":
            shape += f" lens_q={list(self.lengths_q)} lens_k={list(self.lengths_k)}"
        if self.op == "kvcache":
            shape += f" cache_lens={list(self.cache_lens)} new={self.new_len} capacity={self.capacity}"
            shape += f" page={self.page_size}" if self.page_size else ""
            shape += f" batch_idx={list(self.batch_idx)}" if self.batch_idx else ""
        dtype = str(self.dtype).removeprefix("torch.")
        if self.fp8:
            dtype = f"float8_e4m3fn->{dtype}"
        return f"{self.op} {dtype} {shape} {' '.join(opts)}".strip()


def _length(rng: random.Random, limit: int) -> int:
    if rng.random() < 0.5:
        choices = [n for n in SPECIAL_LENGTHS if n <= limit]
        return rng.choice(choices)
    return max(1, min(limit, int(math.exp(rng.uniform(0.0, math.log(limit + 1))))))


# Share of fp8 cases where a fuzzed backend takes them. Drawn from a generator of their own, so the other fields of a
# seed's case are the same whether fp8 cases are drawn or not.
FP8_SHARE = 0.15


def draw_case(seed: int, limits: Limits, ops: Sequence[str] = OPS, fp8: bool = False) -> Case:
    """The case of ``seed``: a pure function of the seed, the limits, the operators and ``fp8`` (whether fp8 cases
    may be drawn: some fuzzed backend declares them)."""
    rng = random.Random(seed)
    op = rng.choices(list(ops), weights=[{"attention": 55, "varlen": 25, "kvcache": 20}[o] for o in ops])[0]
    dtype = rng.choices([torch.float16, torch.bfloat16, torch.float32], weights=[40, 40, 20])[0]
    dims = [d for d in HEAD_DIMS if d <= limits.max_head_dim]
    head_dim = rng.choice(dims)
    head_dim_v = head_dim if rng.random() < 0.85 else rng.choice(dims)
    heads_k = rng.choice([1, 1, 2, 3, 4])
    group = rng.choice([g for g in (1, 1, 2, 4, 8) if heads_k * g <= limits.max_heads_q] or [1])
    heads_q = heads_k * group
    batch = rng.randint(1, limits.max_batch)
    seqlen_q = _length(rng, limits.max_seqlen)
    seqlen_k = seqlen_q if rng.random() < 0.4 else _length(rng, limits.max_seqlen)
    if op == "kvcache":
        seqlen_q = min(seqlen_q, rng.choice([1, 1, 1, 2, 4, 16, 64]))
    causal = rng.random() < 0.4
    window = (-1, -1)
    if rng.random() < 0.25:
        reach = 2 * max(seqlen_q, seqlen_k)
        left, right = rng.randint(0, reach), rng.randint(0, reach)
        window = rng.choice([(left, -1), (-1, right), (left, right), (left, 0)])
    softcap = round(rng.uniform(5.0, 50.0), 2) if rng.random() < 0.15 else 0.0
    alibi = rng.choice(["h", "bh"]) if rng.random() < 0.15 else None
    dropout_p = rng.choice([0.1, 0.3]) if op != "kvcache" and rng.random() < 0.1 else 0.0
    deterministic = op != "kvcache" and rng.random() < 0.15
    softmax_scale = round(rng.uniform(0.02, 0.4), 4) if rng.random() < 0.1 else None
    sink = op != "kvcache" and rng.random() < 0.1
    # Shrink until the float64 score matrix fits.
    while batch * heads_q * seqlen_q * seqlen_k > limits.max_scores:
        if batch > 1:
            batch -= 1
        elif heads_q > heads_k:
            heads_q = heads_k * max(1, heads_q // heads_k // 2)
        elif heads_k > 1:
            heads_k = heads_q = heads_k - 1
        else:
            seqlen_q, seqlen_k = max(1, seqlen_q // 2), max(1, seqlen_k // 2)
    case = Case(
        seed, op, dtype, batch, seqlen_q, seqlen_k, heads_q, heads_k, head_dim, head_dim_v, causal, window,
        softcap, alibi, dropout_p, deterministic, softmax_scale, sink,
    )  # fmt: skip
    fp8_rng = random.Random(f"fp8 {seed}")
    if fp8 and fp8_rng.random() < FP8_SHARE:
        # Forward only, no sink (refused with fp8), no dropout (see attnkit.fuzz_fp8).
        case = dataclasses.replace(
            case, fp8=True, fp8_flip_q=fp8_rng.random() < 0.2, dropout_p=0.0, deterministic=False, sink=False
        )
    if op == "varlen":
        lengths_q = tuple(rng.choice([0, 1, rng.randint(1, seqlen_q), seqlen_q]) for _ in range(batch))
        lengths_k = tuple(rng.choice([0, 1, rng.randint(1, seqlen_k), seqlen_k]) for _ in range(batch))
        lengths_q = (*lengths_q[:-1], seqlen_q)  # the longest is what max_seqlen claims
        lengths_k = (*lengths_k[:-1], seqlen_k)
        return dataclasses.replace(case, lengths_q=lengths_q, lengths_k=lengths_k)
    if op == "kvcache":
        new_len = rng.choice([0, 0, seqlen_q, rng.randint(1, 16)])
        page_size = rng.choice(PAGE_SIZES) if rng.random() < 0.4 else 0
        capacity = max(seqlen_k, new_len, 1)
        if page_size:
            capacity = -(-capacity // page_size) * page_size
        room = capacity - new_len
        cache_lens = tuple(rng.choice([0, room, rng.randint(0, room)]) for _ in range(batch))
        batch_idx: tuple[int, ...] = ()
        if not page_size and rng.random() < 0.3:
            batch_idx = tuple(rng.sample(range(batch + 2), batch))
        return dataclasses.replace(
            case, cache_lens=cache_lens, new_len=new_len, capacity=capacity, page_size=page_size, batch_idx=batch_idx
        )
    return case


# ---------------------------------------------------------------------------------------------------------------
# Running and judging one case
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    backend: str
    op: str
    status: str  # "pass", "FAIL", "n/a" (the backend declined the case)
    details: list[str] = field(default_factory=list)


def truncating_bf16(backend: str) -> bool:
    """Whether ``backend`` runs Triton kernels in the interpreter, whose float32 -> bfloat16 casts truncate
    instead of rounding to nearest (pip's triton 3.9; tests/triton/test_triton_attention.py keeps a test that
    catches it): up to one bf16 ulp per stored element, where the GPU rounds to half an ulp."""
    return backend.startswith("triton") and os.environ.get("TRITON_INTERPRET") == "1"


class _Judge:
    """Collects flash-attn-rule comparisons of one backend on one case."""

    def __init__(self, dtype: torch.dtype, backend: str = ""):
        self.dtype = dtype
        self.truncates = dtype == torch.bfloat16 and truncating_bf16(backend)
        self.failures: list[str] = []

    def rule(self, name: str, fast: torch.Tensor, exact: torch.Tensor, plain: torch.Tensor, factor: float,
             atol: float | None = None, slack: torch.Tensor | None = None) -> None:  # fmt: skip
        """``atol``: the absolute floor, when not the dtype's (ATOL / GRAD_ATOL). ``slack``: a per-element bound
        on a rounding the algorithm itself makes and plain PyTorch does not (see :func:`_delta_slack`), allowed on
        top of the rule at each element."""
        if fast.shape != exact.shape:
            self.failures.append(f"{name}: shape {tuple(fast.shape)}, expected {tuple(exact.shape)}")
            return
        err = max_abs_error(fast, exact)
        if slack is not None and math.isfinite(err):
            excess = (fast.detach().double() - exact.detach().double()).abs().nan_to_num(0.0) - slack
            err = max(0.0, float(excess.max())) if excess.numel() else 0.0
        floor = (ATOL if name == "out" else GRAD_ATOL)[self.dtype] if atol is None else atol
        allowed = factor * max_abs_error(plain, exact) + floor
        if self.truncates:
            allowed += _bf16_ulp(float(exact.detach().abs().max())) if exact.numel() else 0.0
        if not err <= allowed:
            self.failures.append(f"{name}: max error {err:.3g} > allowed {allowed:.3g}{_where(fast, exact)}")

    def lse(self, fast: torch.Tensor, exact: torch.Tensor, plain: torch.Tensor | None = None) -> None:
        """Same -inf pattern as ``exact``, and an error within 1e-4 relative; with ``plain`` (fp8 calls, whose
        scores come from reduced-precision products) within ``2 * max|plain - exact| + 1e-4`` instead
        (docs/fp8.md)."""
        exact = exact.detach().double()
        fast = fast.detach().double()
        if fast.shape != exact.shape:
            self.failures.append(f"lse: shape {tuple(fast.shape)}, expected {tuple(exact.shape)}")
            return
        if not torch.equal(torch.isneginf(fast), torch.isneginf(exact)) or bool(torch.isnan(fast).any()):
            self.failures.append("lse: -inf/NaN pattern differs from the exact answer")
            return
        finite = torch.isfinite(exact)
        if bool(finite.any()):
            err = float((fast - exact)[finite].abs().max())
            if plain is None:
                allowed = 1e-4 * (1.0 + float(exact[finite].abs().max()))
            else:
                allowed = 2.0 * float((plain.detach().double() - exact)[finite].abs().max()) + 1e-4
            if err > allowed:
                self.failures.append(f"lse: max error {err:.3g} > allowed {allowed:.3g}")

    def same_bits(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        if not torch.equal(a.nan_to_num(1234.5), b.nan_to_num(1234.5)):
            self.failures.append(f"{name}: not bitwise equal (max diff {max_abs_error(a, b):.3g})")

    def finite(self, name: str, t: torch.Tensor) -> None:
        if bool(torch.isnan(t).any()):
            self.failures.append(f"{name}: NaN leaked from padding or unused cache slots")


def _bf16_ulp(magnitude: float) -> float:
    """The bfloat16 spacing (8 significant bits) at ``magnitude``."""
    if not math.isfinite(magnitude) or magnitude <= 0.0:
        return 0.0
    return 2.0 ** (math.floor(math.log2(magnitude)) - 7)


def _where(fast: torch.Tensor, exact: torch.Tensor) -> str:
    diff = (fast.detach().double() - exact.detach().double()).abs().nan_to_num(float("inf"))
    if diff.numel() == 0:
        return ""
    index = [int(i) for i in torch.unravel_index(diff.argmax(), diff.shape)]
    return f" at {index}"


class _Inputs:
    """Fresh random inputs of a case on a device, reproducible from the case's seed."""

    def __init__(self, case: Case, device: torch.device):
        self.gen = torch.Generator().manual_seed(case.seed)
        self.device = device
        self.dtype = case.dtype

    def randn(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        x = torch.randn(*shape, generator=self.gen, dtype=torch.float64)
        return x.to(dtype or self.dtype).to(self.device)

    def sink(self, case: Case) -> torch.Tensor | None:
        if not case.sink:
            return None
        return (torch.randn(case.heads_q, generator=self.gen, dtype=torch.float64) * 2).float().to(self.device)

    def slopes(self, case: Case) -> torch.Tensor | None:
        if case.alibi is None:
            return None
        shape = (case.heads_q,) if case.alibi == "h" else (case.batch, case.heads_q)
        return (torch.rand(*shape, generator=self.gen) * 0.5).to(self.device)


def _naive_kw(case: Case) -> dict:
    return dict(
        causal=case.causal, softmax_scale=case.softmax_scale, window_size=case.window, softcap=case.softcap,
        return_lse=True,
    )  # fmt: skip


def _op_kw(case: Case) -> dict:
    return dict(causal=case.causal, softmax_scale=case.softmax_scale, window_size=case.window, softcap=case.softcap)


def _check_attention(case: Case, name: str, device: torch.device) -> list[str]:
    inp = _Inputs(case, device)
    q = inp.randn(case.batch, case.seqlen_q, case.heads_q, case.head_dim)
    k = inp.randn(case.batch, case.seqlen_k, case.heads_k, case.head_dim)
    v = inp.randn(case.batch, case.seqlen_k, case.heads_k, case.head_dim_v)
    dout = inp.randn(case.batch, case.seqlen_q, case.heads_q, case.head_dim_v)
    slopes = inp.slopes(case)
    sink = inp.sink(case)
    judge = _Judge(case.dtype, name)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    sink_leaf = None if sink is None else sink.clone().requires_grad_()
    kw = dict(_op_kw(case), alibi_slopes=slopes, dropout_p=case.dropout_p, deterministic=case.deterministic)
    if sink is not None:
        kw["learnable_sink"] = sink_leaf

    def call(inputs):
        torch.manual_seed(case.seed)  # the dropout seed is drawn from the default generator
        return attention(*inputs, **kw, return_lse=True, backend=name)

    out, lse = call(leaves)
    grads = torch.autograd.grad(out, leaves + ([sink_leaf] if sink is not None else []), dout)
    again, again_lse = call(leaves)
    judge.same_bits("out (second call)", again, out)
    judge.same_bits("lse (second call)", again_lse, lse)
    if case.deterministic:
        regrads = torch.autograd.grad(again, leaves, dout)
        for g_name, a, b in zip(("dq", "dk", "dv"), grads, regrads):
            judge.same_bits(f"{g_name} (deterministic rerun)", b, a)
    torch.manual_seed(case.seed)
    seed = dropout_rng.draw_seed() if case.dropout_p else 0
    nkw = dict(_naive_kw(case), alibi_slopes=slopes, dropout_p=case.dropout_p, dropout_seed=seed)
    exact_in = [t.double().requires_grad_() for t in (q, k, v)]
    plain_in = [t.clone().requires_grad_() for t in (q, k, v)]
    if sink is not None:
        exact_in.append(sink.double().requires_grad_())
        plain_in.append(sink.clone().requires_grad_())
    exact, exact_lse = attention_naive(*exact_in[:3], **nkw, learnable_sink=_last(exact_in, sink))
    plain, _ = attention_naive(*plain_in[:3], **nkw, learnable_sink=_last(plain_in, sink))
    judge.rule("out", out, exact, plain, 2.0)
    if not case.dropout_p:
        judge.lse(lse, exact_lse)
    exact_g = torch.autograd.grad(exact, exact_in, dout.double())
    plain_g = torch.autograd.grad(plain, plain_in, dout)
    no_dropout = dict(nkw, dropout_p=0.0)
    sink64 = None if sink is None else sink.double()
    probs = _probabilities(lambda *t: attention_naive(*t, **no_dropout, learnable_sink=sink64)[0], q, k)
    slack = _delta_slack(probs, q, k, exact, dout, _scale(case), case.dtype)
    slacks = (None, None) if slack is None else slack
    for g_name, g, e, p, sl in zip(("dq", "dk", "dv", "dsink"), grads, exact_g, plain_g, (*slacks, None, None)):
        judge.rule(g_name, g, e, p, 3.0, slack=sl)
    return judge.failures


def _scale(case: Case) -> float:
    return case.softmax_scale if case.softmax_scale is not None else case.head_dim**-0.5


def _last(inputs: list[torch.Tensor], sink: torch.Tensor | None) -> torch.Tensor | None:
    return None if sink is None else inputs[-1]


# Per unit of sum_d |dout| |out| of a row: the rounding that dP - delta keeps where it cancels. 16-bit: the stored
# output's rounding. float32: the products' own (dP and delta are float32 dots over the head dim, |dout| |v| sqrt(D)
# 2^-22 per row, see ATOL), which adds up over the rows of one key's dk: the GPU fuzzer (H100, 2026-12-06) found
# dk 2.0e-4 > 1.4e-4 at a key that 2048 query rows see alone (head dim 224); a float32 emulation of that order of
# operations gives 9.4e-5 where float64 gives 1e-13 (tests/test_fuzz.py).
_OUT_ROUNDING = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-22}
_SIGMAS = 6.0  # of the dk bound's statistical term


def _probabilities(naive: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The case's softmax probabilities without dropout, ``(B, Sq, Hq, Sk)`` float64: its exact attention with
    the identity as values (``naive(q, k, v)``: the case's float64 attention output without dropout)."""
    batch, seqlen_k, heads_k, _ = k.shape
    eye = torch.eye(seqlen_k, dtype=torch.float64, device=k.device)
    return naive(q.detach().double(), k.detach().double(), eye[None, :, None, :].expand(batch, seqlen_k, heads_k, -1))


def _delta_slack(probs: torch.Tensor, q: torch.Tensor, k: torch.Tensor, exact: torch.Tensor, dout: torch.Tensor,
                 scale: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:  # fmt: skip
    """Per-element bounds on what FlashAttention's backward owes to the rounding of ``out`` to ``dtype``: it forms
    ``dS = P (dP - delta)`` with ``delta_i = dout_i . out_i`` from the stored (rounded) output, a difference plain
    PyTorch's autograd never forms. Where it cancels (a row that sees one key, with dropout too) that rounding is
    all that is left. With ``u`` the unit roundoff, ``|delta_i error| <= e_i = u sum_d |dout_id| |out_id|``, so
    ``|dq_i error| <= scale e_i sum_j P_ij |k_j|``; ``dk_j`` sums the independent row errors ``scale P_ij q_i
    delta_i error`` (over a GQA group too), bounded by the smaller of their absolute sum and ``_SIGMAS`` standard
    deviations (each rounding uniform within ``u |out|``). ``probs``: :func:`_probabilities` (P without dropout:
    the rounding multiplies P, not the dropped probabilities)."""
    unit = _OUT_ROUNDING.get(dtype)
    if unit is None:
        return None
    q64, k64 = q.detach().double(), k.detach().double()
    weighted = dout.detach().double().abs() * exact.detach().double().abs()
    e = unit * weighted.sum(-1)  # (B, Sq, Hq)
    sd = unit / math.sqrt(3.0) * weighted.square().sum(-1).sqrt()
    group = q.shape[2] // k.shape[2]
    k_rep = k64.abs().repeat_interleave(group, dim=2)
    slack_dq = abs(scale) * e[..., None] * torch.einsum("bihj,bjhd->bihd", probs, k_rep)
    worst = torch.einsum("bihj,bihd->bjhd", probs, e[..., None] * q64.abs())
    variance = torch.einsum("bihj,bihd->bjhd", probs.square(), (sd[..., None] * q64).square())

    def fold(t: torch.Tensor) -> torch.Tensor:  # query heads -> their k head
        return t.unflatten(2, (k.shape[2], group)).sum(3)

    slack_dk = abs(scale) * torch.minimum(fold(worst), _SIGMAS * fold(variance).sqrt())
    return slack_dq, slack_dk


def _check_varlen(case: Case, name: str, device: torch.device) -> list[str]:
    inp = _Inputs(case, device)
    pad = 5  # NaN rows past the last sequence: they belong to no sequence and must not leak
    tq, tk = sum(case.lengths_q), sum(case.lengths_k)

    def packed(rows: int, heads: int, dim: int) -> torch.Tensor:
        x = inp.randn(rows + pad, heads, dim)
        x[rows:] = float("nan")
        return x

    q = packed(tq, case.heads_q, case.head_dim)
    k = packed(tk, case.heads_k, case.head_dim)
    v = packed(tk, case.heads_k, case.head_dim_v)
    dout = packed(tq, case.heads_q, case.head_dim_v).nan_to_num(0.0)
    slopes = inp.slopes(case)
    sink = inp.sink(case)
    cu_q = torch.tensor([0, *itertools.accumulate(case.lengths_q)], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, *itertools.accumulate(case.lengths_k)], dtype=torch.int32, device=device)
    judge = _Judge(case.dtype, name)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    kw = dict(_op_kw(case), alibi_slopes=slopes, dropout_p=case.dropout_p, deterministic=case.deterministic)
    if sink is not None:
        kw["learnable_sink"] = sink  # its gradient is judged on the dense operator

    def call(inputs):
        torch.manual_seed(case.seed)
        return attention_varlen(*inputs, cu_q, cu_k, case.seqlen_q, case.seqlen_k, **kw, return_lse=True,
                                backend=name)  # fmt: skip

    out, lse = call(leaves)
    grads = torch.autograd.grad(out, leaves, dout)
    if case.deterministic:
        again, _ = call(leaves)
        for g_name, a, b in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(again, leaves, dout)):
            judge.same_bits(f"{g_name} (deterministic rerun)", b, a)
    torch.manual_seed(case.seed)
    seed = dropout_rng.draw_seed() if case.dropout_p else 0
    for t_name, t, rows in (("out", out, tq), ("dq", grads[0], tq), ("dk", grads[1], tk), ("dv", grads[2], tk)):
        judge.finite(t_name, t[:rows])
    exact_in = [t[:rows].double().requires_grad_() for t, rows in ((q, tq), (k, tk), (v, tk))]
    plain_in = [t[:rows].clone().requires_grad_() for t, rows in ((q, tq), (k, tk), (v, tk))]

    def per_sequence(inputs, dropout_p: float = case.dropout_p):
        outs, lses = [], []
        cq, ck = cu_q.tolist(), cu_k.tolist()
        for b in range(case.batch):
            qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
            s_slopes = None if slopes is None else (slopes if slopes.dim() == 1 else slopes[b : b + 1])
            o, lse_b = attention_naive(
                inputs[0][None, qs], inputs[1][None, ks], inputs[2][None, ks], **_naive_kw(case),
                alibi_slopes=s_slopes, dropout_p=dropout_p, dropout_seed=seed, batch_offset=b,
                learnable_sink=None if sink is None else sink.to(inputs[0].dtype),
            )  # fmt: skip
            outs.append(o[0])
            lses.append(lse_b[0])
        return torch.cat(outs), torch.cat(lses, dim=-1)

    exact, exact_lse = per_sequence(exact_in)
    plain, _ = per_sequence(plain_in)
    judge.rule("out", out[:tq], exact, plain, 2.0)
    if bool((out[tq:] != 0).any()):
        judge.failures.append("out: padding rows past the last sequence are not 0")
    if not case.dropout_p:
        judge.lse(lse[:, :tq], exact_lse)
    exact_g = torch.autograd.grad(exact, exact_in, dout[:tq].double(), allow_unused=True)
    plain_g = torch.autograd.grad(plain, plain_in, dout[:tq], allow_unused=True)
    slacks = _varlen_delta_slack(case, q[:tq], k[:tk], exact, dout[:tq], cu_q.tolist(), cu_k.tolist(), slopes, sink)
    for g_name, g, e, p, rows, sl in zip(("dq", "dk", "dv"), grads, exact_g, plain_g, (tq, tk, tk), (*slacks, None)):
        e = torch.zeros_like(g[:rows], dtype=torch.float64) if e is None else e
        p = torch.zeros_like(g[:rows]) if p is None else p
        judge.rule(g_name, g[:rows], e, p, 3.0, slack=sl)
    return judge.failures


def _varlen_delta_slack(case: Case, q, k, exact, dout, cq: list[int], ck: list[int], slopes, sink) -> tuple:
    """:func:`_delta_slack` of each sequence of a varlen case, packed like dq and dk."""
    if case.dtype not in _OUT_ROUNDING:
        return None, None
    sink64 = None if sink is None else sink.double()
    parts_q, parts_k = [], []
    for b in range(case.batch):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        if qs.stop == qs.start or ks.stop == ks.start:  # no rows or no keys: nothing cancels
            parts_q.append(torch.zeros_like(q[qs], dtype=torch.float64))
            parts_k.append(torch.zeros_like(k[ks], dtype=torch.float64))
            continue
        s_slopes = None if slopes is None else (slopes if slopes.dim() == 1 else slopes[b : b + 1])

        def naive(*t, s_slopes=s_slopes):
            return attention_naive(*t, **_naive_kw(case), alibi_slopes=s_slopes, learnable_sink=sink64)[0]

        probs = _probabilities(naive, q[None, qs], k[None, ks])
        dq_b, dk_b = _delta_slack(probs, q[None, qs], k[None, ks], exact[None, qs], dout[None, qs], _scale(case),
                                  case.dtype)  # fmt: skip
        parts_q.append(dq_b[0])
        parts_k.append(dk_b[0])
    return torch.cat(parts_q), torch.cat(parts_k)


def _check_kvcache(case: Case, name: str, device: torch.device) -> list[str]:
    inp = _Inputs(case, device)
    rows = (max(case.batch_idx) + 1) if case.batch_idx else case.batch
    q = inp.randn(case.batch, case.seqlen_q, case.heads_q, case.head_dim)
    # Logical cache contents per cache row; slots past each row's valid length hold NaN, which must not leak.
    k_rows = inp.randn(rows, case.capacity, case.heads_k, case.head_dim)
    v_rows = inp.randn(rows, case.capacity, case.heads_k, case.head_dim_v)
    row_of = list(case.batch_idx) if case.batch_idx else list(range(case.batch))
    valid = [0] * rows
    for b, r in enumerate(row_of):
        valid[r] = case.cache_lens[b]
    for r in range(rows):
        k_rows[r, valid[r] :] = float("nan")
        v_rows[r, valid[r] :] = float("nan")
    k_new = v_new = None
    if case.new_len:
        k_new = inp.randn(case.batch, case.new_len, case.heads_k, case.head_dim)
        v_new = inp.randn(case.batch, case.new_len, case.heads_k, case.head_dim_v)
    slopes = inp.slopes(case)
    lens = torch.tensor(case.cache_lens, dtype=torch.int32, device=device)
    kw = dict(_op_kw(case), alibi_slopes=slopes, return_lse=True, backend=name)
    block_table = None
    if case.page_size:
        pages_per_row = case.capacity // case.page_size
        perm = torch.randperm(rows * pages_per_row + 3, generator=inp.gen)[: rows * pages_per_row]
        block_table = perm.view(rows, pages_per_row).to(torch.int32).to(device)
        k_cache = inp.randn(rows * pages_per_row + 3, case.page_size, case.heads_k, case.head_dim) * float("nan")
        v_cache = inp.randn(rows * pages_per_row + 3, case.page_size, case.heads_k, case.head_dim_v) * float("nan")
        for r in range(rows):
            for p in range(pages_per_row):
                page = int(block_table[r, p])
                k_cache[page] = k_rows[r, p * case.page_size : (p + 1) * case.page_size]
                v_cache[page] = v_rows[r, p * case.page_size : (p + 1) * case.page_size]
    else:
        k_cache, v_cache = k_rows.clone(), v_rows.clone()
    before_k, before_v = k_cache.clone(), v_cache.clone()
    extra = {}
    if case.batch_idx:
        extra["cache_batch_idx"] = torch.tensor(case.batch_idx, dtype=torch.int32, device=device)
    if block_table is not None:
        extra["block_table"] = block_table
    judge = _Judge(case.dtype, name)
    out, lse = attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, **extra, **kw)
    # The append wrote exactly the new slots.
    want_k, want_v = before_k.clone(), before_v.clone()
    if case.new_len:
        for b, r in enumerate(row_of):
            for t in range(case.new_len):
                pos = case.cache_lens[b] + t
                if block_table is not None:
                    page, off = int(block_table[r, pos // case.page_size]), pos % case.page_size
                    want_k[page, off], want_v[page, off] = k_new[b, t], v_new[b, t]
                else:
                    want_k[r, pos], want_v[r, pos] = k_new[b, t], v_new[b, t]
    judge.same_bits("k_cache after the call", k_cache, want_k)
    judge.same_bits("v_cache after the call", v_cache, want_v)
    judge.finite("out", out)
    outs_exact, outs_plain, lses_exact = [], [], []
    for b, r in enumerate(row_of):
        keys, values = k_rows[r, : case.cache_lens[b]], v_rows[r, : case.cache_lens[b]]
        if case.new_len:
            keys, values = torch.cat([keys, k_new[b]]), torch.cat([values, v_new[b]])
        s_slopes = None if slopes is None else (slopes if slopes.dim() == 1 else slopes[b : b + 1])
        if keys.shape[0] == 0:
            zeros = torch.zeros(1, case.seqlen_q, case.heads_q, case.head_dim_v, dtype=torch.float64, device=device)
            outs_exact.append(zeros)
            outs_plain.append(zeros.to(case.dtype))
            lses_exact.append(torch.full((1, case.heads_q, case.seqlen_q), float("-inf"), device=device))
            continue
        args = (q[b : b + 1], keys[None], values[None])
        e, e_lse = attention_naive(*(t.double() for t in args), **_naive_kw(case), alibi_slopes=s_slopes)
        p, _ = attention_naive(*args, **_naive_kw(case), alibi_slopes=s_slopes)
        outs_exact.append(e)
        outs_plain.append(p)
        lses_exact.append(e_lse)
    judge.rule("out", out, torch.cat(outs_exact), torch.cat(outs_plain), 2.0)
    judge.lse(lse, torch.cat(lses_exact))
    return judge.failures


_CHECKS: dict[str, Callable[[Case, str, torch.device], list[str]]] = {
    "attention": _check_attention,
    "varlen": _check_varlen,
    "kvcache": _check_kvcache,
}


def _check_fp8(case: Case, name: str, device: torch.device) -> list[str]:
    inp = _Inputs(case, device)
    judge = _Judge(case.dtype, name)

    def randn(*shape: int) -> torch.Tensor:  # float32 on the host: quantized there, then moved
        return torch.randn(*shape, generator=inp.gen, dtype=torch.float64).float()

    fuzz_fp8.CHECKS[case.op](case, name, device, randn, inp.slopes(case), judge)
    return judge.failures


def run_case(case: Case, backends: Sequence[str], device: torch.device) -> list[Outcome]:
    outcomes = []
    check = _check_fp8 if case.fp8 else _CHECKS[case.op]
    for name in backends:
        if case.fp8 and not fuzz_fp8.accepts_fp8(name):
            outcomes.append(Outcome(name, case.label, "n/a"))
            continue
        try:
            failures = check(case, name, device)
        except BackendUnsupportedError:
            outcomes.append(Outcome(name, case.label, "n/a"))
            continue
        except Exception as exc:  # any other exception is a failure of the backend on a valid input
            lines = traceback.format_exception_only(type(exc), exc)
            outcomes.append(Outcome(name, case.label, "FAIL", [f"raised {''.join(lines).strip()[:600]}"]))
            continue
        outcomes.append(Outcome(name, case.label, "FAIL" if failures else "pass", failures))
    return outcomes


def draws_fp8(backends: Sequence[str]) -> bool:
    """Whether fp8 cases are drawn for these backends: some of them declares fp8."""
    return any(fuzz_fp8.accepts_fp8(name) for name in backends)


def available_backends(device: torch.device) -> list[str]:
    names = []
    for name in REGISTRY.names():
        if REGISTRY.get(name).unavailable_reason() is not None:
            continue
        names.append(name)
    return names


# ---------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Summary:
    counts: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)  # (backend, op) -> status -> n
    failures: list[tuple[int, str, Outcome]] = field(default_factory=list)  # (seed, case description, outcome)
    cases: int = 0
    lost_at: list[int] = field(default_factory=list)  # seeds after which a worker's CUDA context was gone

    def add(self, case: Case, outcomes: list[Outcome]) -> None:
        self.cases += 1
        for o in outcomes:
            slot = self.counts.setdefault((o.backend, o.op), {"pass": 0, "FAIL": 0, "n/a": 0})
            slot[o.status] += 1
            if o.status == "FAIL":
                self.failures.append((case.seed, case.describe(), o))

    def merge(self, other: Summary) -> None:
        self.cases += other.cases
        for key, slot in other.counts.items():
            mine = self.counts.setdefault(key, {"pass": 0, "FAIL": 0, "n/a": 0})
            for status, n in slot.items():
                mine[status] += n
        self.failures.extend(other.failures)
        self.lost_at.extend(other.lost_at)

    def tally(self) -> str:
        """One line of running totals: what a stopped run still has on record."""
        passed = sum(s["pass"] for s in self.counts.values())
        failed = sum(s["FAIL"] for s in self.counts.values())
        return f"{self.cases} cases; {passed} passed, {failed} failed"

    def format(self) -> str:
        lines = [f"{'backend':<12} {'op':<14} {'pass':>6} {'FAIL':>6} {'n/a':>6}"]
        for (backend, op), slot in sorted(self.counts.items()):
            lines.append(f"{backend:<12} {op:<14} {slot['pass']:>6} {slot['FAIL']:>6} {slot['n/a']:>6}")
        lines.append(self.tally())
        if self.lost_at:
            seeds = ", ".join(map(str, sorted(self.lost_at)))
            lines.append(f"stopped early: the CUDA context was lost after seed(s) {seeds} (replay each alone)")
        return "\n".join(lines)


def _format_failure(seed: int, description: str, outcome: Outcome, device: torch.device) -> str:
    details = "\n".join(f"    {d}" for d in outcome.details)
    # The case of a seed depends on the device type's size limits: replay on the same kind of device.
    replay = f"attnkit check --device {device.type} --backend {outcome.backend} --fuzz-replay {seed}"
    return f"FAIL {outcome.backend} seed={seed}: {description}\n{details}\n    replay: {replay}"


def fuzz(
    seconds: float,
    *,
    device: torch.device,
    backends: Sequence[str] | None = None,
    first_seed: int | None = None,
    max_cases: int | None = None,
    limits: Limits | None = None,
    ops: Sequence[str] = OPS,
    worker: int = 0,
    workers: int = 1,
    log: Callable[[str], None] = print,
    progress_every: int = 0,
) -> Summary:
    """Run cases ``first_seed + worker, first_seed + worker + workers, ...`` until ``seconds`` or ``max_cases``.
    With ``progress_every`` > 0, every that many cases ``log`` gets the worker's running tally, so a run stopped
    from outside (a timeout) still leaves counts behind."""
    limits = limits or Limits.for_device(device)
    names = list(backends) if backends else available_backends(device)
    first_seed = int(time.time()) * 1000 % 2**31 if first_seed is None else first_seed
    deadline = time.monotonic() + seconds
    summary = Summary()
    seed = first_seed + worker
    with_fp8 = draws_fp8(names)
    while time.monotonic() < deadline and (max_cases is None or summary.cases < max_cases):
        case = draw_case(seed, limits, ops, with_fp8)
        outcomes = run_case(case, names, device)
        summary.add(case, outcomes)
        for o in outcomes:
            if o.status == "FAIL":
                log(_format_failure(seed, case.describe(), o, device))
        if progress_every > 0 and summary.cases % progress_every == 0:
            log(f"worker {worker} so far (last seed {seed}): {summary.tally()}")
        if device.type == "cuda" and not _context_alive(device):
            # A fault (an illegal address) poisons the process's CUDA context: every later case would fail too.
            summary.lost_at.append(seed)
            log(f"STOP worker {worker}: the CUDA context is lost after seed {seed}; replay it alone")
            break
        seed += workers
    return summary


def _context_alive(device: torch.device) -> bool:
    """Synchronises ``device`` and frees the cached blocks; False when the CUDA context is unusable."""
    try:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    except RuntimeError:  # torch.AcceleratorError (a sticky fault) is a RuntimeError
        return False
    return True


# Cases between a parallel worker's running tallies.
PROGRESS_EVERY = 10


def _worker(task: tuple) -> Summary:
    seconds, device_str, backends, first_seed, worker, workers, autotune = task
    if autotune is not None:
        os.environ["ATTNKIT_TRITON_AUTOTUNE"] = "1" if autotune else "0"
    return fuzz(seconds, device=torch.device(device_str), backends=backends, first_seed=first_seed, worker=worker,
                workers=workers, log=lambda line: print(line, flush=True), progress_every=PROGRESS_EVERY)  # fmt: skip


def fuzz_parallel(
    seconds: float, *, device: torch.device, backends: Sequence[str] | None, first_seed: int, procs: int
) -> Summary:
    """``procs`` processes on one device (compilation is CPU-bound: the GPU is mostly idle). One worker in four
    runs with autotuning on, so the tiles the autotuner picks are fuzzed too; the others use the fixed tiles."""
    import multiprocessing as mp

    tasks = [(seconds, str(device), backends, first_seed, w, procs, w % 4 == 3) for w in range(procs)]
    summary = Summary()
    with mp.get_context("spawn").Pool(procs) as pool:
        for part in pool.imap_unordered(_worker, tasks):
            summary.merge(part)
    return summary


def replay(seed: int, *, device: torch.device, backends: Sequence[str] | None = None) -> Summary:
    names = list(backends) if backends else available_backends(device)
    case = draw_case(seed, Limits.for_device(device), fp8=draws_fp8(names))
    print(f"seed {seed}: {case.describe()}")
    summary = Summary()
    outcomes = run_case(case, names, device)
    summary.add(case, outcomes)
    for o in outcomes:
        print(f"  {o.backend}: {o.status}" + "".join(f"\n    {d}" for d in o.details))
    return summary
