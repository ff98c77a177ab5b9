"""``ring_attention`` and ``ring_attention_varlen``: validation, planning, dispatch; then one autograd Function."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

from .. import validation
from ..errors import InvalidArgumentError, InvalidArgumentTypeError
from ..ops import _common
from ._blocks import fused_ring_plan, gathered_plan, ring_plan, varlen_plan
from ._comm import LoopbackRing, Ring, check_device, group_backend, resolve_group
from ._gather import GatheredAttention, GatheredVarlenAttention
from ._layout import check_layout, check_local_length
from ._ring import RingAttention
from ._tasks import Options, choose_dense, choose_varlen

STRATEGIES = ("ring", "allgather")


def _options(head_dim, causal, softmax_scale, window_size, softcap, deterministic) -> Options:
    params = _common.resolve_params(
        head_dim=head_dim,
        causal=causal,
        softmax_scale=softmax_scale,
        window_size=window_size,
        softcap=softcap,
        dropout_p=0.0,
        deterministic=deterministic,
    )
    return Options(params.softmax_scale, params.window_left, params.window_right, params.softcap, deterministic)


_ALIBI_WHY = (
    "the block operator measures ALiBi distances from each block's own bottom-right corner, so it cannot apply the "
    "global distances there"
)


def _check_alibi_dense(shifts: Iterable[int | None], strategy: str, layout: str, world: int, opts: Options) -> None:
    if any(s != 0 for s in shifts):
        raise InvalidArgumentError(
            f"alibi_slopes: ring_attention(strategy={strategy!r}, layout={layout!r}) on {world} ranks with window "
            f"({opts.left}, {opts.right}) computes blocks that do not end on the global diagonal; {_ALIBI_WHY}. "
            "ALiBi works with strategy='allgather' and causal=True (or on one rank)"
        )


def _check_alibi_varlen(plan, offsets: list[int], world: int, opts: Options) -> None:
    for calls in plan:
        for call in calls:
            for seq, shift in zip(call.seqs, call.shifts):
                if shift != 0:
                    raise InvalidArgumentError(
                        f"alibi_slopes: in ring_attention_varlen on {world} ranks with window ({opts.left}, "
                        f"{opts.right}), sequence {seq} (rows {offsets[seq]}..{offsets[seq + 1] - 1}) crosses the end "
                        f"of a rank's rows, so its block does not end on the global diagonal; {_ALIBI_WHY}. ALiBi "
                        "works with causal=True, or with sequences that do not cross rank boundaries"
                    )


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
    layout: str = "zigzag",
    window_size: tuple[int, int] = (-1, -1),
    alibi_slopes: torch.Tensor | None = None,
    softcap: float = 0.0,
    deterministic: bool = False,
    strategy: str = "ring",
    return_lse: bool = False,
    backend: str | Sequence[str] = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over a sequence sharded across the ranks of ``group`` (context parallelism).

    Every rank passes its shard of one self-attention problem: ``q (B, S_local, Hq, D)``, ``k (B, S_local, Hk, D)``,
    ``v (B, S_local, Hk, Dv)``, laid out as ``layout`` says (see :func:`attnkit.distributed.shard`), and gets the
    attention output of its own query rows, exactly what ``attnkit.attention`` on the whole sequence gives for
    them. Masks, ALiBi distances and softcap refer to global positions. All ranks must pass the same shapes and
    options.

    Args:
        group: the process group (default: the default group). NCCL for CUDA tensors, gloo for CPU ones.
        layout: ``"zigzag"`` (rank ``r`` holds chunks ``r`` and ``2W - 1 - r`` of ``2W``; balances causal work;
            the local length must be even) or ``"contiguous"`` (rank ``r`` holds chunk ``r`` of ``W``).
        strategy: ``"ring"`` (K/V passed around the ring with point-to-point ops overlapped with compute, partial
            results merged by lse; K/V memory stays O(S_local)) or ``"allgather"`` (K/V of the whole sequence
            gathered on every rank, local queries only; also supports causal ALiBi).
        alibi_slopes: ``(Hq,)`` or ``(B, Hq)`` float32; only where every block ends on the global diagonal:
            ``strategy="allgather"`` with ``causal=True``, or one rank. Otherwise an error.
        return_lse: also return this rank's lse ``(B, Hq, S_local)`` (float32; float64 for float64 inputs).
        Other arguments as in :func:`attnkit.attention` (no dropout).

    Returns:
        ``out (B, S_local, Hq, Dv)`` in q's dtype, or ``(out, lse)``. Differentiable in q, k and v.
    """
    return _dense(
        q, k, v, group=group, causal=causal, softmax_scale=softmax_scale, layout=layout, window_size=window_size,
        alibi_slopes=alibi_slopes, softcap=softcap, deterministic=deterministic, strategy=strategy,
        return_lse=return_lse, backend=backend, loopback=False,
    )  # fmt: skip


def _dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None,
    causal: bool,
    softmax_scale: float | None,
    layout: str,
    window_size: tuple[int, int],
    alibi_slopes: torch.Tensor | None,
    softcap: float,
    deterministic: bool,
    strategy: str,
    return_lse: bool,
    backend: str | Sequence[str],
    loopback: bool,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`ring_attention`; with ``loopback`` the ring passes nothing (each rank reuses its own K/V at every
    step): the benchmark's compute-only timing."""
    q = validation.tensor("q", q, 4)
    k = validation.tensor("k", k, 4)
    v = validation.tensor("v", v, 4)
    validation.same_dtype_device({"q": q, "k": k, "v": v})
    validation.heads_and_dims(q.shape, k.shape, v.shape, seq_axis=1)
    validation.last_dim_contiguous({"q": q, "k": k, "v": v})
    batch, local_len, num_heads_q, head_dim = q.shape
    if k.shape[1] != local_len:
        raise InvalidArgumentError(
            f"k has local sequence length {k.shape[1]} but q has {local_len}; ring_attention is self-attention over "
            "one sharded sequence, so every rank holds the same positions of q, k and v"
        )
    layout = check_layout(layout)
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise InvalidArgumentError(f"strategy is {strategy!r}; allowed: {', '.join(repr(s) for s in STRATEGIES)}")
    opts = _options(head_dim, causal, softmax_scale, window_size, softcap, deterministic)
    slopes = validation.alibi_slopes(alibi_slopes, batch, num_heads_q, q.device)
    if not isinstance(return_lse, bool):
        raise InvalidArgumentTypeError(f"return_lse must be a bool, got {return_lse!r}")
    group, rank, world = resolve_group(group)
    check_device(group_backend(group), q.device)
    check_local_length("q", local_len, layout, world)
    if q.numel() == 0 or local_len == 0:
        out, lse = _common.EmptyAttention.apply(
            (batch, local_len, num_heads_q, v.shape[-1]), (batch, num_heads_q, local_len), q, k, v
        )
        return (out, lse) if return_lse else out
    args = (opts.left, opts.right)
    if strategy == "ring":
        plan = ring_plan(layout, world, local_len, *args)
        if slopes is not None:
            _check_alibi_dense((b.shift for r in plan for s in r for b in s), strategy, layout, world, opts)
        else:
            plan = fused_ring_plan(layout, world, local_len, *args)
        blocks = [b for r in plan for s in r for b in s]
    else:
        plan = gathered_plan(layout, world, local_len, *args)
        if slopes is not None:
            _check_alibi_dense((b.shift for r in plan for b in r), strategy, layout, world, opts)
        blocks = [b for r in plan for b in r]
    names = choose_dense(
        (b.shape_key for b in blocks), backend, q=q, k=k, v=v, opts=opts, alibi=slopes is not None,
        requires_grad=_common.needs_grad(q, k, v), merged=strategy == "ring",
    )  # fmt: skip
    if strategy == "ring":
        ring = LoopbackRing(rank, world) if loopback else Ring(group, rank, world)
        out, lse = RingAttention.apply(q, k, v, slopes, plan[rank], names, opts, ring)
    else:
        out, lse = GatheredAttention.apply(q, k, v, slopes, plan[rank], names, opts, (group, world), layout)
    return (out, lse) if return_lse else out


def ring_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    alibi_slopes: torch.Tensor | None = None,
    softcap: float = 0.0,
    deterministic: bool = False,
    return_lse: bool = False,
    backend: str | Sequence[str] = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over packed variable-length sequences sharded across ranks (Llama 3 style context parallelism).

    The packed tokens of every sequence (``T`` rows, described by the global ``cu_seqlens``, int32 ``(N + 1,)`` on
    q's device, the same on every rank) are split contiguously: rank ``r`` holds rows ``[r * T / W, (r + 1) * T /
    W)`` of ``q (T / W, Hq, D)``, ``k``, ``v`` (``shard(x, group, "contiguous", dim=0)``). K/V are all-gathered and
    each rank attends with its own queries; masks are per sequence, as in :func:`attnkit.attention_varlen` with
    ``cu_seqlens_q == cu_seqlens_k``. Rows past ``cu_seqlens[-1]`` are padding (out 0, lse -inf).

    ``alibi_slopes`` (``(Hq,)`` or ``(N, Hq)``) needs ``causal=True``, unless no sequence crosses the end of a
    rank's rows. Returns ``out (T / W, Hq, Dv)``, or ``(out, lse)`` with lse ``(Hq, T / W)``.
    """
    q = validation.tensor("q", q, 3)
    k = validation.tensor("k", k, 3)
    v = validation.tensor("v", v, 3)
    validation.same_dtype_device({"q": q, "k": k, "v": v})
    validation.heads_and_dims(q.shape, k.shape, v.shape, seq_axis=None)
    validation.last_dim_contiguous({"q": q, "k": k, "v": v})
    local_len, num_heads_q, head_dim = q.shape
    if k.shape[0] != local_len:
        raise InvalidArgumentError(
            f"k has {k.shape[0]} local rows but q has {local_len}; every rank holds the same packed rows of q, k, v"
        )
    group, rank, world = resolve_group(group)
    offsets = validation.cu_seqlens(
        "cu_seqlens", cu_seqlens, "max_seqlen", local_len * world, local_len * world, q.device
    )
    opts = _options(head_dim, causal, softmax_scale, window_size, softcap, deterministic)
    slopes = validation.alibi_slopes(alibi_slopes, len(offsets) - 1, num_heads_q, q.device)
    if not isinstance(return_lse, bool):
        raise InvalidArgumentTypeError(f"return_lse must be a bool, got {return_lse!r}")
    check_device(group_backend(group), q.device)
    if q.numel() == 0:
        out, lse = _common.EmptyAttention.apply(
            (local_len, num_heads_q, v.shape[-1]), (num_heads_q, local_len), q, k, v
        )
        return (out, lse) if return_lse else out
    plan = varlen_plan(world, local_len, tuple(offsets), opts.left, opts.right)
    if slopes is not None:
        _check_alibi_varlen(plan, offsets, world, opts)
    calls = plan[rank]
    cus = tuple(
        (
            torch.tensor(c.cu_q, dtype=torch.int32, device=q.device),
            torch.tensor(c.cu_k, dtype=torch.int32, device=q.device),
        )
        for c in calls
    )
    names = choose_varlen(
        (c.shape_key for r in plan for c in r), backend, q=q, k=k, v=v, opts=opts, alibi=slopes is not None,
        requires_grad=_common.needs_grad(q, k, v),
    )  # fmt: skip
    out, lse = GatheredVarlenAttention.apply(q, k, v, slopes, calls, cus, names, opts, (group, world))
    return (out, lse) if return_lse else out
