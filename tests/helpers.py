"""Small helpers shared by the CPU tests (import as ``from helpers import ...``; tests/ is on sys.path)."""

from __future__ import annotations

import math

import torch

from attnkit.spec import AttentionSpec

F64 = torch.float64

_SPEC_DEFAULTS = dict(
    op="attention",
    device_type="cuda",
    compute_capability=(8, 0),
    is_hip=False,
    dtype=torch.float16,
    head_dim=64,
    head_dim_v=64,
    num_heads_q=8,
    num_heads_k=8,
    batch=2,
    seqlen_q=128,
    seqlen_k=128,
)


def make_spec(**fields) -> AttentionSpec:
    """An AttentionSpec built by hand, for tests that ask backends about a call without making it: fp16 on an
    sm_80 CUDA device, batch 2, 8 query and 8 KV heads of 64, 128 query and key rows, unless ``fields`` say
    otherwise. A spec off CUDA has no compute capability unless one is given."""
    if fields.get("device_type", "cuda") != "cuda":
        fields.setdefault("compute_capability", None)
    return AttentionSpec(**{**_SPEC_DEFAULTS, **fields})


def rand(*shape, dtype=F64, requires_grad=False, seed=None, scale=1.0):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    x = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return x.requires_grad_(requires_grad)


def qkv(b, sq, sk, hq, hk, d, dv=None, *, dtype=F64, requires_grad=False, seed=0):
    dv = d if dv is None else dv
    return (
        rand(b, sq, hq, d, dtype=dtype, requires_grad=requires_grad, seed=seed),
        rand(b, sk, hk, d, dtype=dtype, requires_grad=requires_grad, seed=seed + 1),
        rand(b, sk, hk, dv, dtype=dtype, requires_grad=requires_grad, seed=seed + 2),
    )


def cu_seqlens(lengths):
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32)


def plain_attention(q, k, v, causal=False):
    """Attention computed the plain way in the inputs' dtype, K/V heads repeated for GQA, causal aligned
    bottom-right, rows that see no key 0: a right answer for the benchmark's tests at low precision."""
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    if causal:
        sq, sk = q.shape[1], k.shape[1]
        rows = torch.arange(sq, device=q.device)[:, None]
        cols = torch.arange(sk, device=q.device)[None, :]
        scores = scores.masked_fill(cols > rows + sk - sq, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def visible(i, j, sq, sk, left, right):
    """The masking rule of attnkit.params, written out for one (i, j) pair."""
    d = i + sk - sq - j
    return (left < 0 or d <= left) and (right < 0 or d >= -right)


def loop_attention(q, k, v, *, causal=False, scale=None, window=(-1, -1), softcap=0.0, slopes=None):
    """Attention written as plain Python loops over (b, h, i) in float64: the most direct statement of the
    semantics, for tiny shapes only. Returns (out, lse) with lse (B, H, Sq)."""
    q, k, v = q.double(), k.double(), v.double()
    b_, sq, hq, d = q.shape
    sk, hk, dv = k.shape[1], k.shape[2], v.shape[3]
    scale = 1 / math.sqrt(d) if scale is None else scale
    left, right = window
    if causal:
        right = 0
    out = torch.zeros(b_, sq, hq, dv, dtype=F64)
    lse = torch.full((b_, hq, sq), -math.inf, dtype=F64)
    for b in range(b_):
        for h in range(hq):
            hkv = h // (hq // hk)
            for i in range(sq):
                scores, values = [], []
                for j in range(sk):
                    if not visible(i, j, sq, sk, left, right):
                        continue
                    s = scale * float(q[b, i, h] @ k[b, j, hkv])
                    if softcap > 0:
                        s = softcap * math.tanh(s / softcap)
                    if slopes is not None:
                        slope = float(slopes[h] if slopes.dim() == 1 else slopes[b, h])
                        s -= slope * abs(i + sk - sq - j)
                    scores.append(s)
                    values.append(v[b, j, hkv])
                if not scores:
                    continue
                m = max(scores)
                w = [math.exp(s - m) for s in scores]
                total = sum(w)
                lse[b, h, i] = m + math.log(total)
                out[b, i, h] = sum(wi / total * vi for wi, vi in zip(w, values))
    return out, lse


def assert_close(actual, expected, atol=1e-9, rtol=1e-7, msg=""):
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=atol, rtol=rtol, equal_nan=True, msg=msg or None
    )


def record_read_backs(monkeypatch, *modules: str) -> list[str]:
    """Record every read of a tensor's values back to the host (``tolist``, ``item``, ``bool``/``int``/``float`` of
    a tensor) made directly by code in the given files (paths relative to the repository root, e.g.
    ``attnkit/ops/kvcache.py``); on a GPU each one is a device synchronisation. Returns the list, filled as it goes."""
    import os
    import sys

    suffixes = tuple(os.path.join(*m.split("/")) for m in modules)
    seen: list[str] = []
    for attr in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__"):
        real = getattr(torch.Tensor, attr)

        def spy(self, *args, _real=real, _attr=attr):
            frame = sys._getframe(1)
            if frame.f_code.co_filename.endswith(suffixes):
                seen.append(f"{_attr} at {frame.f_code.co_filename}:{frame.f_lineno}")
            return _real(self, *args)

        monkeypatch.setattr(torch.Tensor, attr, spy)
    return seen


H200_SMEM = 227 * 1024  # opt-in shared memory per block on an H100/H200


def record_cupy_launches(monkeypatch, smem_limit: int = H200_SMEM) -> list[dict]:
    """Replace the CuPy backend's GPU launcher by a recorder on an sm_90 device: every launch the backend makes is
    appended to the returned list as ``dict(spec, name, grid, threads, smem, args)`` instead of running."""
    from attnkit.backends.cupy import backend as cb

    calls: list[dict] = []

    class Recorder:
        def __init__(self, device):
            self.index = 0

        def smem_limit(self):
            return smem_limit

        def __call__(self, spec, name, grid, threads, smem, args):
            calls.append(dict(spec=spec, name=name, grid=grid, threads=threads, smem=smem, args=args))

    monkeypatch.setattr(cb, "Launcher", Recorder)
    monkeypatch.setattr(cb, "_arch", lambda dev: "sm_90")
    return calls


def record_cupy_tma_launches(monkeypatch, smem_limit: int = H200_SMEM) -> list[dict]:
    """:func:`record_cupy_launches` with the wgmma/TMA kernels allowed and the driver's tensor-map encoder replaced
    by the checked description it would get (the recorded map arguments are ``tma.TiledArguments``)."""
    from attnkit.backends.cupy import tma

    calls = record_cupy_launches(monkeypatch, smem_limit)
    monkeypatch.setattr(tma, "encode", lambda args: args)
    monkeypatch.delenv("ATTNKIT_CUPY_TMA", raising=False)
    monkeypatch.delenv("ATTNKIT_CUPY_WGMMA", raising=False)
    return calls


def ints(args, start: int, n: int) -> list[int]:
    """``n`` recorded kernel arguments from ``start``, as Python ints."""
    return [int(a) for a in args[start : start + n]]
