"""NaN confinement checks shared by the reference and Triton test files (import as ``from nan_checks import ...``).

Poison what no row may see (varlen padding past the last sequence, other sequences, tensor rows past the view a
dense call gets) with NaN and -inf, and require the outputs and gradients of the clean rows to be finite and equal
to the unpoisoned call, like xformers' NaN-padding test.
"""

from __future__ import annotations

import torch

import attnkit

POISONS = (float("nan"), float("-inf"))


def _rand(*shape: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _run(call, tensors: list[torch.Tensor], grad_seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = call(*leaves)
    g = _rand(*out.shape, seed=grad_seed, dtype=out.dtype)
    return out.detach(), list(torch.autograd.grad(out, leaves, g))


def _same(got: torch.Tensor, want: torch.Tensor, what: str, atol: float) -> None:
    assert bool(torch.isfinite(got).all()), f"{what}: non-finite values leaked"
    torch.testing.assert_close(got, want, atol=atol, rtol=0, msg=what)


def check_varlen_padding(backend: str, dtype: torch.dtype = torch.float32, atol: float = 0.0, **kw) -> None:
    """Rows past cu_seqlens[-1] of q, k, v hold NaN/inf: real rows are unchanged, padding gets 0 out and 0 grads."""
    lens_q, lens_k, pad = [5, 0, 19, 3], [7, 4, 11, 0], 6
    tq, tk = sum(lens_q), sum(lens_k)
    q, k, v = (_rand(n + pad, h, 16, seed=s, dtype=dtype) for n, h, s in ((tq, 4, 1), (tk, 2, 2), (tk, 2, 3)))
    cq, ck = _cu(lens_q), _cu(lens_k)

    def call(q_, k_, v_):
        return attnkit.attention_varlen(q_, k_, v_, cq, ck, 19, 11, backend=backend, **kw)

    clean_out, clean_grads = _run(call, [q, k, v], 4)
    for poison in POISONS:
        bad = [t.clone() for t in (q, k, v)]
        bad[0][tq:] = poison
        bad[1][tk:] = poison
        bad[2][tk:] = poison
        out, grads = _run(call, bad, 4)
        _same(out[:tq], clean_out[:tq], f"out rows, padding {poison}", atol)
        assert bool((out[tq:] == 0).all()), f"padding rows of out must be 0 (padding {poison})"
        for name, g, cg, n in zip(("dq", "dk", "dv"), grads, clean_grads, (tq, tk, tk)):
            _same(g[:n], cg[:n], f"{name}, padding {poison}", atol)
            assert bool((g[n:] == 0).all()), f"{name} of padding rows must be 0 (padding {poison})"


def check_varlen_other_sequences(backend: str, dtype: torch.dtype = torch.float32, atol: float = 0.0, **kw) -> None:
    """NaN/inf in one sequence's q, k, v reaches no other sequence's outputs or gradients."""
    lens_q, lens_k = [5, 9, 3], [7, 13, 2]
    tq, tk = sum(lens_q), sum(lens_k)
    q, k, v = (_rand(n, h, 16, seed=s, dtype=dtype) for n, h, s in ((tq, 2, 1), (tk, 1, 2), (tk, 1, 3)))
    cq, ck = _cu(lens_q), _cu(lens_k)

    def call(q_, k_, v_):
        return attnkit.attention_varlen(q_, k_, v_, cq, ck, 9, 13, backend=backend, **kw)

    clean_out, clean_grads = _run(call, [q, k, v], 4)
    rows_q, rows_k = slice(5, 14), slice(7, 20)  # sequence 1
    keep_q = torch.ones(tq, dtype=torch.bool)
    keep_q[rows_q] = False
    keep_k = torch.ones(tk, dtype=torch.bool)
    keep_k[rows_k] = False
    for poison in POISONS:
        bad = [t.clone() for t in (q, k, v)]
        bad[0][rows_q.start + 2] = poison
        bad[1][rows_k.start + 1] = poison
        bad[2][rows_k.stop - 1] = poison
        out, grads = _run(call, bad, 4)
        _same(out[keep_q], clean_out[keep_q], f"out of other sequences, poison {poison}", atol)
        for name, g, cg, keep in zip(("dq", "dk", "dv"), grads, clean_grads, (keep_q, keep_k, keep_k)):
            _same(g[keep], cg[keep], f"{name} of other sequences, poison {poison}", atol)


def check_dense_rows_past_the_view(backend: str, dtype: torch.dtype = torch.float32, atol: float = 0.0, **kw) -> None:
    """q, k, v are views of longer buffers whose extra rows (past seqlen_q / seqlen_k) hold NaN/inf: they are
    never read, so the result equals the call on clean copies."""
    b, sq, sk, extra = 2, 37, 21, 27
    q, k, v = (_rand(b, n, h, 16, seed=s, dtype=dtype) for n, h, s in ((sq, 2, 1), (sk, 1, 2), (sk, 1, 3)))

    def call(q_, k_, v_):
        return attnkit.attention(q_, k_, v_, backend=backend, **kw)

    clean_out, clean_grads = _run(call, [q, k, v], 4)
    for poison in POISONS:
        views, leaves = [], []
        for t in (q, k, v):
            big = torch.full((t.shape[0], t.shape[1] + extra, *t.shape[2:]), poison, dtype=dtype)
            big[:, : t.shape[1]] = t
            big.requires_grad_()
            leaves.append(big)
            views.append(big[:, : t.shape[1]])
        out = call(*views)
        g = _rand(*out.shape, seed=4, dtype=out.dtype)
        grads = torch.autograd.grad(out, leaves, g)
        _same(out.detach(), clean_out, f"out, poison {poison}", atol)
        for name, gr, cg, t in zip(("dq", "dk", "dv"), grads, clean_grads, (q, k, v)):
            _same(gr[:, : t.shape[1]], cg, f"{name}, poison {poison}", atol)
