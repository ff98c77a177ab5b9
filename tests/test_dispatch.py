"""Backend selection on hand-made AttentionSpecs against fake backends: priority, eligibility, environment
variables, precedence, aliases, entry points and broken backends."""

from __future__ import annotations

import logging
import sys
import textwrap
from importlib import metadata

import pytest
import torch

import attnkit
from attnkit import (
    AttnkitError,
    Backend,
    BackendCapabilities,
    BackendUnsupportedError,
    EnvironmentVariableError,
    InvalidArgumentError,
    NoBackendError,
    dispatch,
    registry,
    select_backend,
    use_backend,
)
from attnkit.dispatch import select_backend_name
from attnkit.registry import REGISTRY
from attnkit.spec import AttentionSpec

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


def spec(**kw) -> AttentionSpec:
    base = dict(
        op="attention",
        device_type="cuda",
        compute_capability=(8, 0),
        is_hip=False,
        dtype=F16,
        head_dim=64,
        head_dim_v=64,
        num_heads_q=8,
        num_heads_k=8,
        batch=2,
        seqlen_q=128,
        seqlen_k=128,
    )
    base.update(kw)
    if base["device_type"] != "cuda":
        base["compute_capability"] = None
    return AttentionSpec(**base)


def _backend(name, priority, caps, *, auto_reasons=(), unavailable=None, calls=None):
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


@pytest.fixture
def fakes(monkeypatch, clean_env):
    """An isolated registry holding the real reference backend and three fakes (priorities 100, 90, 50).

    Whatever else is installed (Triton, CuPy, third-party entry points) is hidden, so these tests give the same
    answers on a laptop and on a GPU machine."""
    REGISTRY.names()  # discover first, so nothing is re-added to the isolated table
    isolated = {"reference": REGISTRY._entries["reference"]}
    monkeypatch.setattr(REGISTRY, "_entries", isolated)
    monkeypatch.setattr(REGISTRY, "_discovered", True)
    calls: list[AttentionSpec] = []
    REGISTRY.register("fake_nv", _backend("fake_nv", 100, NV_CAPS, calls=calls))
    REGISTRY.register("fake_amd", _backend("fake_amd", 90, AMD_CAPS))
    REGISTRY.register("fake_any", _backend("fake_any", 50, ANY_CAPS))
    yield calls
    for name in list(isolated):
        if name != "reference":
            REGISTRY.unregister(name)
    dispatch.clear_cache()


def choose(s=None, backend="auto"):
    return select_backend_name(s or spec(), backend)


# ---- priority and eligibility --------------------------------------------------------------------------------------


def test_priority_order(fakes):
    assert choose(spec()) == "fake_nv"
    assert choose(spec(compute_capability=(9, 0))) == "fake_nv"
    assert choose(spec(compute_capability=(7, 5))) == "fake_any"
    assert choose(spec(is_hip=True, compute_capability=(9, 4))) == "fake_amd"
    assert choose(spec(device_type="cpu", dtype=F64)) == "fake_any"


def test_eligibility_is_separate_from_priority(fakes):
    # The highest-priority backend is skipped for what it cannot do; lower ones take over in order.
    assert choose(spec(dtype=F32)) == "fake_any"
    assert choose(spec(is_hip=True, dtype=F32)) == "fake_amd"
    assert choose(spec(is_hip=True, dtype=F64)) == "fake_any"
    # Raising a backend's priority changes the order but not what it can run.
    REGISTRY.register("fake_top", _backend("fake_top", 1000, AMD_CAPS))
    assert choose(spec()) == "fake_nv"
    assert choose(spec(is_hip=True)) == "fake_top"
    # explain() reports eligibility of every backend independently of priority.
    reasons = dispatch.explain(spec(is_hip=True))
    assert reasons["fake_top"] == [] and reasons["fake_amd"] == [] and reasons["fake_any"] == []
    assert reasons["fake_nv"]


def test_reference_is_last_resort(fakes):
    REGISTRY.unregister("fake_any")
    assert choose(spec(dtype=F32)) == "reference"
    assert choose(spec(device_type="cpu", dtype=F32)) == "reference"


def test_why_not_auto_only_applies_to_auto(fakes):
    REGISTRY.register("fake_picky", _backend("fake_picky", 500, ANY_CAPS, auto_reasons=["experimental"]))
    assert choose(spec(dtype=F32)) == "fake_any"
    assert choose(spec(dtype=F32), "fake_picky") == "fake_picky"


# ---- why_not reasons -----------------------------------------------------------------------------------------------


def why(name, s):
    return REGISTRY.get(name).why_not(s)


def test_why_not_reasons_text(fakes):
    assert why("fake_nv", spec()) == []
    assert why("fake_nv", spec(compute_capability=(7, 5))) == ["compute capability 7.5 < required 8.0"]
    assert why("fake_nv", spec(is_hip=True)) == ["amd devices not supported (supports ['nvidia'])"]
    assert why("fake_amd", spec()) == ["nvidia devices not supported (supports ['amd'])"]
    assert why("fake_nv", spec(device_type="cpu")) == ["device type 'cpu' not supported (supports ['cuda'])"]
    (r,) = why("fake_nv", spec(dtype=F32))
    assert r.startswith("dtype float32 not supported") and "bfloat16" in r and "float16" in r
    assert why("fake_nv", spec(head_dim=60, head_dim_v=64)) == [
        "head_dim=60 not supported (supports 16..128, multiple of 8)"
    ]
    reasons = why("fake_nv", spec(head_dim=8, head_dim_v=256))
    assert any("head_dim=8 not supported" in x for x in reasons)
    assert any("head_dim_v=256 not supported" in x for x in reasons)
    assert why("fake_nv", spec(op="kvcache")) == [
        "operator 'kvcache' not implemented (implements ['attention', 'varlen'])"
    ]
    assert why("fake_nv", spec(features=frozenset({"softcap", "alibi", "causal"}))) == [
        "feature(s) alibi, softcap not supported"
    ]
    assert why("fake_nv", spec(requires_grad=True)) == []
    assert why("fake_nv", spec(op="varlen", requires_grad=True)) == [
        "no backward pass for 'varlen' (inputs require grad)"
    ]
    assert why("fake_amd", spec(is_hip=True, requires_grad=True)) == [
        "no backward pass for 'attention' (inputs require grad)"
    ]
    assert why("fake_nv", spec(seqlen_k=8192)) == ["seqlen_k > 4096 not supported"]  # extra_why_not
    # Every reason is reported, not just the first.
    many = why("fake_nv", spec(compute_capability=(7, 0), dtype=F64, op="piecewise", requires_grad=True))
    assert len(many) == 4


def test_capability_is_ignored_off_nvidia(fakes):
    caps = BackendCapabilities(
        device_types=frozenset({"cuda"}),
        dtypes=frozenset({F16}),
        ops=frozenset({"attention"}),
        features=frozenset(),
        min_compute_capability=(9, 0),
    )
    REGISTRY.register("fake_h", _backend("fake_h", 10, caps))
    assert why("fake_h", spec(compute_capability=(8, 0))) == ["compute capability 8.0 < required 9.0"]
    assert why("fake_h", spec(is_hip=True, compute_capability=(8, 0))) == []


def test_unavailable_reason_short_circuits(fakes):
    REGISTRY.register(
        "fake_gone", _backend("fake_gone", 10, ANY_CAPS, unavailable="needs package foo (pip install foo)")
    )
    assert why("fake_gone", spec(dtype=torch.int8, op="nope")) == ["needs package foo (pip install foo)"]
    statuses = {s.name: s for s in attnkit.list_backends()}
    assert statuses["fake_gone"].available is False
    assert statuses["fake_gone"].reason == "needs package foo (pip install foo)"
    assert [s.priority for s in attnkit.list_backends()] == sorted(
        (s.priority for s in statuses.values()), reverse=True
    )


# ---- errors from selection -----------------------------------------------------------------------------------------


def test_forced_backend_that_cannot_run(fakes):
    with pytest.raises(BackendUnsupportedError) as info:
        choose(spec(compute_capability=(7, 5), dtype=F32), "fake_nv")
    err = info.value
    assert err.backend == "fake_nv"
    assert "compute capability 7.5 < required 8.0" in err.reasons
    assert any(r.startswith("dtype float32") for r in err.reasons)
    assert "fake_nv" in str(err) and "compute capability 7.5" in str(err)
    assert isinstance(err, AttnkitError) and isinstance(err, ValueError)


def test_no_backend_lists_every_reason(fakes):
    s = spec(device_type="xla", dtype=F32)
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
        choose(spec(), "nope")
    assert "fake_nv" in str(info.value) and "'auto'" in str(info.value)
    with pytest.raises(InvalidArgumentError, match="empty"):
        choose(spec(), "")
    with pytest.raises(InvalidArgumentError, match="empty"):
        choose(spec(), "fake_nv,,fake_any")
    with pytest.raises(InvalidArgumentError, match="use_backend"):
        with use_backend("nope"):
            pass


def test_auto_inside_a_list_is_a_clear_error_or_works(fakes):
    """'auto' mixed into a list must not leak a KeyError from the registry."""
    for request in (["fake_amd", "auto"], "auto,fake_amd"):
        try:
            name = choose(spec(), request)
        except AttnkitError:
            continue
        assert name in REGISTRY.names()


def test_backend_argument_of_wrong_type(fakes):
    with pytest.raises(AttnkitError) as info:
        choose(spec(), 5)
    assert isinstance(info.value, TypeError | ValueError)


# ---- environment variables -----------------------------------------------------------------------------------------


def test_env_backend_single_is_forced(fakes, monkeypatch):
    monkeypatch.setenv("ATTNKIT_BACKEND", "fake_any")
    assert choose(spec()) == "fake_any"  # beats higher-priority fake_nv
    monkeypatch.setenv("ATTNKIT_BACKEND", "fake_amd")
    with pytest.raises(BackendUnsupportedError) as info:
        choose(spec())
    assert "nvidia devices not supported" in str(info.value)


def test_env_backend_list_is_ordered_allow_list(fakes, monkeypatch):
    monkeypatch.setenv("ATTNKIT_BACKEND", "fake_amd, fake_any")
    assert choose(spec()) == "fake_any"  # fake_nv is not in the list; fake_amd cannot run it
    assert choose(spec(is_hip=True)) == "fake_amd"
    monkeypatch.setenv("ATTNKIT_BACKEND", "fake_any,fake_amd")
    assert choose(spec(is_hip=True)) == "fake_any"  # list order, not priority
    monkeypatch.setenv("ATTNKIT_BACKEND", "fake_amd,fake_nv")
    with pytest.raises(NoBackendError) as info:
        choose(spec(dtype=F64))
    assert set(info.value.reasons) == {"fake_amd", "fake_nv"}
    assert "ATTNKIT_BACKEND" in str(info.value)


def test_env_disable_affects_auto_only(fakes, monkeypatch):
    monkeypatch.setenv("ATTNKIT_DISABLE", "fake_nv")
    assert choose(spec()) == "fake_any"
    assert choose(spec(), "fake_nv") == "fake_nv"
    with use_backend("fake_nv"):
        assert choose(spec()) == "fake_nv"
    monkeypatch.setenv("ATTNKIT_BACKEND", "fake_nv")
    assert choose(spec()) == "fake_nv"
    monkeypatch.delenv("ATTNKIT_BACKEND")
    monkeypatch.setenv("ATTNKIT_DISABLE", "fake_nv,fake_any,reference")
    with pytest.raises(NoBackendError) as info:
        choose(spec())
    assert info.value.reasons["fake_nv"] == ["disabled by ATTNKIT_DISABLE"]
    assert info.value.reasons["reference"] == ["disabled by ATTNKIT_DISABLE"]


@pytest.mark.parametrize("var", ["ATTNKIT_BACKEND", "ATTNKIT_DISABLE"])
@pytest.mark.parametrize("value", ["nope", "fake_nv,nope", "fake_nv,,fake_any", ",", "fake_nv,"])
def test_env_malformed_values(fakes, monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(EnvironmentVariableError) as info:
        choose(spec())
    text = str(info.value)
    assert var in text and repr(value) in text
    assert isinstance(info.value, AttnkitError) and isinstance(info.value, ValueError)
    if "nope" in value:
        assert "'nope'" in text


@pytest.mark.parametrize("var", ["ATTNKIT_BACKEND", "ATTNKIT_DISABLE"])
@pytest.mark.parametrize("value", ["nope", "a,,b"])
def test_env_errors_list_valid_names(fakes, monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(EnvironmentVariableError) as info:
        choose(spec())
    text = str(info.value)
    for name in ("fake_nv", "fake_amd", "fake_any", "reference", "triton"):
        assert name in text, f"{name!r} missing from: {text}"


def test_env_empty_means_unset(fakes, monkeypatch):
    monkeypatch.setenv("ATTNKIT_BACKEND", "")
    monkeypatch.setenv("ATTNKIT_DISABLE", "  ")
    assert choose(spec()) == "fake_nv"


def test_env_read_at_call_time(fakes, monkeypatch):
    assert choose(spec()) == "fake_nv"
    monkeypatch.setenv("ATTNKIT_BACKEND", "fake_any")
    assert choose(spec()) == "fake_any"  # the cached auto decision is not reused
    monkeypatch.setenv("ATTNKIT_DISABLE", "fake_nv")
    monkeypatch.delenv("ATTNKIT_BACKEND")
    assert choose(spec()) == "fake_any"
    monkeypatch.delenv("ATTNKIT_DISABLE")
    assert choose(spec()) == "fake_nv"


def test_debug_logging(fakes, monkeypatch, caplog):
    monkeypatch.setenv("ATTNKIT_DEBUG", "1")
    s = spec(compute_capability=(7, 5))
    with caplog.at_level(logging.INFO, logger="attnkit.dispatch"):
        assert choose(s) == "fake_any"
        choose(s)  # a cached decision is logged too
    records = [r for r in caplog.records if r.name == "attnkit.dispatch"]
    assert len(records) == 2
    text = records[0].getMessage()
    assert s.describe() in text and "-> fake_any (by auto)" in text
    assert "rejected fake_nv: compute capability 7.5 < required 8.0" in text
    assert "rejected fake_amd: nvidia devices not supported" in text
    caplog.clear()
    monkeypatch.setenv("ATTNKIT_DEBUG", "0")
    with caplog.at_level(logging.INFO, logger="attnkit.dispatch"):
        choose(s)
    assert not [r for r in caplog.records if r.name == "attnkit.dispatch"]


def test_debug_logging_names_origin(fakes, monkeypatch, caplog):
    monkeypatch.setenv("ATTNKIT_DEBUG", "true")
    monkeypatch.setenv("ATTNKIT_BACKEND", "fake_amd,fake_any")
    with caplog.at_level(logging.INFO, logger="attnkit.dispatch"):
        choose(spec())
    assert "-> fake_any (by ATTNKIT_BACKEND)" in caplog.text
    assert "rejected fake_amd" in caplog.text


@pytest.mark.parametrize("value", ["maybe", "2", "debug"])
def test_debug_malformed(fakes, monkeypatch, value):
    monkeypatch.setenv("ATTNKIT_DEBUG", value)
    with pytest.raises(EnvironmentVariableError, match="ATTNKIT_DEBUG"):
        choose(spec())


# ---- precedence ----------------------------------------------------------------------------------------------------


def test_precedence(fakes, monkeypatch):
    s = spec(dtype=F32, is_hip=True)  # fake_amd and fake_any and reference can run it
    assert choose(s) == "fake_amd"  # auto
    monkeypatch.setenv("ATTNKIT_BACKEND", "fake_any")
    assert choose(s) == "fake_any"  # env > auto
    with use_backend("reference"):
        assert choose(s) == "reference"  # use_backend > env
        assert choose(s, "fake_amd") == "fake_amd"  # explicit > use_backend
        assert choose(s, "auto") == "reference"  # backend='auto' defers to the context
    assert choose(s) == "fake_any"


def test_nested_use_backend(fakes, monkeypatch):
    s = spec(dtype=F32, is_hip=True)
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
    assert choose(spec()) == "fake_nv"


def test_use_backend_through_public_op(fakes):
    q = torch.randn(1, 4, 2, 8)
    with use_backend(["fake_nv", "reference"]):  # fake_nv is cuda-only, so reference runs the CPU call
        out = attnkit.attention(q, q, q)
    assert torch.allclose(out, attnkit.attention(q, q, q, backend="reference"))
    with use_backend("fake_nv"), pytest.raises(BackendUnsupportedError, match="device type 'cpu'"):
        attnkit.attention(q, q, q)


# ---- aliases -------------------------------------------------------------------------------------------------------


def test_triton_alias(fakes, monkeypatch):
    REGISTRY.register("triton_cuda", _backend("triton_cuda", 5, ANY_CAPS))
    REGISTRY.register("triton_rocm", _backend("triton_rocm", 5, ANY_CAPS))
    monkeypatch.setattr(torch.version, "hip", None)
    assert registry.resolve_alias("triton") == "triton_cuda"
    assert choose(spec(), "triton") == "triton_cuda"
    monkeypatch.setenv("ATTNKIT_BACKEND", "triton")
    assert choose(spec()) == "triton_cuda"
    monkeypatch.delenv("ATTNKIT_BACKEND")
    monkeypatch.setattr(torch.version, "hip", "6.2.0")
    dispatch.clear_cache()
    assert registry.resolve_alias("triton") == "triton_rocm"
    assert choose(spec(is_hip=True), "triton") == "triton_rocm"
    with use_backend("triton"):
        assert choose(spec(is_hip=True)) == "triton_rocm"
    assert registry.resolve_alias("reference") == "reference"


def test_triton_alias_in_disable(fakes, monkeypatch):
    REGISTRY.register("triton_cuda", _backend("triton_cuda", 500, ANY_CAPS))
    monkeypatch.setattr(torch.version, "hip", None)
    assert choose(spec(dtype=F64)) == "triton_cuda"
    monkeypatch.setenv("ATTNKIT_DISABLE", "triton")
    assert choose(spec(dtype=F64)) == "fake_any"


# ---- caching -------------------------------------------------------------------------------------------------------


def test_decisions_are_cached_per_spec(fakes):
    calls = fakes
    s = spec()
    for _ in range(5):
        choose(s)
    assert len(calls) == 1
    choose(spec(seqlen_q=129))
    assert len(calls) == 2
    REGISTRY.register("fake_new", _backend("fake_new", 1, ANY_CAPS))  # a new registry generation: decided afresh
    choose(s)
    assert len(calls) == 3


def test_specs_are_hashable_and_describe():
    a, b = spec(features=frozenset({"causal", "gqa"})), spec(features=frozenset({"gqa", "causal"}))
    assert a == b and hash(a) == hash(b)
    text = spec(features=frozenset({"causal"}), requires_grad=True, is_hip=True, compute_capability=(9, 4)).describe()
    assert "sm_94" in text and "(HIP)" in text and "features=causal" in text and "+grad" in text


# ---- registration, entry points, broken backends -------------------------------------------------------------------


def test_register_backend_by_string_class_and_instance(fakes):
    attnkit.register_backend("fake_str", "attnkit.backends.reference:ReferenceBackend")
    assert REGISTRY.get("fake_str").name == "reference"  # target imported lazily, on first use
    inst = _backend("fake_inst", 3, ANY_CAPS)()
    attnkit.register_backend("fake_inst", inst)
    assert REGISTRY.get("fake_inst") is inst
    REGISTRY.unregister("fake_str")
    REGISTRY.unregister("fake_inst")
    assert "fake_inst" not in REGISTRY.names()


def test_registered_name_differs_from_class_name(fakes):
    """Registering a class under another name must either be refused clearly or work under that name."""
    cls = _backend("internal_name", 700, ANY_CAPS)
    try:
        attnkit.register_backend("public_name", cls)
    except AttnkitError:
        return
    assert choose(spec(dtype=F64), "public_name") == "public_name"
    assert choose(spec(dtype=F64)) == "public_name"


def _write_module(tmp_path, monkeypatch, name, body):
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)


def test_entry_point_discovery(tmp_path, monkeypatch, clean_env):
    _write_module(
        tmp_path,
        monkeypatch,
        "attnkit_ext_backend",
        """
        from attnkit.backends.reference import ReferenceBackend

        class ExtBackend(ReferenceBackend):
            name = "ext"
            priority = 7
            description = "third-party test backend"
    """,
    )
    eps = [
        metadata.EntryPoint(name="ext", value="attnkit_ext_backend:ExtBackend", group=registry.ENTRY_POINT_GROUP),
        # our own distribution lists the built-ins too; they must stay "builtin"
        metadata.EntryPoint(name="reference", value="elsewhere:Nope", group=registry.ENTRY_POINT_GROUP),
    ]
    monkeypatch.setattr(registry, "_entry_points", lambda: eps)
    monkeypatch.setattr(REGISTRY, "_entries", {})
    monkeypatch.setattr(REGISTRY, "_discovered", False)
    dispatch.clear_cache()
    try:
        names = REGISTRY.names()
        assert set(registry.BUILTIN_BACKENDS) <= set(names) and "ext" in names
        assert REGISTRY.source("reference") == "builtin"
        assert REGISTRY.source("ext") == "entry point"
        assert "attnkit_ext_backend" not in sys.modules  # imported lazily
        statuses = {s.name: s for s in attnkit.list_backends()}
        assert statuses["ext"].available and statuses["ext"].priority == 7
        assert statuses["ext"].description == "third-party test backend"
        q = torch.randn(1, 5, 2, 4, dtype=F64)
        out = attnkit.attention(q, q, q, backend="ext")
        assert torch.allclose(out, attnkit.attention(q, q, q, backend="reference"))
        assert select_backend(spec(device_type="cpu", dtype=F64)).name in ("ext", *registry.BUILTIN_BACKENDS)
    finally:
        dispatch.clear_cache()


@pytest.mark.parametrize(
    "value,needle",
    [
        ("attnkit_no_such_module_xyz:Backend", "ModuleNotFoundError"),
        ("attnkit_broken_backend:Backend", "ZeroDivisionError"),
        ("attnkit.backends.reference:NoSuchClass", "AttributeError"),
    ],
)
def test_broken_backend_module(tmp_path, monkeypatch, clean_env, value, needle):
    _write_module(tmp_path, monkeypatch, "attnkit_broken_backend", "x = 1 / 0\n")
    eps = [metadata.EntryPoint(name="broken", value=value, group=registry.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(registry, "_entry_points", lambda: eps)
    monkeypatch.setattr(REGISTRY, "_entries", {})
    monkeypatch.setattr(REGISTRY, "_discovered", False)
    dispatch.clear_cache()
    try:
        (reason,) = REGISTRY.get("broken").why_not(spec(device_type="cpu", dtype=F32))
        assert reason.startswith("failed to load:") and needle in reason
        status = {s.name: s for s in attnkit.list_backends()}["broken"]
        assert not status.available and status.reason.startswith("failed to load")
        q = torch.randn(1, 3, 1, 4)
        attnkit.attention(q, q, q)  # auto still works: the broken backend is just not eligible
        with pytest.raises(BackendUnsupportedError, match="failed to load"):
            attnkit.attention(q, q, q, backend="broken")
        assert "failed to load" in attnkit.info.format_info()
    finally:
        dispatch.clear_cache()


def test_entry_points_error_is_tolerated(monkeypatch):
    def boom(group):
        raise RuntimeError("bad metadata")

    monkeypatch.setattr(metadata, "entry_points", boom)
    assert list(registry._entry_points()) == []
