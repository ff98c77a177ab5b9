"""``shard`` / ``unshard``: cut a global sequence into this rank's part, and put the parts back together."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import InvalidArgumentError, InvalidArgumentTypeError
from ._comm import all_gather, check_device, group_backend, reduce_to_owners, resolve_group
from ._layout import (
    check_global_length,
    check_layout,
    check_local_length,
    local_segments,
    to_global_order,
    to_rank_order,
)


def _dim(x: object, dim: object) -> int:
    if not isinstance(x, torch.Tensor):
        raise InvalidArgumentTypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise InvalidArgumentTypeError(f"dim must be an int, got {dim!r}")
    if not -x.dim() <= dim < x.dim():
        raise InvalidArgumentError(f"dim is {dim} but x has shape {tuple(x.shape)}; allowed: {-x.dim()}..{x.dim() - 1}")
    return dim % x.dim()


def shard(
    x: torch.Tensor, group: dist.ProcessGroup | None = None, layout: str = "zigzag", *, dim: int = 1
) -> torch.Tensor:
    """This rank's part of the global sequence ``x`` (along ``dim``: 1 for ``(B, S, H, D)``, 0 for packed
    ``(T, H, D)``), as a new tensor (differentiable). The length must be a multiple of ``world_size``
    (``contiguous``) or ``2 * world_size`` (``zigzag``)."""
    layout = check_layout(layout)
    dim = _dim(x, dim)
    group, rank, world = resolve_group(group)
    check_global_length("x", x.shape[dim], layout, world)
    segments = local_segments(layout, rank, world, x.shape[dim] // world)
    if not segments:
        return x.narrow(dim, 0, 0).clone()
    return torch.cat([x.narrow(dim, seg.start, seg.length) for seg in segments], dim)


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim: int, layout: str, group, world: int):  # type: ignore[override]
        ctx.dim, ctx.layout, ctx.group, ctx.world = dim, layout, group, world
        # The layout helpers take (W, B, L, ...): the sequence first, under a batch axis of one.
        gathered = all_gather(x.movedim(dim, 0), group, world).unsqueeze(1)
        return to_global_order(gathered, layout).squeeze(0).movedim(0, dim)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        full = grad.movedim(ctx.dim, 0).unsqueeze(0)
        parts = to_rank_order(full, ctx.layout, ctx.world).squeeze(1)
        mine = reduce_to_owners(parts, ctx.group, ctx.world)
        return mine.movedim(0, ctx.dim), None, None, None, None


def unshard(
    x: torch.Tensor, group: dist.ProcessGroup | None = None, layout: str = "zigzag", *, dim: int = 1
) -> torch.Tensor:
    """The global sequence from every rank's part ``x`` (all-gather; every rank gets the whole tensor). Every rank
    must pass a part of the same shape. Differentiable: the gradient of a rank's part is the sum, over all ranks,
    of the gradients their copies of the whole tensor received (as for ``torch.distributed.nn`` collectives), so
    a loss computed identically on every rank counts ``world_size`` times."""
    layout = check_layout(layout)
    dim = _dim(x, dim)
    group, _, world = resolve_group(group)
    check_local_length("x", x.shape[dim], layout, world)
    check_device(group_backend(group), x.device, name="x")
    return _Unshard.apply(x, dim, layout, group, world)
