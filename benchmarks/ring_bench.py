"""Context-parallel attention on N GPUs (NCCL): scaling against one GPU, and how much communication is hidden.

For every total sequence length (default 32k-256k tokens, batch 1, head dim 128, bf16) and mask, each rank times

* ``single``: ``attnkit.attention`` on the whole sequence on its own GPU (the one-GPU baseline),
* ``cp``: ``attnkit.distributed.ring_attention`` on its shard (per strategy / layout),
* for the ring strategy also ``compute``: the same ring with nothing sent (each step reuses the rank's own K/V:
  same plan, same block shapes) and ``comm``: the same point-to-point shifts with no attention in between,

for the forward alone and forward + backward. A time is the slowest rank's median over ``--repeats`` runs. Then

* scaling efficiency = ``single / (W * cp)`` (1.0 = perfect strong scaling), speedup = ``single / cp``;
* hidden communication = ``(compute + comm - cp) / comm``, clipped to [0, 1]: the share of the transfer time that
  overlapped with attention (1.0 = the ring costs no more than its compute).

Each case also checks the distributed output against the one-GPU output (``max_abs_err``).

Launch on one host with N GPUs (either form)::

    python benchmarks/ring_bench.py --nprocs 8 --out benchmarks/results/ring_h200x8
    torchrun --nproc-per-node 8 benchmarks/ring_bench.py --out benchmarks/results/ring_h200x8

On CPU with gloo and tiny sizes (what the test suite runs, to keep this script working)::

    python benchmarks/ring_bench.py --device cpu --nprocs 2 --seqlens 32,64 --heads 2 --head-dim 16 \\
        --dtype float32 --repeats 1 --warmup 0 --out /tmp/ring_bench

Writes ``results.json`` and ``results.md`` to ``--out`` (rewritten after every case) and prints the table.
"""

from __future__ import annotations

import os

# NVLink SHARP / multicast stay off on the lent machines (set before torch or NCCL read them).
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}


def _tokens(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        out.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nprocs", type=int, default=None, help="ranks to spawn (default: every visible GPU)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--seqlens", default="32k,64k,128k,256k", help="total tokens per sequence, comma list")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (MHA)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--causal", choices=["true", "false", "both"], default="both")
    p.add_argument("--modes", default="fwd,fwdbwd", help="fwd and/or fwdbwd")
    p.add_argument("--strategies", default="ring:zigzag,allgather:zigzag",
                   help="strategy:layout pairs (ring:zigzag, ring:contiguous, allgather:zigzag, ...)")  # fmt: skip
    p.add_argument("--backend", default="auto", help="attnkit backend for every block (default auto)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per measurement (include Triton tuning)")
    p.add_argument("--no-single", action="store_true", help="skip the one-GPU baseline (no efficiency then)")
    p.add_argument("--time-budget", type=float, default=420.0, help="seconds; no new case starts after that")
    p.add_argument("--out", default=None, help="directory for results.json / results.md")
    args = p.parse_args(argv)
    args.seqlens = _tokens(args.seqlens)
    args.kv_heads = args.kv_heads or args.heads
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.strategies = [tuple(s.split(":")) for s in args.strategies.split(",") if s.strip()]
    return args


# ---- timing ------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], args, device: torch.device, group) -> float:
    """The slowest rank's median wall time of ``fn`` in seconds (every rank starts together)."""
    for _ in range(args.warmup):
        fn()
    samples = []
    for _ in range(args.repeats):
        _sync(device)
        dist.barrier(group)
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(samples)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def _attention_flops(batch: int, seqlen: int, heads: int, head_dim: int, causal: bool, mode: str) -> float:
    fwd = 4.0 * batch * heads * seqlen * seqlen * head_dim * (0.5 if causal else 1.0)
    return fwd * (3.5 if mode == "fwdbwd" else 1.0)


# ---- one case ----------------------------------------------------------------------------------------------------


def _run(call: Callable[[], torch.Tensor], mode: str, dout: torch.Tensor) -> Callable[[], None]:
    def go():
        out = call()
        if mode == "fwdbwd":
            out.backward(dout)

    return go


def _comm_only(ring, k: torch.Tensor, v: torch.Tensor, mode: str, strategy: str, group, world: int):
    """The transfers of one call without its attention: the ring's shifts, or the all-gather (and all-to-all)."""
    from attnkit.distributed import _comm

    acc = torch.float64 if k.dtype == torch.float64 else torch.float32

    def go():
        if strategy == "allgather":
            passes = 2 if mode == "fwdbwd" else 1
            for _ in range(passes):
                _comm.all_gather(k, group, world)
                _comm.all_gather(v, group, world)
            if mode == "fwdbwd":
                for x in (k, v):
                    _comm.reduce_to_owners(torch.zeros((world, *x.shape), dtype=acc, device=x.device), group, world)
            return
        kv = [k, v]
        rounds = 2 if mode == "fwdbwd" else 1
        for _ in range(rounds):
            for _ in range(world - 1):
                kv = ring.shift(kv).wait()
        if mode == "fwdbwd":
            grads = [torch.zeros(k.shape, dtype=acc, device=k.device), torch.zeros(v.shape, dtype=acc, device=v.device)]
            for _ in range(world):
                grads = ring.shift(grads).wait()

    return go


def measure(args, seqlen: int, causal: bool, mode: str, rank: int, world: int, device, group) -> list[dict]:
    import attnkit
    import attnkit.distributed as cp
    from attnkit.distributed import _api, _comm

    dtype = DTYPES[args.dtype]
    grad = mode == "fwdbwd"
    # Drawn on the device from one seed: every rank builds the same global tensors without a host round trip.
    g = torch.Generator(device=device).manual_seed(seqlen)
    shape_q = (args.batch, seqlen, args.heads, args.head_dim)
    shape_k = (args.batch, seqlen, args.kv_heads, args.head_dim)
    draw = lambda shape: torch.randn(shape, generator=g, device=device, dtype=dtype)
    q, k, v, dout = draw(shape_q), draw(shape_k), draw(shape_k), draw(shape_q)
    rows = []
    single, ref = None, None
    if not args.no_single:
        leaves = [x.clone().requires_grad_(grad) for x in (q, k, v)]
        call = lambda: attnkit.attention(*leaves, causal=causal, backend=args.backend)
        try:
            single = timed(_run(call, mode, dout), args, device, group)
            with torch.no_grad():
                ref = attnkit.attention(q, k, v, causal=causal, backend=args.backend)
        except torch.OutOfMemoryError:
            single = None
        del leaves
    for strategy, layout in args.strategies:
        parts = [cp.shard(x, group, layout).requires_grad_(grad) for x in (q, k, v)]
        local_dout = cp.shard(dout, group, layout)
        kw = dict(group=group, causal=causal, layout=layout, strategy=strategy, backend=args.backend)
        call = lambda kw=kw, parts=parts: cp.ring_attention(*parts, **kw)
        t_cp = timed(_run(call, mode, local_dout), args, device, group)
        row = {
            "seqlen": seqlen, "causal": causal, "mode": mode, "strategy": strategy, "layout": layout,
            "world": world, "single_s": single, "cp_s": t_cp,
        }  # fmt: skip
        ring = _comm.Ring(group, rank, world)
        t_comm = timed(
            _comm_only(ring, parts[1].detach(), parts[2].detach(), mode, strategy, group, world), args, device, group
        )
        row["comm_s"] = t_comm
        if strategy == "ring":
            full = dict(kw, softmax_scale=None, window_size=(-1, -1), alibi_slopes=None, softcap=0.0,
                        deterministic=False, return_lse=False)  # fmt: skip
            loop = lambda full=full, parts=parts: _api._dense(*parts, loopback=True, **full)
            t_compute = timed(_run(loop, mode, local_dout), args, device, group)
            row["compute_s"] = t_compute
            hidden = (t_compute + t_comm - t_cp) / t_comm if t_comm > 0 else None
            row["hidden_comm"] = None if hidden is None else min(1.0, max(0.0, hidden))
        if single is not None:
            row["speedup"] = single / t_cp
            row["efficiency"] = single / (world * t_cp)
        flops = _attention_flops(args.batch, seqlen, args.heads, args.head_dim, causal, mode)
        row["tflops_per_gpu"] = flops / (world * t_cp) / 1e12
        if ref is not None:
            with torch.no_grad():
                out = cp.ring_attention(*(x.detach() for x in parts), **kw)
                err = (out.float() - cp.shard(ref, group, layout).float()).abs().max()
            dist.all_reduce(err, op=dist.ReduceOp.MAX, group=group)
            row["max_abs_err"] = float(err.item())
        rows.append(row)
        del parts
    return rows


# ---- report ------------------------------------------------------------------------------------------------------


def _fmt(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def markdown(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| tokens | mask | mode | strategy | 1 GPU ms | CP ms | speedup | efficiency | TFLOP/s/GPU | compute ms "
        "| comm ms | hidden comm | max err |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ms = lambda key, r=r: _fmt(None if r.get(key) is None else 1e3 * r[key], ".1f")
        lines.append(
            f"| {r['seqlen']} | {'causal' if r['causal'] else 'full'} | {r['mode']} | {r['strategy']}:{r['layout']} "
            f"| {ms('single_s')} | {ms('cp_s')} | {_fmt(r.get('speedup'), '.2f')} | {_fmt(r.get('efficiency'), '.2f')} "
            f"| {_fmt(r.get('tflops_per_gpu'), '.1f')} | {ms('compute_s')} | {ms('comm_s')} "
            f"| {_fmt(r.get('hidden_comm'), '.2f')} | {_fmt(r.get('max_abs_err'), '.2e')} |"
        )
    return "\n".join(lines) + "\n"


def _write(args, rows: list[dict], meta: dict, skipped: list[str]) -> None:
    header = (
        f"# Context parallelism: {meta['world']} x {meta['device_name']}, {args.dtype}, batch {args.batch}, "
        f"{args.heads}/{args.kv_heads} heads, head dim {args.head_dim}, {meta['backend']} ({meta['date']})"
    )
    text = markdown(rows, header)
    if skipped:
        text += "\nNot run (time budget): " + ", ".join(skipped) + "\n"
    print(text, flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows, "skipped": skipped}, f, indent=1)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(text)


# ---- processes ---------------------------------------------------------------------------------------------------


def run_rank(rank: int, world: int, args, init_method: str | None) -> None:
    device = torch.device("cuda", rank % torch.cuda.device_count()) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kw = dict(backend=backend, timeout=datetime.timedelta(seconds=600))
    if init_method is not None:
        kw.update(init_method=init_method, rank=rank, world_size=world)
    if device.type == "cuda":
        kw["device_id"] = device
    dist.init_process_group(**kw)
    group = dist.group.WORLD
    meta = {
        "world": world,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "backend": backend,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "args": {k: v for k, v in vars(args).items() if k != "strategies"} | {"strategies": args.strategies},
    }
    start = time.perf_counter()
    rows, skipped = [], []
    causal = {"true": [True], "false": [False], "both": [False, True]}[args.causal]
    for seqlen in args.seqlens:
        for c in causal:
            for mode in args.modes:
                label = f"{seqlen} {'causal' if c else 'full'} {mode}"
                if time.perf_counter() - start > args.time_budget:
                    skipped.append(label)
                    continue
                rows.extend(measure(args, seqlen, c, mode, rank, world, device, group))
                if rank == 0:
                    _write(args, rows, meta, skipped)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if rank == 0:
        _write(args, rows, meta, skipped)
    dist.barrier(group)
    dist.destroy_process_group()


def _spawned(rank: int, world: int, args, init_method: str) -> None:
    run_rank(rank, world, args, init_method)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        run_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, None)
        return 0
    world = args.nprocs or (torch.cuda.device_count() if args.device == "cuda" else 2)
    if world < 1:
        print("no GPU visible: pass --device cpu (gloo) or run on a machine with GPUs", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_spawned, args=(world, args, f"file://{os.path.join(tmp, 'store')}"), nprocs=world, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
