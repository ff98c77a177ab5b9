"""Launch plans: repeated Triton launches without triton's JIT dispatch.

Per call, a launch through ``kernel[grid](...)`` binds ~80 arguments, builds the specialisation key, looks up the
compiled kernel and wraps the launcher: tens of microseconds of Python on an H200 host, more than the GPU time of
a short forward or a decode step (benchmarks/NOTES-triton.md, run 3). Everything but the tensor addresses is a
function of shapes, strides, dtypes, devices, parameters and the 16-byte alignment of each pointer (triton
specialises pointers on alignment and integers on divisibility by 16 and on being 1), so a *plan* per such key
keeps what the first, ordinary launch compiled, bound once: a repeated call allocates its outputs and hands the
launcher the leading tensors, the rest of the arguments being the plan's.

Arguments are built in one place per kernel, by name, with :func:`arguments` (checked against the kernel's
signature, constexprs and defaults included): the first launch and the plan's launches use the same tuple.

Under the interpreter a plan's launcher runs the interpreted kernel with the plan's argument tuple (so the CPU
tests cover plans, keys and argument order); on a GPU it calls the compiled kernel's launcher, or, with
``direct_launch.ENABLED`` (the default) and a kernel that qualifies, the driver with the
arguments packed once (:mod:`.direct_launch`).
``ENABLED = False`` or ``ATTNKIT_HOST_FASTPATH=0`` turns plans off (every call goes through the JIT), for A/B.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

import torch
import triton

from attnkit import env

from . import direct_launch, tma, tuning

ENABLED = True
PLAN_LIMIT = 1024  # plans per kernel family; the table is emptied when full
# Since triton 3.3 the JIT hands the launcher every bound argument, constexprs included (``*bound_args.values()``),
# and so does ``CompiledKernel[grid](...)``; 3.2 and older pass only the non-constexpr ones.
MIN_TRITON = (3, 3)


def triton_at_least(version: str, minimum: tuple[int, int]) -> bool:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        if not digits:
            return False
        parts.append(int(digits))
    return tuple(parts) >= minimum


SUPPORTED = triton_at_least(triton.__version__, MIN_TRITON)


def enabled() -> bool:
    """Whether launches may use plans now (off while tiles are forced: those calls must compile the forced tile)."""
    return ENABLED and SUPPORTED and env.host_fastpath() and not tuning.any_forced()


def aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


LSE_SCRATCH_BYTES = 1 << 20  # the most a bound call keeps as a shared lse buffer for callers that drop the lse


def lse_scratch(shape: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
    """An lse buffer a bound forward or decode step writes on every call when its caller drops the lse (nothing
    reads it): one allocation fewer per call. None when it would hold more than LSE_SCRATCH_BYTES or is not
    16-byte aligned (then every call allocates its own)."""
    if math.prod(shape) * 4 > LSE_SCRATCH_BYTES:
        return None
    scratch = torch.empty(shape, dtype=torch.float32, device=device)
    return scratch if aligned(scratch) else None


def meta(t: torch.Tensor | None) -> tuple | None:
    """What a plan key holds of one tensor argument."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16 == 0)


# ---- arguments ------------------------------------------------------------------------------------------------


@functools.cache
def parameters(kernel: object) -> tuple[tuple[str, object], ...]:
    """(name, default) of every parameter of a Triton kernel, in order (inspect is slow: cached per kernel)."""
    fn = getattr(kernel, "fn", kernel)
    return tuple((name, p.default) for name, p in inspect.signature(fn).parameters.items())


def arguments(kernel: object, values: Mapping[str, object]) -> tuple:
    """Every parameter of ``kernel`` in signature order, constexprs included: from ``values`` by name, else the
    parameter's default. Raises TypeError naming what is missing or unknown (a kernel whose signature changed)."""
    params = parameters(kernel)
    names = {name for name, _ in params}
    unknown = sorted(set(values) - names)
    if unknown:
        raise TypeError(f"{_name(kernel)} has no parameter(s) {unknown}")
    out = []
    missing = []
    for name, default in params:
        if name in values:
            out.append(values[name])
        elif default is not inspect.Parameter.empty:
            out.append(default)
        else:
            missing.append(name)
    if missing:
        raise TypeError(f"{_name(kernel)}: no value for parameter(s) {missing}")
    return tuple(out)


def leading(kernel: object, count: int) -> tuple[str, ...]:
    """Names of the first ``count`` parameters (the per-call tensors of a plan)."""
    return tuple(name for name, _ in parameters(kernel)[:count])


def split_options(kernel: object, kwargs: Mapping[str, object]) -> tuple[dict[str, object], dict[str, object]]:
    """``kwargs`` split into kernel parameters and launch options (num_warps, num_stages, waves_per_eu...)."""
    names = {name for name, _ in parameters(kernel)}
    params = {k: v for k, v in kwargs.items() if k in names}
    return params, {k: v for k, v in kwargs.items() if k not in names}


def _name(kernel: object) -> str:
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", repr(fn))


# ---- bound launchers ------------------------------------------------------------------------------------------


Launcher = Callable[..., None]


def _hooks() -> object:
    """Where this triton keeps its launch hooks (profilers such as proton set them)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return knobs.runtime
    from triton.compiler.compiler import CompiledKernel

    return CompiledKernel


def bind(
    jit_fn: object,
    compiled: object,
    grid: tuple[int, ...],
    tail: tuple,
    device: torch.device,
    uses_tma: bool,
    stream_of: Callable[[int], int] | None = None,
    current_device: Callable[[], int] | None = None,
) -> Launcher | None:
    """A launcher taking the leading tensors of one plan: ``launcher(*lead)`` launches ``jit_fn`` with
    ``(*lead, *tail)`` on ``grid``. ``compiled``: what the first launch returned (a CompiledKernel; None under
    the interpreter, where the interpreted kernel runs again). None when ``compiled`` is not a compiled kernel of
    a known kind (then the caller keeps using the JIT). ``stream_of``/``current_device``: the driver's current
    stream and device (tests pass their own)."""
    grid3 = (*grid, 1, 1)[:3]
    if compiled is None:
        if getattr(jit_fn, "fn", None) is None:
            return None
        runner = jit_fn[grid3]

        def interpreted(*lead: object) -> None:
            runner(*lead, *tail)

        return interpreted
    if not all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata", "launch_metadata")):
        return None
    run = compiled.run  # loads the module on first access
    function, packed = compiled.function, compiled.packed_metadata
    launch_metadata = compiled.launch_metadata
    hooks = _hooks()
    get_device = current_device or current_device_source()
    index = device.index if device.index is not None else get_device()
    stream_of = stream_of or stream_source()
    g0, g1, g2 = grid3

    direct = direct_launch.build(compiled, grid3, tail)

    def launch(*lead: object) -> None:
        # Launch hooks (profilers) and another current device take triton's path, as does a refused launch.
        if direct is not None and not _hooked(hooks) and get_device() == index and direct(lead, stream_of(index)):
            return
        args = (*lead, *tail)
        token = tma.set_scratch() if uses_tma else None
        try:
            if get_device() != index:
                with torch.cuda.device(index):
                    _launch(args)
            else:
                _launch(args)
        finally:
            if token is not None:
                tma.reset_scratch(token)

    def _launch(args: tuple) -> None:
        # What CompiledKernel.__getitem__'s runner does, with the grid, handles and stream source bound once.
        stream = stream_of(index)
        run(g0, g1, g2, stream, function, packed, launch_metadata(grid3, stream, *args), hooks.launch_enter_hook,
            hooks.launch_exit_hook, *args)  # fmt: skip

    return launch


def _active(hook: object) -> bool:
    """Whether a launch hook would do anything (triton 3.5+ keeps an empty HookChain when none is set)."""
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return calls is None or len(calls) > 0


def _hooked(hooks: object) -> bool:
    return _active(hooks.launch_enter_hook) or _active(hooks.launch_exit_hook)


def stream_source() -> Callable[[int], int]:
    """The driver's current-stream query (what CompiledKernel's runner asks per launch)."""
    from triton.runtime import driver

    return driver.active.get_current_stream


def current_device_source() -> Callable[[], int]:
    """The current CUDA device index, at the cost of one C call."""
    return getattr(torch._C, "_cuda_getDevice", torch.cuda.current_device)


# ---- plan tables ----------------------------------------------------------------------------------------------

P = TypeVar("P")


class Plans(Generic[P]):
    """Plans of one kernel family by key, emptied when full."""

    def __init__(self, limit: int = PLAN_LIMIT) -> None:
        self._plans: dict[tuple, P] = {}
        self.limit = limit

    def get(self, key: tuple) -> P | None:
        return self._plans.get(key)

    def put(self, key: tuple, plan: P) -> None:
        if len(self._plans) >= self.limit:
            self._plans.clear()
        self._plans[key] = plan

    def clear(self) -> None:
        self._plans.clear()

    def __len__(self) -> int:
        return len(self._plans)
