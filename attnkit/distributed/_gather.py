"""The all-gather strategy (Llama 3 style): gather every rank's K/V, attend with the local queries only.

Each rank computes exactly its own query rows, so there is nothing to merge; the backward gathers K/V again (so
nothing sequence-sized is kept between forward and backward), computes ``dq`` locally and this rank's
contribution to every position's ``dk``/``dv``, and an all-to-all hands each rank the contributions to its own
positions, which it adds in rank order (bitwise reproducible). Communication is not overlapped with compute:
one all-gather of K and V per pass, and one all-to-all of float32 ``dk``/``dv``.
"""

from __future__ import annotations

import torch

from ..params import lse_dtype
from ._blocks import Block, VarlenCall
from ._comm import all_gather, reduce_to_owners
from ._layout import to_global_order, to_rank_order
from ._tasks import Options, dense_backward, dense_forward, varlen_backward, varlen_forward


def _gather_kv(k, v, group, world):
    gk, wk = all_gather(k, group, world, async_op=True)
    gv, wv = all_gather(v, group, world, async_op=True)
    wk.wait()
    wv.wait()
    return gk, gv


class GatheredAttention(torch.autograd.Function):
    """Dense ``(B, S_local, H, D)`` shards in either layout."""

    @staticmethod
    def forward(ctx, q, k, v, slopes, blocks: tuple[Block, ...], names: dict, opts: Options, comm, layout: str):  # type: ignore[override]
        group, world = comm
        gk, gv = _gather_kv(k, v, group, world)
        k_all, v_all = to_global_order(gk, layout), to_global_order(gv, layout)
        batch, seqlen, heads, _ = q.shape
        out = q.new_zeros((batch, seqlen, heads, v.shape[-1]))
        lse = torch.full((batch, heads, seqlen), float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
        for blk in blocks:  # disjoint query rows: one block per local segment
            out[:, blk.q_slice], lse[:, :, blk.q_slice] = dense_forward(
                blk, names[blk.shape_key], q, k_all, v_all, slopes, opts
            )
        ctx.save_for_backward(q, k, v, out, lse, slopes)
        ctx.blocks, ctx.names, ctx.opts, ctx.comm, ctx.layout = blocks, names, opts, comm, layout
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):  # type: ignore[override]
        q, k, v, out, lse, slopes = ctx.saved_tensors
        group, world = ctx.comm
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        gk, gv = _gather_kv(k, v, group, world)
        k_all, v_all = to_global_order(gk, ctx.layout), to_global_order(gv, ctx.layout)
        acc = lse.dtype
        dq = torch.zeros_like(q)
        dk_all = torch.zeros(k_all.shape, dtype=acc, device=k.device)
        dv_all = torch.zeros(v_all.shape, dtype=acc, device=v.device)
        for blk in ctx.blocks:
            bdq, bdk, bdv = dense_backward(
                blk, ctx.names[blk.shape_key], dout, q, k_all, v_all, out, lse, slopes, ctx.opts
            )
            dq[:, blk.q_slice] = bdq
            dk_all[:, blk.k_slice] += bdk
            dv_all[:, blk.k_slice] += bdv
        dk = reduce_to_owners(to_rank_order(dk_all, ctx.layout, world), group, world)
        dv = reduce_to_owners(to_rank_order(dv_all, ctx.layout, world), group, world)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


class GatheredVarlenAttention(torch.autograd.Function):
    """Packed ``(T_local, H, D)`` shards, rank ``r`` holding packed rows ``[r * T_local, (r + 1) * T_local)``."""

    @staticmethod
    def forward(ctx, q, k, v, slopes, calls: tuple[VarlenCall, ...], cus: tuple, names: dict, opts: Options, comm):  # type: ignore[override]
        group, world = comm
        gk, gv = _gather_kv(k, v, group, world)
        k_all, v_all = gk.flatten(0, 1), gv.flatten(0, 1)
        total, heads, _ = q.shape
        out = q.new_zeros((total, heads, v.shape[-1]))
        lse = torch.full((heads, total), float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
        for call, cu in zip(calls, cus):  # disjoint query rows; rows of no sequence stay 0 / -inf
            out[call.q_slice], lse[:, call.q_slice] = varlen_forward(
                call, names[call.shape_key], cu, q, k_all, v_all, slopes, opts
            )
        ctx.save_for_backward(q, k, v, out, lse, slopes)
        ctx.calls, ctx.cus, ctx.names, ctx.opts, ctx.comm = calls, cus, names, opts, comm
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):  # type: ignore[override]
        q, k, v, out, lse, slopes = ctx.saved_tensors
        group, world = ctx.comm
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        gk, gv = _gather_kv(k, v, group, world)
        k_all, v_all = gk.flatten(0, 1), gv.flatten(0, 1)
        acc = lse.dtype
        dq = torch.zeros_like(q)
        dk_all = torch.zeros(k_all.shape, dtype=acc, device=k.device)
        dv_all = torch.zeros(v_all.shape, dtype=acc, device=v.device)
        for call, cu in zip(ctx.calls, ctx.cus):
            bdq, bdk, bdv = varlen_backward(
                call, ctx.names[call.shape_key], cu, dout, q, k_all, v_all, out, lse, slopes, ctx.opts
            )
            dq[call.q_slice] = bdq
            dk_all[call.k_slice] += bdk
            dv_all[call.k_slice] += bdv
        dk = reduce_to_owners(dk_all.unflatten(0, (world, -1)), group, world)
        dv = reduce_to_owners(dv_all.unflatten(0, (world, -1)), group, world)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None
