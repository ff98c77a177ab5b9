"""The fp8 cases of the differential fuzzer (:mod:`attnkit.fuzz`): float8_e4m3fn inputs with descales.

:mod:`attnkit.fuzz` draws them only when a fuzzed backend declares fp8 (``accepts_fp8``). Inputs are fresh normal
values quantized with one descale per (batch row, KV head) (:func:`attnkit.fp8.quantize`; for a KV cache, one per
batch row over its cache row's valid keys and its new keys), q's descale negated in some cases (negative scores
scale). Judged with the bound of docs/fp8.md against :func:`attnkit.testing.attention_fp8_ref`:

    max|out - exact| <= 2 * max|plain - exact| + 0.01

``exact`` is the float64 attention of the dequantized inputs; ``plain`` is PyTorch doing the same in bfloat16 with
P rounded to e4m3 the way the fp8 attention kernels round it (``attention``, ``attention_varlen``), or with P kept
in bfloat16 for ``attention_with_kvcache`` (the split-KV kernel does not round P). Also checked: lse, the output
dtype, a repeated call's bits, NaN padding rows and unused cache slots, and the bytes a cache append writes.
lse is judged by the same bound with 1e-4 for the floor: fp8 scores come from reduced-precision products (e4m3
inputs, and on Hopper wgmma's fast fp8 accumulation), so the 1e-4-relative lse rule of 16-bit calls does not hold
at large head dims (observed on an H200: 6e-4 to 3.4e-3 at head dims 112-160).
Not drawn with fp8: gradients (forward only), learnable_sink and rotary (refused with fp8 inputs), dropout
(the fp8 Triton tests cover it).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Protocol

import torch

from . import fp8
from .ops.attention import attention
from .ops.kvcache import attention_with_kvcache
from .ops.varlen import attention_varlen
from .registry import REGISTRY
from .testing import attention_fp8_ref

ATOL = 1e-2  # docs/fp8.md's absolute term
E4M3 = fp8.FP8_DTYPE


class Case(Protocol):
    """The fields of :class:`attnkit.fuzz.Case` these checks read (a protocol: attnkit.fuzz imports this module)."""

    seed: int
    dtype: torch.dtype  # the output dtype of an fp8 case
    batch: int
    seqlen_q: int
    seqlen_k: int
    heads_q: int
    heads_k: int
    head_dim: int
    head_dim_v: int
    causal: bool
    window: tuple[int, int]
    softcap: float
    softmax_scale: float | None
    lengths_q: tuple[int, ...]
    lengths_k: tuple[int, ...]
    cache_lens: tuple[int, ...]
    new_len: int
    capacity: int
    page_size: int
    batch_idx: tuple[int, ...]
    fp8_flip_q: bool


class Judge(Protocol):
    failures: list[str]

    def rule(self, name: str, fast, exact, plain, factor: float, atol: float | None = None) -> None: ...
    def lse(self, fast, exact, plain=None) -> None: ...
    def same_bits(self, name: str, a, b) -> None: ...
    def finite(self, name: str, t) -> None: ...


def accepts_fp8(name: str) -> bool:
    """Whether backend ``name`` declares fp8 calls (the ``fp8`` feature and float8_e4m3fn)."""
    caps = REGISTRY.get(name).capabilities
    return fp8.FEATURE in caps.features and E4M3 in caps.dtypes


def _options(case: Case, slopes: torch.Tensor | None) -> dict:
    return dict(causal=case.causal, softmax_scale=case.softmax_scale, window_size=case.window, softcap=case.softcap,
                alibi_slopes=slopes)  # fmt: skip


def _quantized(x: torch.Tensor, heads_k: int, flip: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    x8, descale = fp8.quantize(x, heads_k)
    return x8.to(device), (-descale if flip else descale).to(device)


def check_attention(case: Case, name: str, device: torch.device, randn: Callable, slopes, judge: Judge) -> None:
    q = randn(case.batch, case.seqlen_q, case.heads_q, case.head_dim)
    k = randn(case.batch, case.seqlen_k, case.heads_k, case.head_dim)
    v = randn(case.batch, case.seqlen_k, case.heads_k, case.head_dim_v)
    (q8, qd), (k8, kd), (v8, vd) = (_quantized(x, case.heads_k, f, device)
                                    for x, f in ((q, case.fp8_flip_q), (k, False), (v, False)))  # fmt: skip
    scales = dict(q_descale=qd, k_descale=kd, v_descale=vd)
    kw = _options(case, slopes)

    def call():
        return attention(q8, k8, v8, **kw, **scales, out_dtype=case.dtype, return_lse=True, backend=name)

    out, lse = call()
    again, again_lse = call()
    _dtypes(judge, case, out, lse)
    judge.same_bits("out (second call)", again, out)
    judge.same_bits("lse (second call)", again_lse, lse)
    exact, exact_lse = attention_fp8_ref(q8, k8, v8, **scales, **kw, return_lse=True)
    plain, plain_lse = attention_fp8_ref(q8, k8, v8, **scales, **kw, upcast=False, return_lse=True)
    judge.rule("out", out, exact, plain, 2.0, atol=ATOL)
    judge.lse(lse, exact_lse, plain_lse)


def check_varlen(case: Case, name: str, device: torch.device, randn: Callable, slopes, judge: Judge) -> None:
    pad = 5  # NaN rows past the last sequence
    cq = [0, *itertools.accumulate(case.lengths_q)]
    ck = [0, *itertools.accumulate(case.lengths_k)]
    q8, qd = _packed(randn, cq, case.heads_q, case.head_dim, case.heads_k, pad, case.fp8_flip_q, device)
    k8, kd = _packed(randn, ck, case.heads_k, case.head_dim, case.heads_k, pad, False, device)
    v8, vd = _packed(randn, ck, case.heads_k, case.head_dim_v, case.heads_k, pad, False, device)
    cu_q, cu_k = (torch.tensor(c, dtype=torch.int32, device=device) for c in (cq, ck))
    kw = _options(case, slopes)
    out, lse = attention_varlen(
        q8, k8, v8, cu_q, cu_k, case.seqlen_q, case.seqlen_k, **kw, q_descale=qd, k_descale=kd, v_descale=vd,
        out_dtype=case.dtype, return_lse=True, backend=name,
    )  # fmt: skip
    _dtypes(judge, case, out, lse)
    tq = cq[-1]
    judge.finite("out", out[:tq])
    if bool((out[tq:] != 0).any()):
        judge.failures.append("out: padding rows past the last sequence are not 0")
    shape = (tq, case.heads_q, case.head_dim_v)
    exact, plain = torch.zeros(shape, dtype=torch.float64, device=device), torch.zeros(shape, device=device)
    exact_lse = torch.full((case.heads_q, tq), float("-inf"), dtype=torch.float64, device=device)
    plain_lse = exact_lse.clone()
    for b in range(case.batch):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        if qs.start == qs.stop or ks.start == ks.stop:  # no queries, or no keys: 0 and -inf, as set above
            continue
        one = (q8[None, qs], k8[None, ks], v8[None, ks])
        row = dict(q_descale=qd[b : b + 1], k_descale=kd[b : b + 1], v_descale=vd[b : b + 1])
        row_kw = dict(kw, alibi_slopes=_row_slopes(slopes, b))
        e, e_lse = attention_fp8_ref(*one, **row, **row_kw, return_lse=True)
        exact[qs], exact_lse[:, qs] = e[0], e_lse[0]
        p, p_lse = attention_fp8_ref(*one, **row, **row_kw, upcast=False, return_lse=True)
        plain[qs], plain_lse[:, qs] = p[0].float(), p_lse[0].double()
    judge.rule("out", out[:tq], exact, plain, 2.0, atol=ATOL)
    judge.lse(lse[:, :tq], exact_lse, plain_lse)


def _packed(randn, cu: list[int], heads: int, dim: int, heads_k: int, pad: int, flip: bool, device):
    """Packed fp8 rows quantized per sequence (descale row b from sequence b's values), NaN padding rows after."""
    x = randn(cu[-1] + pad, heads, dim)
    x8 = torch.empty(x.shape, dtype=E4M3)
    descale = torch.ones(len(cu) - 1, heads_k)
    for b in range(len(cu) - 1):
        if cu[b + 1] > cu[b]:
            x8[cu[b] : cu[b + 1]], descale[b] = (t[0] for t in fp8.quantize(x[None, cu[b] : cu[b + 1]], heads_k))
    x8[cu[-1] :] = float("nan")
    return x8.to(device), (-descale if flip else descale).to(device)


def check_kvcache(case: Case, name: str, device: torch.device, randn: Callable, slopes, judge: Judge) -> None:
    rows = (max(case.batch_idx) + 1) if case.batch_idx else case.batch
    row_of = list(case.batch_idx) if case.batch_idx else list(range(case.batch))
    q = randn(case.batch, case.seqlen_q, case.heads_q, case.head_dim)
    q8, qd = _quantized(q, case.heads_k, case.fp8_flip_q, device)
    k_rows = randn(rows, case.capacity, case.heads_k, case.head_dim)
    v_rows = randn(rows, case.capacity, case.heads_k, case.head_dim_v)
    k_new = randn(case.batch, case.new_len, case.heads_k, case.head_dim)
    v_new = randn(case.batch, case.new_len, case.heads_k, case.head_dim_v)
    # One descale per batch row and KV head, from the keys (values) that row reads: its valid cache slots and its
    # new tokens; rows no batch row uses keep descale 1. Slots past the valid lengths hold NaN, which must not leak.
    kd, vd = torch.ones(case.batch, case.heads_k), torch.ones(case.batch, case.heads_k)
    k_row_scale, v_row_scale = torch.ones(rows, case.heads_k), torch.ones(rows, case.heads_k)
    for b, r in enumerate(row_of):
        n = case.cache_lens[b]
        kd[b] = _descale(torch.cat([k_rows[r, :n], k_new[b]]))
        vd[b] = _descale(torch.cat([v_rows[r, :n], v_new[b]]))
        k_row_scale[r], v_row_scale[r] = kd[b], vd[b]
    valid = [0] * rows
    for b, r in enumerate(row_of):
        valid[r] = case.cache_lens[b]
    k8_rows = (k_rows / k_row_scale[:, None, :, None]).to(E4M3)
    v8_rows = (v_rows / v_row_scale[:, None, :, None]).to(E4M3)
    for r in range(rows):
        k8_rows[r, valid[r] :] = float("nan")
        v8_rows[r, valid[r] :] = float("nan")
    k8_new = (k_new / kd[:, None, :, None]).to(E4M3).to(device) if case.new_len else None
    v8_new = (v_new / vd[:, None, :, None]).to(E4M3).to(device) if case.new_len else None
    extra: dict[str, torch.Tensor] = {}
    if case.page_size:
        pages_per_row = case.capacity // case.page_size
        count = rows * pages_per_row + 3
        table = torch.randperm(count, generator=torch.Generator().manual_seed(case.seed))[: rows * pages_per_row]
        table = table.view(rows, pages_per_row).to(torch.int32)
        k_cache = torch.full((count, case.page_size, case.heads_k, case.head_dim), float("nan")).to(E4M3)
        v_cache = torch.full((count, case.page_size, case.heads_k, case.head_dim_v), float("nan")).to(E4M3)
        for r in range(rows):
            for p in range(pages_per_row):
                k_cache[int(table[r, p])] = k8_rows[r, p * case.page_size : (p + 1) * case.page_size]
                v_cache[int(table[r, p])] = v8_rows[r, p * case.page_size : (p + 1) * case.page_size]
        extra["block_table"] = table.to(device)
    else:
        k_cache, v_cache = k8_rows.clone(), v8_rows.clone()
    if case.batch_idx:
        extra["cache_batch_idx"] = torch.tensor(case.batch_idx, dtype=torch.int32, device=device)
    k_cache, v_cache = k_cache.to(device), v_cache.to(device)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    for b, r in enumerate(row_of):
        for t in range(case.new_len):
            pos = case.cache_lens[b] + t
            if case.page_size:
                page, off = int(extra["block_table"][r, pos // case.page_size]), pos % case.page_size
                want_k[page, off], want_v[page, off] = k8_new[b, t], v8_new[b, t]
            else:
                want_k[r, pos], want_v[r, pos] = k8_new[b, t], v8_new[b, t]
    kd, vd = kd.to(device), vd.to(device)
    kw = _options(case, slopes)
    lens = torch.tensor(case.cache_lens, dtype=torch.int32, device=device)
    out, lse = attention_with_kvcache(
        q8, k_cache, v_cache, k8_new, v8_new, cache_seqlens=lens, **extra, **kw, q_descale=qd, k_descale=kd,
        v_descale=vd, out_dtype=case.dtype, return_lse=True, backend=name,
    )  # fmt: skip
    _dtypes(judge, case, out, lse)
    judge.same_bits("k_cache after the call", k_cache.view(torch.uint8), want_k.view(torch.uint8))
    judge.same_bits("v_cache after the call", v_cache.view(torch.uint8), want_v.view(torch.uint8))
    judge.finite("out", out)
    shape = (case.batch, case.seqlen_q, case.heads_q, case.head_dim_v)
    exact, plain = torch.zeros(shape, dtype=torch.float64, device=device), torch.zeros(shape, device=device)
    exact_lse = torch.full((case.batch, case.heads_q, case.seqlen_q), float("-inf"), dtype=torch.float64,
                           device=device)  # fmt: skip
    plain_lse = exact_lse.clone()
    for b, r in enumerate(row_of):
        n = case.cache_lens[b]
        keys = _row_slots(want_k, extra, r, n + case.new_len, case)
        values = _row_slots(want_v, extra, r, n + case.new_len, case)
        if keys.shape[0] == 0:
            continue
        one = (q8[b : b + 1], keys[None], values[None])
        row = dict(q_descale=qd[b : b + 1], k_descale=kd[b : b + 1], v_descale=vd[b : b + 1])
        row_kw = dict(kw, alibi_slopes=_row_slopes(slopes, b))
        e, e_lse = attention_fp8_ref(*one, **row, **row_kw, return_lse=True)
        exact[b], exact_lse[b] = e[0], e_lse[0]
        p, p_lse = attention_fp8_ref(*one, **row, **row_kw, upcast=False, p_fp8=False, return_lse=True)
        plain[b], plain_lse[b] = p[0].float(), p_lse[0].double()
    judge.rule("out", out, exact, plain, 2.0, atol=ATOL)
    judge.lse(lse, exact_lse, plain_lse)


def _row_slots(cache: torch.Tensor, extra: dict, r: int, n: int, case: Case) -> torch.Tensor:
    """The first ``n`` slots of logical cache row ``r`` (through its pages for a paged cache)."""
    if case.page_size:
        pages = extra["block_table"][r].long()
        return cache[pages].flatten(0, 1)[:n]
    return cache[r, :n]


def _row_slopes(slopes: torch.Tensor | None, b: int) -> torch.Tensor | None:
    return slopes if slopes is None or slopes.dim() == 1 else slopes[b : b + 1]


def _descale(x: torch.Tensor) -> torch.Tensor:
    """Descales per KV head of ``(tokens, heads_k, dim)`` values: amax / 448, 1 where all are 0 (or none)."""
    amax = x.abs().amax(dim=(0, 2)) if x.shape[0] else torch.zeros(x.shape[1])
    return torch.where(amax > 0, amax / torch.finfo(E4M3).max, torch.ones_like(amax))


def _dtypes(judge: Judge, case: Case, out: torch.Tensor, lse: torch.Tensor) -> None:
    if out.dtype != case.dtype or lse.dtype != torch.float32:
        judge.failures.append(f"dtypes: out {out.dtype}, lse {lse.dtype}; expected {case.dtype} and float32")


CHECKS = {"attention": check_attention, "varlen": check_varlen, "kvcache": check_kvcache}
