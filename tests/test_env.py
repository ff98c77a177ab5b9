"""The environment variables of backend selection (ATTNKIT_BACKEND, ATTNKIT_DISABLE, ATTNKIT_DEBUG) against fake
backends (tests/fake_backends.py): what they force, allow and disable, their errors, when they are read, logging."""

from __future__ import annotations

import logging

import pytest
from fake_backends import F64, choose
from helpers import make_spec

from attnkit import AttnkitError, BackendUnsupportedError, EnvironmentVariableError, NoBackendError, use_backend

# ---- environment variables -----------------------------------------------------------------------------------------


def test_env_backend_single_is_forced(fakes, monkeypatch):
    monkeypatch.setenv("ATTNKIT_BACKEND", "fake_any")
    assert choose(make_spec()) == "fake_any"  # beats higher-priority fake_nv
    monkeypatch.setenv("ATTNKIT_BACKEND", "fake_amd")
    with pytest.raises(BackendUnsupportedError) as info:
        choose(make_spec())
    assert "nvidia devices not supported" in str(info.value)


def test_env_backend_list_is_ordered_allow_list(fakes, monkeypatch):
    monkeypatch.setenv("ATTNKIT_BACKEND", "fake_amd, fake_any")
    assert choose(make_spec()) == "fake_any"  # fake_nv is not in the list; fake_amd cannot run it
    assert choose(make_spec(is_hip=True)) == "fake_amd"
    monkeypatch.setenv("ATTNKIT_BACKEND", "fake_any,fake_amd")
    assert choose(make_spec(is_hip=True)) == "fake_any"  # list order, not priority
    monkeypatch.setenv("ATTNKIT_BACKEND", "fake_amd,fake_nv")
    with pytest.raises(NoBackendError) as info:
        choose(make_spec(dtype=F64))
    assert set(info.value.reasons) == {"fake_amd", "fake_nv"}
    assert "ATTNKIT_BACKEND" in str(info.value)


def test_env_disable_affects_auto_only(fakes, monkeypatch):
    monkeypatch.setenv("ATTNKIT_DISABLE", "fake_nv")
    assert choose(make_spec()) == "fake_any"
    assert choose(make_spec(), "fake_nv") == "fake_nv"
    with use_backend("fake_nv"):
        assert choose(make_spec()) == "fake_nv"
    monkeypatch.setenv("ATTNKIT_BACKEND", "fake_nv")
    assert choose(make_spec()) == "fake_nv"
    monkeypatch.delenv("ATTNKIT_BACKEND")
    monkeypatch.setenv("ATTNKIT_DISABLE", "fake_nv,fake_any,reference")
    with pytest.raises(NoBackendError) as info:
        choose(make_spec())
    assert info.value.reasons["fake_nv"] == ["disabled by ATTNKIT_DISABLE"]
    assert info.value.reasons["reference"] == ["disabled by ATTNKIT_DISABLE"]


@pytest.mark.parametrize("var", ["ATTNKIT_BACKEND", "ATTNKIT_DISABLE"])
@pytest.mark.parametrize("value", ["nope", "fake_nv,nope", "fake_nv,,fake_any", ",", "fake_nv,"])
def test_env_malformed_values(fakes, monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(EnvironmentVariableError) as info:
        choose(make_spec())
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
        choose(make_spec())
    text = str(info.value)
    for name in ("fake_nv", "fake_amd", "fake_any", "reference", "triton"):
        assert name in text, f"{name!r} missing from: {text}"


def test_env_empty_means_unset(fakes, monkeypatch):
    monkeypatch.setenv("ATTNKIT_BACKEND", "")
    monkeypatch.setenv("ATTNKIT_DISABLE", "  ")
    assert choose(make_spec()) == "fake_nv"


def test_env_read_at_call_time(fakes, monkeypatch):
    assert choose(make_spec()) == "fake_nv"
    monkeypatch.setenv("ATTNKIT_BACKEND", "fake_any")
    assert choose(make_spec()) == "fake_any"  # the cached auto decision is not reused
    monkeypatch.setenv("ATTNKIT_DISABLE", "fake_nv")
    monkeypatch.delenv("ATTNKIT_BACKEND")
    assert choose(make_spec()) == "fake_any"
    monkeypatch.delenv("ATTNKIT_DISABLE")
    assert choose(make_spec()) == "fake_nv"


def test_debug_logging(fakes, monkeypatch, caplog):
    monkeypatch.setenv("ATTNKIT_DEBUG", "1")
    s = make_spec(compute_capability=(7, 5))
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
        choose(make_spec())
    assert "-> fake_any (by ATTNKIT_BACKEND)" in caplog.text
    assert "rejected fake_amd" in caplog.text


@pytest.mark.parametrize("value", ["maybe", "2", "debug"])
def test_debug_malformed(fakes, monkeypatch, value):
    monkeypatch.setenv("ATTNKIT_DEBUG", value)
    with pytest.raises(EnvironmentVariableError, match="ATTNKIT_DEBUG"):
        choose(make_spec())
