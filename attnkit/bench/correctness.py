"""Correctness of a provider on the very inputs it is about to be timed on.

The provider is called twice on the same inputs (with a backward pass each time when the case trains): the
second call is where cached launch plans run (the Triton host fast path launches a remembered kernel), so its
output must be bitwise equal to the first call's, and both calls' results are judged against float64.

What is judged (:func:`choose_sample`). Small problems: everything. Large ones: a sample spread over the whole
tensor, recomputed exactly:

* out and dq: every query head, the first, middle and last blocks of ``ROW_BLOCK`` query rows, in batches 0, the
  last and one drawn at random (seeded). An output row and its dq row depend only on that query row (and its
  dout row) and all keys, so a slice of rows is exact; causal masking is bottom-right aligned, so the mask is
  built from the global row indices, not the slice's.
* dk and dv: the first, middle and last blocks of key rows, in the same batches, for KV heads 0, the last and one
  drawn at random. These depend on every query row of the KV head's query heads, so they are accumulated over all
  query rows in chunks (each chunk's scores against all keys give its softmax exactly), with memory bounded by
  ``CHUNK_BYTES`` per chunk.

Tolerance follows flash-attn's rule: error <= factor x (error of plain PyTorch attention in the input dtype)
+ atol, with factor 2 for the output and 3 for gradients. The plain counterpart is computed over the same
sample the same way, each op rounding to the input dtype as plain attention in that dtype would.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .cases import Case, scores_elements
from .interface import AttnFn

Tensor = torch.Tensor

ROW_BLOCK = 64  # query rows (and key rows, for dk/dv) per judged block
# Judge everything when the score matrix of the whole problem is this small.
FULL_CHECK_SCORES = 1 << 22
# Bound on the temporaries of one chunk of the recomputation (scores, probabilities and their gradients).
CHUNK_BYTES = 512 << 20
OUT_FACTOR = 2.0
GRAD_FACTOR = 3.0
ATOL = {torch.float16: 1e-3, torch.bfloat16: 1e-3, torch.float32: 1e-5, torch.float64: 1e-8}
REPEAT = "out_repeat"  # the error name of "2nd call's output vs the 1st's", allowed 0 (bitwise equal)


@dataclass(frozen=True)
class Verdict:
    ok: bool
    errors: dict[str, float]
    allowed: dict[str, float]
    scope: str

    def summary(self) -> str:
        bad = [n for n in self.errors if not self.errors[n] <= self.allowed[n]]
        name = bad[0] if bad else max(self.errors, key=lambda n: self.errors[n] / max(self.allowed[n], 1e-30))
        return f"{name} max error {self.errors[name]:.3g} vs allowed {self.allowed[name]:.3g} ({self.scope})"


@dataclass(frozen=True)
class Sample:
    """The part of the problem that is judged: out and dq at ``rows`` of every query head, dk and dv at ``keys``
    of ``kv_heads`` (empty without gradients), all in ``batches``. Indices are global and sorted."""

    batches: tuple[int, ...]
    rows: tuple[int, ...]
    keys: tuple[int, ...]
    kv_heads: tuple[int, ...]
    full: bool
    seed: int


def blocks(n: int, size: int) -> tuple[int, ...]:
    """The first, middle and last ``size`` indices of range(n); all of them when three blocks would cover it."""
    if n <= 3 * size:
        return tuple(range(n))
    return tuple(sorted({i for start in (0, (n - size) // 2, n - size) for i in range(start, start + size)}))


def choose_sample(case: Case, seed: int = 0) -> Sample:
    """Everything for small problems, else first/middle/last blocks of rows and keys in batches {0, random,
    last} and (dk/dv) KV heads {0, random, last}; the random picks depend only on ``seed`` and the case."""
    grads = case.needs_grad
    if scores_elements(case) <= FULL_CHECK_SCORES:
        keys, kv_heads = (tuple(range(case.seqlen_k)), tuple(range(case.heads_k))) if grads else ((), ())
        return Sample(tuple(range(case.batch)), tuple(range(case.seqlen_q)), keys, kv_heads, True, seed)
    rng = random.Random(f"{seed}:{case.label()}")  # str seeds hash stably across processes
    batches = tuple(sorted({0, rng.randrange(case.batch), case.batch - 1}))
    kv_heads = tuple(sorted({0, rng.randrange(case.heads_k), case.heads_k - 1})) if grads else ()
    keys = blocks(case.seqlen_k, ROW_BLOCK) if grads else ()
    return Sample(batches, blocks(case.seqlen_q, ROW_BLOCK), keys, kv_heads, False, seed)


def _ranges(indices: Sequence[int]) -> str:
    """'0-63, 992-1055' for runs of consecutive indices."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in runs)


def describe(sample: Sample, case: Case) -> str:
    """What was judged, in words (the ``check_scope`` of the results)."""
    grads = case.needs_grad
    calls = f"2 calls, the 2nd out bitwise equal to the 1st's, {'out and grads' if grads else 'out'} of both judged"
    if sample.full:
        return f"all of out{', dq, dk, dv' if grads else ''}; {calls}"
    rows = f"query rows {_ranges(sample.rows)} of {case.seqlen_q}"
    parts = [f"batches {list(sample.batches)} of {case.batch} (seed {sample.seed})",
             f"all {case.heads_q} query heads at {rows} (out{', dq' if grads else ''})"]  # fmt: skip
    if grads:
        parts.append(f"dk, dv at key rows {_ranges(sample.keys)} of {case.seqlen_k} of KV heads "
                     f"{list(sample.kv_heads)} of {case.heads_k}")  # fmt: skip
    return "; ".join([*parts, calls])


# ---- the recomputation of a sample ------------------------------------------------------------------------
# Shapes: q and dout of one chunk are (G, C, D), the G query heads that share one KV head at C query rows whose
# global indices are ``rows``; k and v are that KV head's (Sk, D).


def _probs(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, offset: int, causal: bool) -> torch.Tensor:
    """Softmax over all keys, (G, C, Sk); ``offset`` = Sk - Sq aligns causal masking bottom-right. A row that
    sees no key gets probabilities 0 (output 0, as in flash-attn)."""
    scores = torch.matmul(q, k.T) * q.shape[-1] ** -0.5
    if causal:
        cols = torch.arange(k.shape[0], device=k.device)
        scores = scores.masked_fill(cols[None, :] > rows[:, None] + offset, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


def _dscores(p: torch.Tensor, dout: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Gradient of the scaled scores' input, q @ k.T, in p's dtype, as autograd of plain attention gives it:
    softmax backward (computed in at least float32, as PyTorch does for half types), then the scale."""
    work = torch.promote_types(p.dtype, torch.float32)
    dp = torch.matmul(dout, v.T).to(work)
    pw = p.to(work)
    ds = (pw * (dp - (pw * dp).sum(-1, keepdim=True))).to(p.dtype)
    return ds * scale


def _row_results(q: Tensor, k: Tensor, v: Tensor, dout: Tensor | None, rows: Tensor, offset: int,
                 causal: bool) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """out and dq at ``rows``: (G, C, D) each."""
    p = _probs(q, k, rows, offset, causal)
    out = torch.matmul(p, v)
    dq = torch.matmul(_dscores(p, dout, v, q.shape[-1] ** -0.5), k) if dout is not None else None
    return out, dq


def _key_partials(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, rows: Tensor, offset: int, causal: bool,
                  keys: Tensor) -> tuple[Tensor, Tensor]:  # fmt: skip
    """This chunk's share of dk and dv at ``keys``, summed over its rows and heads: (len(keys), D) each, in
    at least float32 (plain matmuls in half types accumulate in float32 too)."""
    p = _probs(q, k, rows, offset, causal)
    acc = torch.promote_types(p.dtype, torch.float32)
    ds = _dscores(p, dout, v, q.shape[-1] ** -0.5).index_select(-1, keys).to(acc)
    dk = torch.einsum("gck,gcd->kd", ds, q.to(acc))
    dv = torch.einsum("gck,gcd->kd", p.index_select(-1, keys).to(acc), dout.to(acc))
    return dk, dv


def _chunk_rows(heads: int, seqlen_k: int, dtype: torch.dtype) -> int:
    """Query rows per chunk so that ~8 (G, C, Sk) temporaries stay within CHUNK_BYTES."""
    per_row = 8 * heads * max(seqlen_k, 1) * torch.promote_types(dtype, torch.float32).itemsize
    return max(1, CHUNK_BYTES // per_row)


@torch.no_grad()
def recompute(q: Tensor, k: Tensor, v: Tensor, dout: Tensor | None, case: Case, sample: Sample,
              dtype: torch.dtype) -> dict[str, Tensor]:  # fmt: skip
    """Attention over ``sample`` in ``dtype`` (float64: the exact values; the input dtype: plain PyTorch's),
    as float64 tensors: out and dq (len(batches), len(rows), Hq, D), dk and dv (len(batches), len(keys),
    len(kv_heads), D)."""
    grads = case.needs_grad
    group, offset, device = case.heads_q // case.heads_k, case.seqlen_k - case.seqlen_q, q.device
    rows = torch.tensor(sample.rows, dtype=torch.long, device=device)
    keys = torch.tensor(sample.keys, dtype=torch.long, device=device)
    chunk = _chunk_rows(group, case.seqlen_k, dtype)
    nb, nr, nk, d = len(sample.batches), len(sample.rows), len(sample.keys), case.head_dim
    result = {"out": torch.zeros(nb, nr, case.heads_q, d, dtype=torch.float64, device=device)}
    if grads:
        result["dq"] = torch.zeros_like(result["out"])
        result["dk"] = torch.zeros(nb, nk, len(sample.kv_heads), d, dtype=torch.float64, device=device)
        result["dv"] = torch.zeros_like(result["dk"])

    def head_rows(t: torch.Tensor, b: int, h: int, at: torch.Tensor) -> torch.Tensor:
        """(G, C, D) in dtype: rows ``at`` of the query heads of KV head h."""
        return t[b, :, h * group : (h + 1) * group].index_select(0, at).to(dtype).transpose(0, 1)

    for bi, b in enumerate(sample.batches):
        for h in range(case.heads_k):
            kh, vh = k[b, :, h].to(dtype), v[b, :, h].to(dtype)
            heads = slice(h * group, (h + 1) * group)
            for start in range(0, nr, chunk):
                at = rows[start : start + chunk]
                out, dq = _row_results(head_rows(q, b, h, at), kh, vh, head_rows(dout, b, h, at) if grads else None,
                                       at, offset, case.causal)  # fmt: skip
                result["out"][bi, start : start + chunk, heads] = out.transpose(0, 1).double()
                if dq is not None:
                    result["dq"][bi, start : start + chunk, heads] = dq.transpose(0, 1).double()
            if h not in sample.kv_heads:
                continue
            hi = sample.kv_heads.index(h)
            for start in range(0, case.seqlen_q, chunk):
                at = torch.arange(start, min(start + chunk, case.seqlen_q), device=device)
                dk, dv = _key_partials(head_rows(q, b, h, at), kh, vh, head_rows(dout, b, h, at), at, offset,
                                       case.causal, keys)  # fmt: skip
                result["dk"][bi, :, hi] += dk.double()
                result["dv"][bi, :, hi] += dv.double()
    if grads and dtype != torch.float64:
        # A plain backward rounds dk/dv to the input dtype once, after its float32 sums (summed here within a
        # chunk in float32, across chunks in float64).
        for name in ("dk", "dv"):
            result[name] = result[name].to(dtype).double()
    return result


# ---- the provider's side ----------------------------------------------------------------------------------
def _take(t: torch.Tensor, batches: torch.Tensor, rows: torch.Tensor, heads: torch.Tensor | None) -> torch.Tensor:
    t = t.detach().index_select(0, batches).index_select(1, rows)
    return (t.index_select(2, heads) if heads is not None else t).double()


def _call(fn: AttnFn, q: Tensor, k: Tensor, v: Tensor, dout: Tensor | None, case: Case,
          sample: Sample) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """One call of ``fn`` (and its backward when the case trains): the whole output, and the sampled parts of
    out and the gradients (the full gradients are not kept)."""
    device = q.device
    batches = torch.tensor(sample.batches, dtype=torch.long, device=device)
    rows = torch.tensor(sample.rows, dtype=torch.long, device=device)
    if case.needs_grad:
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        with torch.enable_grad():
            out = fn(*leaves)
            dq, dk, dv = torch.autograd.grad(out, leaves, dout)
        out = out.detach()
    else:
        with torch.no_grad():
            out = fn(q, k, v)
    if tuple(out.shape) != tuple(q.shape):
        raise ValueError(f"the output has shape {tuple(out.shape)}, expected {tuple(q.shape)} for {case.label()}")
    got = {"out": _take(out, batches, rows, None)}
    if case.needs_grad:
        keys = torch.tensor(sample.keys, dtype=torch.long, device=device)
        kv_heads = torch.tensor(sample.kv_heads, dtype=torch.long, device=device)
        for name, grad, shape in (("dq", dq, q.shape), ("dk", dk, k.shape), ("dv", dv, v.shape)):
            if grad is None or tuple(grad.shape) != tuple(shape):
                seen = None if grad is None else tuple(grad.shape)
                raise ValueError(f"{name} has shape {seen}, expected {tuple(shape)} for {case.label()}")
        got["dq"] = _take(dq, batches, rows, None)
        got["dk"] = _take(dk, batches, keys, kv_heads)
        got["dv"] = _take(dv, batches, keys, kv_heads)
    return out, got


def repeat_error(first: torch.Tensor, second: torch.Tensor) -> float:
    """0.0 when the two tensors are bitwise equal, else the largest difference where their bits differ: inf
    where one holds NaN or inf and the other not, the smallest float where only the bits differ (-0.0 vs 0.0,
    another NaN payload)."""
    if first.shape != second.shape or first.dtype != second.dtype:
        return math.inf
    a, b = first.detach().contiguous(), second.detach().contiguous()
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    differ = a.view(bits) != b.view(bits)
    if not bool(differ.any()):
        return 0.0
    diff = (a[differ].double() - b[differ].double()).abs().nan_to_num(nan=math.inf)
    return max(float(diff.max()), math.ulp(0.0))


def _max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise ValueError(f"shape {tuple(a.shape)} != expected {tuple(b.shape)}")
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def _worst(*errors: float) -> float:
    return math.nan if any(math.isnan(e) for e in errors) else max(errors)


def _check_shapes(case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor | None) -> None:
    """The reference maps query head h to KV head h // (Hq // Hk) of ``k``/``v``; on tensors of other shapes
    (e.g. K/V already repeated per query head) that mapping silently picks wrong heads, so refuse them."""
    shape_q = (case.batch, case.seqlen_q, case.heads_q, case.head_dim)
    shape_kv = (case.batch, case.seqlen_k, case.heads_k, case.head_dim)
    expected = {"q": shape_q, "k": shape_kv, "v": shape_kv}
    tensors = {"q": q, "k": k, "v": v}
    if case.needs_grad:
        if dout is None:
            raise ValueError(f"dout is None, expected a tensor of shape {shape_q} for {case.label()}")
        expected["dout"], tensors["dout"] = shape_q, dout
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {expected[name]} for {case.label()} "
                             "(verify takes the case's own inputs, before any Kernel.prepare)")  # fmt: skip


def verify(fn: AttnFn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor | None,
           case: Case, seed: int = 0) -> Verdict:  # fmt: skip
    """Call ``fn`` twice on these inputs (with a backward pass each time when the case trains) and judge both
    calls on the sample :func:`choose_sample` draws with ``seed``; the scope says what was judged.

    The inputs are the case's own (K/V with ``case.heads_k`` heads); a kernel that wants them transformed first
    (K/V repeated per query head) is passed with the transform inside ``fn``."""
    _check_shapes(case, q, k, v, dout)
    sample = choose_sample(case, seed)
    first_out, first = _call(fn, q, k, v, dout, case, sample)
    first_out = first_out.clone()  # a provider may write every call's output into one buffer
    second_out, second = _call(fn, q, k, v, dout, case, sample)
    repeat = repeat_error(first_out, second_out)
    del first_out, second_out
    exact = recompute(q, k, v, dout, case, sample, torch.float64)
    plain = recompute(q, k, v, dout, case, sample, case.torch_dtype)
    atol = ATOL.get(case.torch_dtype, 1e-3)
    errors, allowed = {}, {}
    for name in exact:
        factor = OUT_FACTOR if name == "out" else GRAD_FACTOR
        errors[name] = _worst(_max_error(first[name], exact[name]), _max_error(second[name], exact[name]))
        allowed[name] = factor * _max_error(plain[name], exact[name]) + atol
    errors[REPEAT], allowed[REPEAT] = repeat, 0.0
    ok = all(errors[n] <= allowed[n] for n in errors)  # False for NaN errors too
    return Verdict(ok, errors, allowed, describe(sample, case))
