"""Stand-ins for triton's JIT and compiled kernels, so the launch plans (GPU only in real use) run on a CPU."""

from __future__ import annotations

import inspect


class FakeCompiled:
    """What fastpath.bind reads of a triton CompiledKernel; records each direct launch as (grid, args)."""

    function = "function-handle"
    packed_metadata = "packed-metadata"

    def __init__(self, launches: list) -> None:
        self._launches = launches

    @property
    def run(self):
        def run(g0, g1, g2, stream, function, packed, launch_metadata, enter_hook, exit_hook, *args):
            assert (function, packed) == (self.function, self.packed_metadata)
            self._launches.append(((g0, g1, g2), args))

        return run

    def launch_metadata(self, grid, stream, *args):
        return None


def fake_jit(real, jit_calls: list, fast_calls: list):
    """Stands in for a @triton.jit kernel: records the arguments the JIT would bind (signature order, defaults
    applied) and returns a fake compiled kernel that records direct launches."""

    class FakeJit:
        fn = staticmethod(real.fn)

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                sig = inspect.signature(real.fn)
                bound = sig.bind(*args, **{n: v for n, v in kwargs.items() if n in sig.parameters})
                bound.apply_defaults()
                jit_calls.append(((*grid, 1, 1)[:3], tuple(bound.arguments.values())))
                return FakeCompiled(fast_calls)

            return run

    return FakeJit()


def no_driver(monkeypatch) -> None:
    """fastpath.bind without a GPU driver: stream 0 on device 0."""
    from attnkit.backends.triton import fastpath

    monkeypatch.setattr(fastpath, "stream_source", lambda: lambda index: 0)
    monkeypatch.setattr(fastpath, "current_device_source", lambda: lambda: 0)
