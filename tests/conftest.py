"""Shared pytest configuration for attnkit's CPU tests.

* Hypothesis profiles: ``ci`` (default; few examples, no deadline) and ``dev`` (more examples). Pick one with
  ``HYPOTHESIS_PROFILE=dev``. Sizes are bounded by the strategies themselves (see tests/helpers.py).
* ``_attnkit_env`` (autouse): snapshots every ``ATTNKIT_*`` variable and restores it after the test, and clears
  the dispatch decision cache before and after, because decisions are cached per spec while the environment is
  read at call time.

This file must not import triton or set TRITON_INTERPRET: the Triton tests do that in tests/triton/conftest.py.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

import attnkit.dispatch

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=200,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _attnkit_vars() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("ATTNKIT_")}


@pytest.fixture(autouse=True)
def _attnkit_env():
    """Restore ATTNKIT_* variables and clear the dispatch cache around every test."""
    saved = _attnkit_vars()
    attnkit.dispatch.clear_cache()
    try:
        yield
    finally:
        for name in list(_attnkit_vars()):
            if name not in saved:
                del os.environ[name]
        os.environ.update(saved)
        attnkit.dispatch.clear_cache()


@pytest.fixture
def clean_env(monkeypatch):
    """No ATTNKIT_* variable set for the duration of the test (restored by _attnkit_env)."""
    for name in list(_attnkit_vars()):
        monkeypatch.delenv(name)
    attnkit.dispatch.clear_cache()
    return monkeypatch
