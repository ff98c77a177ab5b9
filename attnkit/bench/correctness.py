"""Correctness of a provider on the very inputs it is about to be timed on.

The provider's output (and, when training, its gradients) is compared with an exact float64 computation. At
large sizes only a slice is recomputed: batch 0, the first and last query heads, and the last query rows (each
output row and its dq row depend only on that row's query and all keys, so the slice is exact; causal rows are
bottom-right aligned, so the last rows of q see the same keys as in the full problem). dk and dv depend on every
row and are checked when the whole problem is small enough to recompute.

Tolerance follows flash-attn's rule: error <= factor x (error of plain PyTorch attention in the input dtype)
+ atol, with factor 2 for the output and 3 for gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cases import Case, scores_elements
from .providers import AttnFn

SLICE_ROWS = 128
# Recompute everything (and check dk, dv) when the scores and the K/V repeated per query head (float64) are small.
FULL_CHECK_SCORES = 1 << 22
FULL_CHECK_KV = 1 << 23
OUT_FACTOR = 2.0
GRAD_FACTOR = 3.0
ATOL = {torch.float16: 1e-3, torch.bfloat16: 1e-3, torch.float32: 1e-5, torch.float64: 1e-8}


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


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dtype: torch.dtype):
    """Plain attention in ``dtype`` with as many K/V heads as query heads; causal aligned bottom-right."""
    scale = q.shape[-1] ** -0.5
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(dtype), k.to(dtype)) * scale
    if causal:
        sq, sk = q.shape[1], k.shape[1]
        rows = torch.arange(sq, device=q.device)[:, None]
        cols = torch.arange(sk, device=q.device)[None, :]
        scores = scores.masked_fill(cols > rows + sk - sq, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows that see no key give 0, as in flash-attn
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.to(dtype))


def _reference(q, k, v, dout, causal: bool, dtype: torch.dtype, grads: bool) -> list[torch.Tensor]:
    leaves = [t.detach().to(dtype).requires_grad_(grads) for t in (q, k, v)]
    with torch.enable_grad():
        out = reference_attention(*leaves, causal, dtype)
        if not grads:
            return [out.detach().double()]
        dq, dk, dv = torch.autograd.grad(out, leaves, dout.to(dtype))
    return [t.detach().double() for t in (out, dq, dk, dv)]


def _max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise ValueError(f"shape {tuple(a.shape)} != expected {tuple(b.shape)}")
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


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
           case: Case) -> Verdict:  # fmt: skip
    """Run ``fn`` once on these inputs (with a backward pass when the case trains) and judge the results.

    The inputs are the case's own (K/V with ``case.heads_k`` heads); a kernel that wants them transformed first
    (K/V repeated per query head) is passed with the transform inside ``fn``."""
    _check_shapes(case, q, k, v, dout)
    grads = case.needs_grad
    if grads:
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        with torch.enable_grad():
            out = fn(*leaves)
            got_grads = torch.autograd.grad(out, leaves, dout)
    else:
        with torch.no_grad():
            out = fn(q, k, v)
        got_grads = ()
    hq, hk = case.heads_q, case.heads_k
    group = hq // hk
    expanded_kv = case.batch * case.seqlen_k * hq * case.head_dim
    full = scores_elements(case) <= FULL_CHECK_SCORES and expanded_kv <= FULL_CHECK_KV
    if full:
        batches, heads, rows = slice(None), list(range(hq)), case.seqlen_q
        scope = "full output" + (", dq, dk, dv" if grads else "")
    else:
        batches, heads, rows = slice(0, 1), sorted({0, hq - 1}), min(case.seqlen_q, SLICE_ROWS)
        scope = f"batch 0, heads {heads}, last {rows} rows" + (", out and dq" if grads else "")
    kv_heads = [h // group for h in heads]
    qs, ks, vs = q[batches, -rows:][:, :, heads], k[batches][:, :, kv_heads], v[batches][:, :, kv_heads]
    douts = dout[batches, -rows:][:, :, heads] if grads else None
    exact = _reference(qs, ks, vs, douts, case.causal, torch.float64, grads)
    plain = _reference(qs, ks, vs, douts, case.causal, case.torch_dtype, grads)
    names = ["out", "dq"] if grads else ["out"]
    got = [out[batches, -rows:][:, :, heads]]
    if grads:
        got.append(got_grads[0][batches, -rows:][:, :, heads])
    if grads and full:
        # The reference saw K/V repeated per query head; fold the group back to compare with (.., hk, d).
        names += ["dk", "dv"]
        got += [got_grads[1], got_grads[2]]
        for i in (2, 3):
            b, s, _, d = exact[i].shape
            exact[i] = exact[i].reshape(b, s, hk, group, d).sum(3)
            plain[i] = plain[i].double().reshape(b, s, hk, group, d).sum(3)
    atol = ATOL.get(case.torch_dtype, 1e-3)
    errors, allowed = {}, {}
    for i, name in enumerate(names):
        factor = OUT_FACTOR if name == "out" else GRAD_FACTOR
        errors[name] = _max_error(got[i], exact[i])
        allowed[name] = factor * _max_error(plain[i], exact[i]) + atol
    ok = all(errors[n] <= allowed[n] for n in names)  # False for NaN errors too
    return Verdict(ok, errors, allowed, scope)
