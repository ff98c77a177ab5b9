"""What a provider is, as the runner sees it: the :class:`Provider` interface, the :class:`Kernel` it builds for
a case, the :class:`DeviceInfo` it decides applicability from, and :class:`NotApplicable` for a case it finds out
it cannot run. attnkit's own providers (:mod:`attnkit.bench.providers`) and the peers
(:mod:`attnkit.bench.peers`) both implement it.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .cases import Case

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Prepare = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class NotApplicable(Exception):
    """The provider cannot run this case (a limit of the provider, not a failure)."""


@dataclass
class Kernel:
    """What a provider hands the runner: the call, an untimed input transform, and a note for the results."""

    fn: AttnFn
    prepare: Prepare | None = None
    note: str = ""


@dataclass
class DeviceInfo:
    """What providers need to know about the device to decide applicability without trying."""

    device: torch.device
    free_bytes: int  # memory a provider may use for one case
    compute_capability: tuple[int, int] | None = None
    rotations: int = 1  # input sets alive at once; providers that keep S^2 activations per set multiply by it


class Provider(abc.ABC):
    name: str = ""
    kind: str = "peer"  # "attnkit" or "peer"
    modes: frozenset[str] | None = None  # the modes it measures (None: all); others get no record at all

    def unavailable(self) -> str | None:
        """Why this provider cannot run at all here (missing package, no device), or None."""
        return None

    def na_reason(self, case: Case, info: DeviceInfo) -> str | None:
        """Why this provider cannot run ``case``, decided without running it, or None."""
        return None

    @abc.abstractmethod
    def build(self, case: Case, device: torch.device) -> Kernel:
        """The callable to time for ``case`` (inputs allocated, correctness not yet checked)."""

    def first_run(self, seconds: float) -> None:
        """Told how long the first (compiling) call of a case took; FlexAttention budgets its compiles with it."""
        return None  # most providers have nothing to budget
