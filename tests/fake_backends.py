"""Fake backends for the selection tests (test_dispatch, test_env, test_registry): built from a capability table,
with optional automatic-choice-only reasons, an unavailability reason and a record of the specs they were asked
about. The ``fakes`` fixture (tests/conftest.py) installs three of them beside the reference backend."""

from __future__ import annotations

import torch
from helpers import make_spec

import attnkit
from attnkit import Backend, BackendCapabilities
from attnkit.dispatch import select_backend_name
from attnkit.registry import REGISTRY
from attnkit.spec import AttentionSpec

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


def fake_backend(name, priority, caps, *, auto_reasons=(), unavailable=None, calls=None):
    def why_not_auto(self, s):
        return list(auto_reasons)

    def unavailable_reason(self):
        return unavailable

    def extra_why_not(self, s):
        if calls is not None:
            calls.append(s)
        return ["seqlen_k > 4096 not supported"] if s.seqlen_k > 4096 else []

    return type(
        f"Fake_{name}",
        (Backend,),
        dict(
            name=name,
            priority=priority,
            capabilities=caps,
            why_not_auto=why_not_auto,
            unavailable_reason=unavailable_reason,
            extra_why_not=extra_why_not,
            description=f"fake {name}",
        ),
    )


NV_CAPS = BackendCapabilities(
    device_types=frozenset({"cuda"}),
    dtypes=frozenset({F16, BF16}),
    ops=frozenset({"attention", "varlen"}),
    features=frozenset({"causal", "window", "gqa"}),
    vendors=frozenset({"nvidia"}),
    min_compute_capability=(8, 0),
    min_head_dim=16,
    max_head_dim=128,
    head_dim_multiple=8,
    backward_ops=frozenset({"attention"}),
)
AMD_CAPS = BackendCapabilities(
    device_types=frozenset({"cuda"}),
    dtypes=frozenset({F16, BF16, F32}),
    ops=frozenset({"attention"}),
    features=frozenset({"causal"}),
    vendors=frozenset({"amd"}),
    backward=False,
)
ANY_CAPS = BackendCapabilities(
    device_types=frozenset({"cuda", "cpu"}),
    dtypes=frozenset({F16, BF16, F32, F64}),
    ops=frozenset({"attention", "varlen", "kvcache", "paged_kvcache", "piecewise"}),
    features=frozenset(attnkit.spec.FEATURES),
)


def install_fakes() -> list[AttentionSpec]:
    """Registers fake_nv, fake_amd and fake_any (priorities 100, 90, 50) in the current registry table; returns
    the list fake_nv appends every spec it is asked about to."""
    calls: list[AttentionSpec] = []
    REGISTRY.register("fake_nv", fake_backend("fake_nv", 100, NV_CAPS, calls=calls))
    REGISTRY.register("fake_amd", fake_backend("fake_amd", 90, AMD_CAPS))
    REGISTRY.register("fake_any", fake_backend("fake_any", 50, ANY_CAPS))
    return calls


def choose(s: AttentionSpec | None = None, backend="auto") -> str:
    return select_backend_name(s or make_spec(), backend)
