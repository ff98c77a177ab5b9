"""The ranks of the distributed tests: ``tests/test_distributed.py`` spawns ``world`` gloo processes (CPU) and
``tests/test_distributed_gpu.py`` NCCL ones (one GPU each); they run every case of one list and write what they
measured to ``<out>/rank<r>.json``; the tests then judge it.

Inputs are drawn from fixed seeds, so every rank builds the same global tensors, runs the single-process
operator on the whole sequence, and compares its own shard of the distributed result (and gradients) with the
matching rows. Each case is wrapped so that a failure is recorded (with its traceback) instead of ending the
process: every rank runs the same cases in the same order, so the collectives stay matched.
"""

from __future__ import annotations

import datetime
import json
import os
import traceback
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

DEVICE = torch.device("cpu")  # this rank's device, set by main()


@dataclass(frozen=True)
class Case:
    name: str
    kind: str = "dense"  # dense | varlen | deterministic | nan | unshard | error
    subgroup: bool = False  # run on a 2-rank subgroup ({0, 2} and {1, 3} of 4 ranks, side by side)
    strategy: str = "ring"
    layout: str = "zigzag"
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi: bool = False
    dtype: str = "float64"
    batch: int = 2
    seqlen: int = 20
    hq: int = 4
    hk: int = 2
    d: int = 8
    dv: int = 8
    lengths: tuple[int, ...] = ()  # varlen: sequence lengths (the rest of the packed rows is padding)
    error: str = ""  # error: which bad call


def _dense_cases(world: int) -> list[Case]:
    seqlen = 20 if world == 2 else 24  # chunks of 5 (2 ranks) and 3 (4 ranks) rows: odd block shapes
    cases = []
    dtypes = ("float64", "float32") if world == 2 else ("float64",)
    for strategy in ("ring", "allgather"):
        for layout in ("contiguous", "zigzag"):
            for causal in (False, True):
                for dtype in dtypes:
                    name = f"{strategy}-{layout}-{'causal' if causal else 'full'}-{dtype}"
                    cases.append(
                        Case(name, strategy=strategy, layout=layout, causal=causal, dtype=dtype, seqlen=seqlen)
                    )
    # Windows cut blocks into partial rectangles; softcap rides along. MHA and Dv != D here.
    for strategy in ("ring", "allgather"):
        for layout in ("contiguous", "zigzag"):
            for window, causal in (((3, 1), False), ((5, 0), True)):
                cases.append(
                    Case(
                        f"{strategy}-{layout}-window{window[0]}_{window[1]}-softcap",
                        strategy=strategy,
                        layout=layout,
                        causal=causal,
                        window=window,
                        softcap=1.5,
                        seqlen=seqlen,
                        hq=2,
                        hk=2,
                        dv=6,
                    )
                )
    if world == 4:
        cases.append(Case("ring-zigzag-causal-float32", causal=True, dtype="float32", seqlen=seqlen))
        # Group ranks 0, 1 are global ranks 1, 3 (or 0, 2): the ring must address peers by global rank.
        cases.append(Case("subgroup-ring-zigzag-causal", causal=True, subgroup=True, seqlen=20))
    for layout in ("contiguous", "zigzag"):
        cases.append(
            Case(
                f"allgather-{layout}-causal-alibi",
                strategy="allgather",
                layout=layout,
                causal=True,
                alibi=True,
                seqlen=seqlen,
            )
        )
    return cases


def _varlen_cases(world: int) -> list[Case]:
    # 2 ranks: 22 of 24 rows used (2 rows of padding); 4 ranks: 28 rows. Sequences cross rank boundaries.
    lengths = (5, 9, 1, 7) if world == 2 else (3, 11, 0, 6, 7)
    total = 24 if world == 2 else 28
    cases = [
        Case("varlen-full", kind="varlen", seqlen=total, lengths=lengths),
        Case("varlen-causal", kind="varlen", causal=True, seqlen=total, lengths=lengths),
        Case(
            "varlen-causal-alibi-float32",
            kind="varlen",
            causal=True,
            alibi=True,
            dtype="float32",
            seqlen=total,
            lengths=lengths,
        ),
    ]
    if world == 2:
        cases.append(
            Case("varlen-window3_2-softcap", kind="varlen", window=(3, 2), softcap=2.0, seqlen=total, lengths=lengths)
        )
    return cases


def cases_for(world: int) -> list[Case]:
    cases = _dense_cases(world) + _varlen_cases(world)
    seqlen = 20 if world == 2 else 24
    cases += [
        Case("deterministic-ring", kind="deterministic", causal=True, dtype="float32", seqlen=seqlen),
        Case(
            "deterministic-allgather",
            kind="deterministic",
            strategy="allgather",
            causal=True,
            dtype="float32",
            seqlen=seqlen,
        ),
        Case("nan-ring", kind="nan", causal=True, seqlen=seqlen),
        Case("unshard-grad", kind="unshard", seqlen=seqlen),
        Case("error-odd-local-length", kind="error", error="odd_local"),
        Case("error-shard-length", kind="error", error="shard_length"),
        Case("error-alibi-ring", kind="error", error="alibi_ring"),
        Case("error-alibi-varlen", kind="error", error="alibi_varlen"),
    ]
    return cases


# ---- running one case --------------------------------------------------------------------------------------------


def _draw(shape, dtype, seed, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=DEVICE)
    return x.requires_grad_(requires_grad)


def _slopes(n, heads, seed):
    return (torch.rand(n, heads, generator=torch.Generator().manual_seed(seed)) * 0.5).to(DEVICE)


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    from attnkit.testing import max_abs_error

    return max_abs_error(a, b)


def _dense_inputs(c: Case, dtype):
    q = _draw((c.batch, c.seqlen, c.hq, c.d), dtype, 1)
    k = _draw((c.batch, c.seqlen, c.hk, c.d), dtype, 2)
    v = _draw((c.batch, c.seqlen, c.hk, c.dv), dtype, 3)
    dout = _draw((c.batch, c.seqlen, c.hq, c.dv), dtype, 4, requires_grad=False)
    slopes = _slopes(c.batch, c.hq, 5) if c.alibi else None
    return q, k, v, dout, slopes


def _grads(out, dout, *xs):
    return torch.autograd.grad(out, xs, dout)


def _judge(c: Case, dtype, local, exact, plain) -> dict:
    """Errors of this rank's shard of each tensor. float64: against the float64 single-process result; lower
    precision: flash-attn's rule against the float64 reference, relative to plain PyTorch in the same dtype."""
    report = {}
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        err = _err(local[i], exact[i])
        if dtype == torch.float64:
            allowed = 1e-10
        else:
            allowed = (2.0 if name == "out" else 3.0) * _err(plain[i], exact[i]) + 1e-5
        report[name] = {"err": err, "allowed": allowed}
    return report


def _run_dense(c: Case, group, world) -> dict:
    import attnkit
    import attnkit.distributed as cp
    from attnkit.testing import attention_ref

    dtype = getattr(torch, c.dtype)
    q, k, v, dout, slopes = _dense_inputs(c, dtype)
    kw = dict(causal=c.causal, window_size=c.window, softcap=c.softcap, alibi_slopes=slopes)
    if dtype == torch.float64:
        ref = attnkit.attention(q, k, v, **kw)
        exact = (ref, *_grads(ref, dout, q, k, v))
        plain = exact
    else:
        ref = attention_ref(q, k, v, **kw)
        exact = (ref, *_grads(ref, dout.double(), q, k, v))
        naive = attention_ref(q, k, v, upcast=False, **kw)
        plain = (naive, *_grads(naive, dout, q, k, v))
    shard = lambda x: cp.shard(x.detach(), group, c.layout)
    ql, kl, vl = (shard(x).requires_grad_() for x in (q, k, v))
    out = cp.ring_attention(ql, kl, vl, group=group, layout=c.layout, strategy=c.strategy, **kw)
    local = (out, *_grads(out, shard(dout), ql, kl, vl))
    return _judge(c, dtype, local, tuple(shard(x) for x in exact), tuple(shard(x) for x in plain))


def _varlen_inputs(c: Case, dtype):
    offsets = [0]
    for n in c.lengths:
        offsets.append(offsets[-1] + n)
    cu = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    q = _draw((c.seqlen, c.hq, c.d), dtype, 11)
    k = _draw((c.seqlen, c.hk, c.d), dtype, 12)
    v = _draw((c.seqlen, c.hk, c.dv), dtype, 13)
    dout = _draw((c.seqlen, c.hq, c.dv), dtype, 14, requires_grad=False)
    n = len(c.lengths)
    slopes = _slopes(n, c.hq, 15) if c.alibi else None
    return q, k, v, dout, cu, slopes


def _run_varlen(c: Case, group, world) -> dict:
    import attnkit
    import attnkit.distributed as cp
    from attnkit.testing import attention_varlen_ref

    dtype = getattr(torch, c.dtype)
    q, k, v, dout, cu, slopes = _varlen_inputs(c, dtype)
    longest = max(c.lengths)
    kw = dict(causal=c.causal, window_size=c.window, softcap=c.softcap, alibi_slopes=slopes)
    if dtype == torch.float64:
        ref = attnkit.attention_varlen(q, k, v, cu, cu, longest, longest, **kw)
        exact = (ref, *_grads(ref, dout, q, k, v))
        plain = exact
    else:
        ref = attention_varlen_ref(q, k, v, cu, cu, longest, longest, **kw)
        exact = (ref, *_grads(ref, dout.double(), q, k, v))
        # The plain version returns only the rows of the sequences: pad it back with the padding rows' zeros.
        naive = attention_varlen_ref(q, k, v, cu, cu, longest, longest, upcast=False, **kw)
        grads = _grads(naive, dout[: naive.shape[0]], q, k, v)
        plain = (torch.cat([naive, naive.new_zeros((c.seqlen - naive.shape[0], *naive.shape[1:]))]), *grads)
    shard = lambda x: cp.shard(x.detach(), group, "contiguous", dim=0)
    ql, kl, vl = (shard(x).requires_grad_() for x in (q, k, v))
    out = cp.ring_attention_varlen(ql, kl, vl, cu, group=group, **kw)
    local = (out, *_grads(out, shard(dout), ql, kl, vl))
    return _judge(c, dtype, local, tuple(shard(x) for x in exact), tuple(shard(x) for x in plain))


def _run_deterministic(c: Case, group, world) -> dict:
    import attnkit.distributed as cp

    q, k, v, dout, _ = _dense_inputs(c, getattr(torch, c.dtype))
    runs = []
    for _ in range(2):
        ql, kl, vl = (cp.shard(x.detach(), group, c.layout).requires_grad_() for x in (q, k, v))
        out = cp.ring_attention(ql, kl, vl, group=group, causal=c.causal, strategy=c.strategy, deterministic=True)
        runs.append((out, *_grads(out, cp.shard(dout, group, c.layout), ql, kl, vl)))
    return {"bitwise_equal": all(torch.equal(a, b) for a, b in zip(*runs))}


def _run_nan(c: Case, group, world) -> dict:
    import attnkit
    import attnkit.distributed as cp

    q, k, v, _, _ = _dense_inputs(c, torch.float64)
    q, k = q.detach().clone(), k.detach().clone()
    q[0, 3, 1, 0] = float("nan")  # one query row of one head
    k[1, 7, 0, 2] = float("nan")  # one key: reaches the rows of batch 1 that see position 7
    # The reference backend skips masked pairs, so a NaN key reaches exactly the rows that see it (other backends
    # may spread it to masked rows too): compare NaN patterns with the same block operator on both sides.
    ref = attnkit.attention(q, k, v.detach(), causal=c.causal, backend="reference")
    parts = (cp.shard(x, group, c.layout) for x in (q, k, v.detach()))
    out = cp.ring_attention(*parts, group=group, layout=c.layout, causal=c.causal, backend="reference")
    mine = cp.shard(ref, group, c.layout)
    return {
        "same_nan_pattern": bool(torch.equal(out.isnan(), mine.isnan())),
        "some_nan": bool(ref.isnan().any()),
        "finite_err": _err(out.nan_to_num(0.0), mine.nan_to_num(0.0)),
    }


def _run_unshard(c: Case, group, world) -> dict:
    import attnkit.distributed as cp

    x = _draw((c.batch, c.seqlen, c.hq, c.d), torch.float64, 21, requires_grad=False)
    report = {}
    for layout in ("contiguous", "zigzag"):
        part = cp.shard(x, group, layout).requires_grad_()
        whole = cp.unshard(part, group, layout)
        weight = _draw(x.shape, torch.float64, 22, requires_grad=False)
        (grad,) = torch.autograd.grad((whole * weight).sum(), part)
        # Every rank computed the same loss, so the gradient is world_size times the single-process one.
        report[layout] = {
            "roundtrip_equal": bool(torch.equal(whole, x)),
            "grad_err": _err(grad, world * cp.shard(weight, group, layout)),
        }
    return report


def _run_error(c: Case, group, world) -> dict:
    import attnkit.distributed as cp
    from attnkit.errors import InvalidArgumentError

    q, k, v, _, slopes = _dense_inputs(Case("x", seqlen=4 * world, alibi=True), torch.float64)
    q, k, v = q.detach(), k.detach(), v.detach()
    calls = {
        # Local length 3: zigzag needs two equal chunks per rank.
        "odd_local": lambda: cp.ring_attention(q[:, :3], k[:, :3], v[:, :3], group=group, layout="zigzag"),
        # Global length 4 * world + 2: not a multiple of 2 * world.
        "shard_length": lambda: cp.shard(torch.zeros(1, 4 * world + 2, 1, 1, device=DEVICE), group, "zigzag"),
        "alibi_ring": lambda: cp.ring_attention(q, k, v, group=group, causal=True, alibi_slopes=slopes),
        "alibi_varlen": lambda: cp.ring_attention_varlen(
            q[0],
            k[0],
            v[0],
            torch.tensor([0, 4 * world * world], dtype=torch.int32, device=DEVICE),
            group=group,
            alibi_slopes=slopes[0],
        ),
    }
    try:
        calls[c.error]()
    except InvalidArgumentError as e:
        return {"raised": True, "message": str(e)}
    return {"raised": False, "message": ""}


RUNNERS = {
    "dense": _run_dense,
    "varlen": _run_varlen,
    "deterministic": _run_deterministic,
    "nan": _run_nan,
    "unshard": _run_unshard,
    "error": _run_error,
}


def gpu_cases(world: int) -> list[Case]:
    """bf16 on GPUs (the Triton/CuPy blocks), head dim 128, a few hundred tokens per rank."""
    seqlen = 1024 if world == 2 else 2048
    big = dict(batch=1, seqlen=seqlen, hq=8, hk=2, d=128, dv=128, dtype="bfloat16")
    cases = []
    for strategy in ("ring", "allgather"):
        for layout in ("contiguous", "zigzag"):
            for causal in (False, True):
                name = f"gpu-{strategy}-{layout}-{'causal' if causal else 'full'}-bf16"
                cases.append(Case(name, strategy=strategy, layout=layout, causal=causal, **big))
    cases += [
        Case("gpu-ring-zigzag-window-softcap-bf16", causal=True, window=(300, 0), softcap=20.0, **big),
        Case("gpu-allgather-zigzag-causal-alibi-bf16", strategy="allgather", causal=True, alibi=True, **big),
        Case(
            "gpu-varlen-causal-bf16",
            kind="varlen",
            causal=True,
            lengths=(100, 700, 5, 1100, 96),
            **dict(big, seqlen=2048),
        ),
        Case("gpu-deterministic-ring", kind="deterministic", causal=True, **big),
    ]
    return cases


def main(rank: int, world: int, store: str, out_dir: str, device: str = "cpu") -> None:
    """Entry point of one spawned rank (``torch.multiprocessing.spawn``): gloo on CPU, NCCL on GPU ``rank``."""
    global DEVICE
    torch.set_num_threads(1)
    if device == "cuda":
        for name, value in (
            ("NCCL_NVLS_ENABLE", "0"),
            ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
            ("NVSHMEM_DISABLE_NVLS", "1"),
        ):
            os.environ[name] = value
        DEVICE = torch.device("cuda", rank)
        torch.cuda.set_device(DEVICE)
    dist.init_process_group(
        "nccl" if device == "cuda" else "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    group = dist.new_group(list(range(world)))  # an explicit group, not the default one
    halves = [dist.new_group([0, 2]), dist.new_group([1, 3])] if world == 4 else None
    results = {}
    for c in cases_for(world) if device == "cpu" else gpu_cases(world):
        g, w = (halves[rank % 2], 2) if c.subgroup else (group, world)
        try:
            results[c.name] = {"case": asdict(c), "result": RUNNERS[c.kind](c, g, w)}
        except Exception:
            results[c.name] = {"case": asdict(c), "crash": traceback.format_exc()}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()  # nobody tears the group down while a peer still talks to it
    dist.destroy_process_group()
