"""Backward A/B of the Triton backend: dQ fused into the dK/dV kernel (float32 atomics, the default without
``deterministic``) against the two-kernel backward (``deterministic=True``), beside SDPA-cuDNN, on a CUDA GPU:

    PYTHONPATH=$PWD python benchmarks/triton_bwd_fused_bench.py --out DIR [--cells d128:8192:0,...]

bf16, 16k tokens per batch, hidden 2048 (head dim 64 -> 32 heads, 128 -> 16). Each cell times the backward alone
(``torch.autograd.grad`` on a saved forward) of each provider in rounds of one batch each (so every provider sees
the same clocks), after a warm-up that lets the autotuner pick each variant's tiles; median of the rounds.
TFLOP/s use 2.5x the forward's 4*B*H*S*S*D (halved when causal). Each cell also compares the fused dq with the
two-kernel dq (max abs difference over max |dq|). Writes ``triton_bwd_fused.md`` and ``.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

import attnkit

TOKENS = 16 * 1024
HIDDEN = 2048
DEFAULT_CELLS = "d128:4096:0,d128:8192:0,d128:16384:0,d128:8192:1,d64:8192:0,d64:8192:1"


def _cells(text: str) -> list[tuple[int, int, bool]]:
    out = []
    for item in text.split(","):
        d, s, c = item.split(":")
        out.append((int(d.lstrip("d")), int(s), c == "1"))
    return out


def _sdpa_cudnn(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=causal).transpose(1, 2)  # fmt: skip


def run_cell(d: int, seqlen: int, causal: bool, rounds: int) -> dict:
    batch, heads = TOKENS // seqlen, HIDDEN // d
    gen = torch.Generator(device="cuda").manual_seed(seqlen + d)

    def rnd():
        return torch.randn(batch, seqlen, heads, d, device="cuda", dtype=torch.bfloat16, generator=gen)

    q, k, v, do = rnd().requires_grad_(), rnd().requires_grad_(), rnd().requires_grad_(), rnd()
    forwards = {
        "triton fused dQ": lambda: attnkit.attention(q, k, v, causal=causal, backend="triton_cuda"),
        "triton two kernels": lambda: attnkit.attention(
            q, k, v, causal=causal, backend="triton_cuda", deterministic=True
        ),
        "sdpa-cudnn": lambda: _sdpa_cudnn(q, k, v, causal),
    }
    outs, grads = {}, {}
    for name, fwd in forwards.items():
        outs[name] = fwd()
        for _ in range(3):  # warm-up; the first call of each variant autotunes its tiles
            grads[name] = torch.autograd.grad(outs[name], (q, k, v), do, retain_graph=True)
    torch.cuda.synchronize()
    ref = grads["triton two kernels"][0].float()
    dq_diff = float((grads["triton fused dQ"][0].float() - ref).abs().max() / ref.abs().max())
    iters = max(1, int(2**33 / (batch * heads * seqlen * seqlen * d)))
    times: dict[str, list[float]] = {name: [] for name in forwards}
    for _ in range(rounds):
        for name in forwards:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                torch.autograd.grad(outs[name], (q, k, v), do, retain_graph=True)
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / iters)
    flops = 2.5 * 4 * batch * heads * seqlen * seqlen * d * (0.5 if causal else 1.0)
    tflops = {name: flops / (statistics.median(t) * 1e-3) / 1e12 for name, t in times.items()}
    ms = {n: statistics.median(t) for n, t in times.items()}
    return {"head_dim": d, "seqlen": seqlen, "causal": causal, "batch": batch, "heads": heads,
            "tflops": tflops, "ms": ms, "dq_rel_diff": dq_diff}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--cells", default=DEFAULT_CELLS, help="comma list of d<head dim>:<seqlen>:<causal 0/1>")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for d, s, c in _cells(args.cells):
        results.append(run_cell(d, s, c, args.rounds))
        print(json.dumps(results[-1]), flush=True)
    import triton

    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
    (out / "triton_bwd_fused.json").write_text(json.dumps({"meta": meta, "cells": results}, indent=1))
    names = list(results[0]["tflops"]) if results else []
    lines = [f"# Triton backward, dQ fused vs two kernels ({meta['gpu']}, bf16)", "",
             f"torch {meta['torch']}, triton {meta['triton']}, {meta['date']}. Backward TFLOP/s (2.5x forward "
             "FLOPs), median of rounds; 16k tokens, hidden 2048.", "",
             "| head dim | seqlen | causal | " + " | ".join(names)
             + " | fused / two kernels | fused / cuDNN | dq diff |",
             "|---" * (len(names) + 6) + "|"]  # fmt: skip
    for r in results:
        t = r["tflops"]
        lines.append(f"| {r['head_dim']} | {r['seqlen']} | {'yes' if r['causal'] else 'no'} | "
                     + " | ".join(f"{t[n]:.0f}" for n in names)
                     + f" | {t['triton fused dQ'] / t['triton two kernels']:.2f}x"
                     f" | {t['triton fused dQ'] / t['sdpa-cudnn']:.2f}x | {r['dq_rel_diff']:.1e} |")  # fmt: skip
    (out / "triton_bwd_fused.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
