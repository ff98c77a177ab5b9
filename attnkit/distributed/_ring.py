"""The ring strategy: K/V travel around the ring, each rank merges its queries' partial results by lse.

Forward, at step ``s`` rank ``r`` holds the keys/values of rank ``(r - s) % W``: it starts passing them on to
``r + 1`` (receiving the next ones from ``r - 1``), computes its blocks against them meanwhile, and merges each
block's ``(out, lse)`` into float32 accumulators. Backward, the same rotation runs again, and a second ring
carries each K/V shard's float32 ``(dk, dv)`` accumulators one step behind it: every rank adds its blocks' share
and passes them on, so after ``W`` steps they are back with the rank that owns those keys. Every addition happens
in a fixed order, so with deterministic blocks the result is bitwise reproducible.
"""

from __future__ import annotations

import torch

from ..params import lse_dtype
from ._blocks import Block
from ._merge import merge_states
from ._tasks import Options, dense_backward, dense_forward


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slopes, plan: tuple[tuple[Block, ...], ...], names: dict, opts: Options, ring):  # type: ignore[override]
        acc = lse_dtype(q.dtype)
        batch, seqlen, heads, _ = q.shape
        out = torch.zeros((batch, seqlen, heads, v.shape[-1]), dtype=acc, device=q.device)
        lse = torch.full((batch, heads, seqlen), float("-inf"), dtype=acc, device=q.device)
        kv = [k, v]
        for step, blocks in enumerate(plan):
            pending = ring.shift(kv) if step + 1 < len(plan) else None
            for blk in blocks:
                o, l = dense_forward(blk, names[blk.shape_key], q, kv[0], kv[1], slopes, opts)
                rows = blk.q_slice
                out[:, rows], lse[:, :, rows] = merge_states(out[:, rows], lse[:, :, rows], o, l)
            if pending is not None:
                kv = pending.wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, slopes)
        ctx.plan, ctx.names, ctx.opts, ctx.ring = plan, names, opts, ring
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):  # type: ignore[override]
        q, k, v, out, lse, slopes = ctx.saved_tensors
        plan, names, opts, ring = ctx.plan, ctx.names, ctx.opts, ctx.ring
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        acc = lse.dtype
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        kv = [k, v]
        grads_in = None  # the (dk, dv) of the keys held now, accumulated by the ranks that held them before
        for step, blocks in enumerate(plan):
            pending = ring.shift(kv) if step + 1 < len(plan) else None
            dk = torch.zeros(k.shape, dtype=acc, device=k.device)
            dv = torch.zeros(v.shape, dtype=acc, device=v.device)
            for blk in blocks:
                bdq, bdk, bdv = dense_backward(blk, names[blk.shape_key], dout, q, kv[0], kv[1], out, lse, slopes, opts)
                dq[:, blk.q_slice] += bdq
                dk[:, blk.k_slice] += bdk
                dv[:, blk.k_slice] += bdv
            if grads_in is not None:
                prev_dk, prev_dv = grads_in.wait()
                dk += prev_dk
                dv += prev_dv
            grads_in = ring.shift([dk, dv])
            if pending is not None:
                kv = pending.wait()
        dk, dv = grads_in.wait()
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None
