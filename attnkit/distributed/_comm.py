"""Communication over ``torch.distributed``: the group, the ring's point-to-point shifts, gather and reduce.

Nothing here assumes a particular process-group backend. With NCCL the point-to-point ops run on NCCL's own
stream and ``Work.wait()`` only makes the current CUDA stream wait, so the host keeps queueing the local block's
attention while K/V travel; with gloo (CPU) the transfers run on gloo's threads while this thread computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import InvalidArgumentError, InvalidArgumentTypeError

# Process-group backends whose tensors must live on one kind of device (others are not checked).
_DEVICE_OF_BACKEND = {"nccl": "cuda", "gloo": "cpu"}


def group_backend(group: dist.ProcessGroup | None) -> str:
    return str(dist.get_backend(group))


def backend_for_device(backend: str, device_type: str) -> str | None:
    """The backend serving ``device_type`` tensors: ``"cpu:gloo,cuda:nccl"`` maps per device, a plain name serves
    every device. None when a per-device mapping lacks ``device_type``."""
    if ":" not in backend:
        return backend
    mapping = dict(part.split(":", 1) for part in backend.split(","))
    return mapping.get(device_type)


def check_device(backend: str, device: torch.device, name: str = "q") -> None:
    """Raise before any communication when the group cannot carry tensors on ``device``."""
    serving = backend_for_device(backend, device.type)
    if serving is None:
        raise InvalidArgumentError(
            f"{name} is on {device} but the process group's backend {backend!r} has no backend for {device.type} "
            "tensors"
        )
    want = _DEVICE_OF_BACKEND.get(serving)
    if want is not None and device.type != want:
        raise InvalidArgumentError(
            f"{name} is on {device} but the process group uses {serving!r}, which carries {want} tensors; use a group "
            f"whose backend serves {device.type} tensors (NCCL for CUDA, gloo for CPU)"
        )


def resolve_group(group: object) -> tuple[dist.ProcessGroup, int, int]:
    """``(group, rank in it, its size)``; ``None`` is the default group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise InvalidArgumentError(
            f"group is {group!r} but torch.distributed is not initialized; call torch.distributed.init_process_group "
            "first (NCCL for CUDA tensors, gloo for CPU)"
        )
    if group is None:
        group = dist.group.WORLD
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        raise InvalidArgumentError("group does not contain this process (torch.distributed.new_group left it out)")
    if not isinstance(group, dist.ProcessGroup):
        raise InvalidArgumentTypeError(
            f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise InvalidArgumentError("group does not contain this process (torch.distributed.get_rank(group) is -1)")
    return group, rank, dist.get_world_size(group)


class Pending:
    """Tensors being received; ``wait()`` returns them once they have arrived."""

    def __init__(self, received: list[torch.Tensor], works: Sequence[dist.Work] = ()):
        self._received = received
        self._works = list(works)

    def wait(self) -> list[torch.Tensor]:
        for work in self._works:
            work.wait()
        self._works.clear()
        return self._received


@dataclass(frozen=True)
class Ring:
    """Rank ``rank`` of a ring of ``world``: sends to ``rank + 1`` and receives from ``rank - 1`` (group ranks)."""

    group: dist.ProcessGroup
    rank: int
    world: int

    def shift(self, tensors: Sequence[torch.Tensor]) -> Pending:
        """Start sending ``tensors`` to the next rank and receiving same-shaped ones from the previous rank."""
        if self.world == 1:
            return Pending(list(tensors))
        to = dist.get_global_rank(self.group, (self.rank + 1) % self.world)
        frm = dist.get_global_rank(self.group, (self.rank - 1) % self.world)
        sends = [t.contiguous() for t in tensors]
        received = [torch.empty_like(t) for t in sends]
        ops = [dist.P2POp(dist.isend, t, to, self.group) for t in sends]
        ops += [dist.P2POp(dist.irecv, t, frm, self.group) for t in received]
        return Pending(received, dist.batch_isend_irecv(ops))


@dataclass(frozen=True)
class LoopbackRing:
    """A ring that communicates nothing: every shift hands back the tensors it was given. Runs the same plan and
    block shapes as rank ``rank`` of ``world`` would, on this rank's own keys; the benchmark times the compute of a
    ring step with it (the results are not attention over the whole sequence)."""

    rank: int
    world: int

    def shift(self, tensors: Sequence[torch.Tensor]) -> Pending:
        return Pending(list(tensors))


def all_gather(x: torch.Tensor, group: dist.ProcessGroup, world: int, *, async_op: bool = False):
    """``(world, *x.shape)``: every rank's ``x``, in group-rank order (with ``async_op``, also the work handle)."""
    # The concatenated form (world * len, ...): gloo does not take the stacked one.
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    work = gather(out, x.contiguous(), group=group, async_op=async_op)
    out = out.unflatten(0, (world, x.shape[0]))
    return (out, work) if async_op else out


def reduce_to_owners(parts: torch.Tensor, group: dist.ProcessGroup, world: int) -> torch.Tensor:
    """``parts[s]`` is this rank's contribution to rank ``s``'s tensor; returns the sum of every rank's
    contribution to this rank's, added in rank order (so the result is bitwise reproducible)."""
    received = torch.empty_like(parts)
    dist.all_to_all_single(received, parts.contiguous(), group=group)
    total = received[0].clone()
    for s in range(1, world):
        total += received[s]
    return total
