"""The backend registry: a backend's reasons (``why_not``) from its capability table, registration by string,
class or instance, entry-point discovery and backends whose module fails to load."""

from __future__ import annotations

import sys
import textwrap
from importlib import metadata

import pytest
import torch
from fake_backends import ANY_CAPS, F16, F32, F64, choose, fake_backend
from helpers import make_spec

import attnkit
from attnkit import AttnkitError, BackendCapabilities, BackendUnsupportedError, dispatch, registry, select_backend
from attnkit.registry import REGISTRY

# ---- why_not reasons -----------------------------------------------------------------------------------------------


def why(name, s):
    return REGISTRY.get(name).why_not(s)


def test_why_not_reasons_text(fakes):
    assert why("fake_nv", make_spec()) == []
    assert why("fake_nv", make_spec(compute_capability=(7, 5))) == ["compute capability 7.5 < required 8.0"]
    assert why("fake_nv", make_spec(is_hip=True)) == ["amd devices not supported (supports ['nvidia'])"]
    assert why("fake_amd", make_spec()) == ["nvidia devices not supported (supports ['amd'])"]
    assert why("fake_nv", make_spec(device_type="cpu")) == ["device type 'cpu' not supported (supports ['cuda'])"]
    (r,) = why("fake_nv", make_spec(dtype=F32))
    assert r.startswith("dtype float32 not supported") and "bfloat16" in r and "float16" in r
    assert why("fake_nv", make_spec(head_dim=60, head_dim_v=64)) == [
        "head_dim=60 not supported (supports 16..128, multiple of 8)"
    ]
    reasons = why("fake_nv", make_spec(head_dim=8, head_dim_v=256))
    assert any("head_dim=8 not supported" in x for x in reasons)
    assert any("head_dim_v=256 not supported" in x for x in reasons)
    assert why("fake_nv", make_spec(op="kvcache")) == [
        "operator 'kvcache' not implemented (implements ['attention', 'varlen'])"
    ]
    assert why("fake_nv", make_spec(features=frozenset({"softcap", "alibi", "causal"}))) == [
        "feature(s) alibi, softcap not supported"
    ]
    assert why("fake_nv", make_spec(requires_grad=True)) == []
    assert why("fake_nv", make_spec(op="varlen", requires_grad=True)) == [
        "no backward pass for 'varlen' (inputs require grad)"
    ]
    assert why("fake_amd", make_spec(is_hip=True, requires_grad=True)) == [
        "no backward pass for 'attention' (inputs require grad)"
    ]
    assert why("fake_nv", make_spec(seqlen_k=8192)) == ["seqlen_k > 4096 not supported"]  # extra_why_not
    # Every reason is reported, not just the first.
    many = why("fake_nv", make_spec(compute_capability=(7, 0), dtype=F64, op="piecewise", requires_grad=True))
    assert len(many) == 4


def test_capability_is_ignored_off_nvidia(fakes):
    caps = BackendCapabilities(
        device_types=frozenset({"cuda"}),
        dtypes=frozenset({F16}),
        ops=frozenset({"attention"}),
        features=frozenset(),
        min_compute_capability=(9, 0),
    )
    REGISTRY.register("fake_h", fake_backend("fake_h", 10, caps))
    assert why("fake_h", make_spec(compute_capability=(8, 0))) == ["compute capability 8.0 < required 9.0"]
    assert why("fake_h", make_spec(is_hip=True, compute_capability=(8, 0))) == []


def test_unavailable_reason_short_circuits(fakes):
    REGISTRY.register(
        "fake_gone", fake_backend("fake_gone", 10, ANY_CAPS, unavailable="needs package foo (pip install foo)")
    )
    assert why("fake_gone", make_spec(dtype=torch.int8, op="nope")) == ["needs package foo (pip install foo)"]
    statuses = {s.name: s for s in attnkit.list_backends()}
    assert statuses["fake_gone"].available is False
    assert statuses["fake_gone"].reason == "needs package foo (pip install foo)"
    assert [s.priority for s in attnkit.list_backends()] == sorted(
        (s.priority for s in statuses.values()), reverse=True
    )


# ---- registration, entry points, broken backends -------------------------------------------------------------------


def test_register_backend_by_string_class_and_instance(fakes):
    attnkit.register_backend("fake_str", "attnkit.backends.reference:ReferenceBackend")
    assert REGISTRY.get("fake_str").name == "reference"  # target imported lazily, on first use
    inst = fake_backend("fake_inst", 3, ANY_CAPS)()
    attnkit.register_backend("fake_inst", inst)
    assert REGISTRY.get("fake_inst") is inst
    REGISTRY.unregister("fake_str")
    REGISTRY.unregister("fake_inst")
    assert "fake_inst" not in REGISTRY.names()


def test_registered_name_differs_from_class_name(fakes):
    """Registering a class under another name must either be refused clearly or work under that name."""
    cls = fake_backend("internal_name", 700, ANY_CAPS)
    try:
        attnkit.register_backend("public_name", cls)
    except AttnkitError:
        return
    assert choose(make_spec(dtype=F64), "public_name") == "public_name"
    assert choose(make_spec(dtype=F64)) == "public_name"


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
        assert select_backend(make_spec(device_type="cpu", dtype=F64)).name in ("ext", *registry.BUILTIN_BACKENDS)
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
        (reason,) = REGISTRY.get("broken").why_not(make_spec(device_type="cpu", dtype=F32))
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
