"""Backend selection on hand-made AttentionSpecs against fake backends (tests/fake_backends.py): priority,
eligibility, errors, precedence of argument, context and environment, aliases and caching."""

from __future__ import annotations

import pytest
import torch
from fake_backends import AMD_CAPS, ANY_CAPS, F32, F64, choose, fake_backend
from helpers import make_spec

import attnkit
from attnkit import (
    AttnkitError,
    BackendUnsupportedError,
    InvalidArgumentError,
    NoBackendError,
    dispatch,
    registry,
    use_backend,
)
from attnkit.registry import REGISTRY

# ---- priority and eligibility --------------------------------------------------------------------------------------


def test_priority_order(fakes):
    assert choose(make_spec()) == "fake_nv"
    assert choose(make_spec(compute_capability=(9, 0))) == "fake_nv"
    assert choose(make_spec(compute_capability=(7, 5))) == "fake_any"
    assert choose(make_spec(is_hip=True, compute_capability=(9, 4))) == "fake_amd"
    assert choose(make_spec(device_type="cpu", dtype=F64)) == "fake_any"


def test_eligibility_is_separate_from_priority(fakes):
    # The highest-priority backend is skipped for what it cannot do; lower ones take over in order.
    assert choose(make_spec(dtype=F32)) == "fake_any"
    assert choose(make_spec(is_hip=True, dtype=F32)) == "fake_amd"
    assert choose(make_spec(is_hip=True, dtype=F64)) == "fake_any"
    # Raising a backend's priority changes the order but not what it can run.
    REGISTRY.register("fake_top", fake_backend("fake_top", 1000, AMD_CAPS))
    assert choose(make_spec()) == "fake_nv"
    assert choose(make_spec(is_hip=True)) == "fake_top"
    # explain() reports eligibility of every backend independently of priority.
    reasons = dispatch.explain(make_spec(is_hip=True))
    assert reasons["fake_top"] == [] and reasons["fake_amd"] == [] and reasons["fake_any"] == []
    assert reasons["fake_nv"]


def test_reference_is_last_resort(fakes):
    REGISTRY.unregister("fake_any")
    assert choose(make_spec(dtype=F32)) == "reference"
    assert choose(make_spec(device_type="cpu", dtype=F32)) == "reference"


def test_why_not_auto_only_applies_to_auto(fakes):
    REGISTRY.register("fake_picky", fake_backend("fake_picky", 500, ANY_CAPS, auto_reasons=["experimental"]))
    assert choose(make_spec(dtype=F32)) == "fake_any"
    assert choose(make_spec(dtype=F32), "fake_picky") == "fake_picky"


# ---- errors from selection -----------------------------------------------------------------------------------------


def test_forced_backend_that_cannot_run(fakes):
    with pytest.raises(BackendUnsupportedError) as info:
        choose(make_spec(compute_capability=(7, 5), dtype=F32), "fake_nv")
    err = info.value
    assert err.backend == "fake_nv"
    assert "compute capability 7.5 < required 8.0" in err.reasons
    assert any(r.startswith("dtype float32") for r in err.reasons)
    assert "fake_nv" in str(err) and "compute capability 7.5" in str(err)
    assert isinstance(err, AttnkitError) and isinstance(err, ValueError)


def test_no_backend_lists_every_reason(fakes):
    s = make_spec(device_type="xla", dtype=F32)
    with pytest.raises(NoBackendError) as info:
        choose(s)
    err = info.value
    assert set(err.reasons) == {"reference", "fake_nv", "fake_amd", "fake_any"}
    assert all(err.reasons[name] for name in err.reasons)
    text = str(err)
    for name in err.reasons:
        assert f"{name}:" in text
    assert "device type 'xla' not supported" in text
    assert s.describe() in text and "requested by auto" in text
    assert isinstance(err, AttnkitError) and isinstance(err, RuntimeError)


def test_unknown_backend_argument(fakes):
    with pytest.raises(InvalidArgumentError, match=r"unknown backend.*'nope'") as info:
        choose(make_spec(), "nope")
    assert "fake_nv" in str(info.value) and "'auto'" in str(info.value)
    with pytest.raises(InvalidArgumentError, match="empty"):
        choose(make_spec(), "")
    with pytest.raises(InvalidArgumentError, match="empty"):
        choose(make_spec(), "fake_nv,,fake_any")
    with pytest.raises(InvalidArgumentError, match="use_backend"):
        with use_backend("nope"):
            pass


def test_auto_inside_a_list_is_a_clear_error_or_works(fakes):
    """'auto' mixed into a list must not leak a KeyError from the registry."""
    for request in (["fake_amd", "auto"], "auto,fake_amd"):
        try:
            name = choose(make_spec(), request)
        except AttnkitError:
            continue
        assert name in REGISTRY.names()


def test_backend_argument_of_wrong_type(fakes):
    with pytest.raises(AttnkitError) as info:
        choose(make_spec(), 5)
    assert isinstance(info.value, TypeError | ValueError)


# ---- precedence ----------------------------------------------------------------------------------------------------


def test_precedence(fakes, monkeypatch):
    s = make_spec(dtype=F32, is_hip=True)  # fake_amd and fake_any and reference can run it
    assert choose(s) == "fake_amd"  # auto
    monkeypatch.setenv("ATTNKIT_BACKEND", "fake_any")
    assert choose(s) == "fake_any"  # env > auto
    with use_backend("reference"):
        assert choose(s) == "reference"  # use_backend > env
        assert choose(s, "fake_amd") == "fake_amd"  # explicit > use_backend
        assert choose(s, "auto") == "reference"  # backend='auto' defers to the context
    assert choose(s) == "fake_any"


def test_nested_use_backend(fakes, monkeypatch):
    s = make_spec(dtype=F32, is_hip=True)
    monkeypatch.setenv("ATTNKIT_BACKEND", "fake_any")
    with use_backend("reference"):
        with use_backend(["fake_nv", "fake_amd"]):
            assert choose(s) == "fake_amd"
            with use_backend("auto"):  # 'auto' clears the context: the environment applies again
                assert choose(s) == "fake_any"
            assert choose(s) == "fake_amd"
        assert choose(s) == "reference"
    assert choose(s) == "fake_any"


def test_use_backend_restored_after_exception(fakes):
    with pytest.raises(RuntimeError):
        with use_backend("reference"):
            raise RuntimeError("boom")
    assert choose(make_spec()) == "fake_nv"


def test_use_backend_through_public_op(fakes):
    q = torch.randn(1, 4, 2, 8)
    with use_backend(["fake_nv", "reference"]):  # fake_nv is cuda-only, so reference runs the CPU call
        out = attnkit.attention(q, q, q)
    assert torch.allclose(out, attnkit.attention(q, q, q, backend="reference"))
    with use_backend("fake_nv"), pytest.raises(BackendUnsupportedError, match="device type 'cpu'"):
        attnkit.attention(q, q, q)


# ---- aliases -------------------------------------------------------------------------------------------------------


def test_triton_alias(fakes, monkeypatch):
    REGISTRY.register("triton_cuda", fake_backend("triton_cuda", 5, ANY_CAPS))
    REGISTRY.register("triton_rocm", fake_backend("triton_rocm", 5, ANY_CAPS))
    monkeypatch.setattr(torch.version, "hip", None)
    assert registry.resolve_alias("triton") == "triton_cuda"
    assert choose(make_spec(), "triton") == "triton_cuda"
    monkeypatch.setenv("ATTNKIT_BACKEND", "triton")
    assert choose(make_spec()) == "triton_cuda"
    monkeypatch.delenv("ATTNKIT_BACKEND")
    monkeypatch.setattr(torch.version, "hip", "6.2.0")
    dispatch.clear_cache()
    assert registry.resolve_alias("triton") == "triton_rocm"
    assert choose(make_spec(is_hip=True), "triton") == "triton_rocm"
    with use_backend("triton"):
        assert choose(make_spec(is_hip=True)) == "triton_rocm"
    assert registry.resolve_alias("reference") == "reference"


def test_triton_alias_in_disable(fakes, monkeypatch):
    REGISTRY.register("triton_cuda", fake_backend("triton_cuda", 500, ANY_CAPS))
    monkeypatch.setattr(torch.version, "hip", None)
    assert choose(make_spec(dtype=F64)) == "triton_cuda"
    monkeypatch.setenv("ATTNKIT_DISABLE", "triton")
    assert choose(make_spec(dtype=F64)) == "fake_any"


# ---- caching -------------------------------------------------------------------------------------------------------


def test_decisions_are_cached_per_spec(fakes):
    calls = fakes
    s = make_spec()
    for _ in range(5):
        choose(s)
    assert len(calls) == 1
    choose(make_spec(seqlen_q=129))
    assert len(calls) == 2
    REGISTRY.register("fake_new", fake_backend("fake_new", 1, ANY_CAPS))  # a new registry generation: decided afresh
    choose(s)
    assert len(calls) == 3


def test_specs_are_hashable_and_describe():
    a, b = make_spec(features=frozenset({"causal", "gqa"})), make_spec(features=frozenset({"gqa", "causal"}))
    assert a == b and hash(a) == hash(b)
    text = make_spec(
        features=frozenset({"causal"}), requires_grad=True, is_hip=True, compute_capability=(9, 4)
    ).describe()
    assert "sm_94" in text and "(HIP)" in text and "features=causal" in text and "+grad" in text
