"""Shared pytest configuration for attnkit's CPU tests.

* Hypothesis profiles: ``ci`` (default; few examples, no deadline) and ``dev`` (more examples). Pick one with
  ``HYPOTHESIS_PROFILE=dev``. Sizes are bounded by the strategies themselves (see tests/helpers.py).
* ``_attnkit_env`` (autouse): snapshots every ``ATTNKIT_*`` variable and restores it after the test, and clears
  the dispatch decision cache before and after, because decisions are cached per spec while the environment is
  read at call time.

* TRITON_INTERPRET: a CPU run that includes tests/triton turns the interpreter on here, at configure time, before
  any test module is collected: triton reads the variable when ``triton.language`` is first imported, and some
  modules import it while being collected (transformers does), before tests/triton/conftest.py is loaded; kernels
  decorated after that would run under the interpreter with triton's own library functions compiled ("Cannot call
  @triton.jit'd outside of the scope of a kernel"). Runs without tests/triton leave it unset, as before.
"""

from __future__ import annotations

import os
import pathlib

import pytest
from fake_backends import install_fakes
from hypothesis import HealthCheck, settings

import attnkit.dispatch
from attnkit.registry import REGISTRY

_TRITON_TESTS = pathlib.Path(__file__).resolve().parent / "triton"


def _runs_triton_tests(config: pytest.Config) -> bool:
    for arg in config.args or [str(config.rootpath / "tests")]:
        path = pathlib.Path(arg.split("::")[0]).resolve()
        if path == _TRITON_TESTS or _TRITON_TESTS.is_relative_to(path) or path.is_relative_to(_TRITON_TESTS):
            return True
    return False


def pytest_configure(config: pytest.Config) -> None:
    markexpr = config.getoption("markexpr", "") or ""
    gpu_run = "gpu" in markexpr and "not gpu" not in markexpr
    if not gpu_run and _runs_triton_tests(config):
        os.environ["TRITON_INTERPRET"] = "1"


# CI draws the same examples on every run (derandomize), so a CI failure points at a change, not at a new draw.
# The random search is the "dev" profile (HYPOTHESIS_PROFILE=dev: random draws, more examples where a test does not
# fix its own count) and the GPU differential fuzzer (attnkit check --fuzz).
settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=200,
    deadline=None,
    derandomize=False,
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


@pytest.fixture
def fakes(monkeypatch, clean_env):
    """An isolated registry holding the real reference backend and three fakes (tests/fake_backends.py); yields
    the specs fake_nv was asked about.

    Whatever else is installed (Triton, CuPy, third-party entry points) is hidden, so the selection tests give the
    same answers on a laptop and on a GPU machine."""
    REGISTRY.names()  # discover first, so nothing is re-added to the isolated table
    isolated = {"reference": REGISTRY._entries["reference"]}
    monkeypatch.setattr(REGISTRY, "_entries", isolated)
    monkeypatch.setattr(REGISTRY, "_discovered", True)
    yield install_fakes()
    for name in list(isolated):
        if name != "reference":
            REGISTRY.unregister(name)
    attnkit.dispatch.clear_cache()
