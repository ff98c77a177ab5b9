"""Sessions: ``tests`` (CPU, the CI job), ``lint``, ``gpu`` and ``bench`` (device machine; not run by default).

The CPU sessions install PyTorch's CPU wheel first (``TORCH_SPEC``, default ``torch==2.13.0``) so that resolving
``attnkit``'s ``torch`` range never pulls a multi-GB CUDA build. The GPU sessions reuse the machine's own torch,
triton and cupy (``--system-site-packages``) and install attnkit without touching them.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")


@nox.session
def tests(session: nox.Session) -> None:
    """The CPU suite: reference, dispatch, Triton under the interpreter, CUDA sources compiled with nvcc."""
    session.install(TORCH_SPEC)
    session.install("-e", ".[test,triton,bench]")
    session.run("python", "-m", "attnkit", "info")
    session.run("pytest", "-n", os.environ.get("PYTEST_WORKERS", "2"), "--durations=15", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", "attnkit", "backends", "tests", "benchmarks", "noxfile.py")


@nox.session(venv_params=["--system-site-packages"])
def gpu(session: nox.Session) -> None:
    """GPU tests on a CUDA machine: ``nox -s gpu`` (uses the machine's torch/triton/cupy)."""
    session.install("--no-build-isolation", "--no-deps", "-e", ".")
    session.run("python", "-m", "attnkit", "check")
    session.run("pytest", "-m", "gpu", "-p", "no:cacheprovider", *session.posargs)


@nox.session(venv_params=["--system-site-packages"])
def bench(session: nox.Session) -> None:
    """Benchmarks on a CUDA machine: ``nox -s bench -- --out benchmarks/results/local``."""
    session.install("--no-build-isolation", "--no-deps", "-e", ".")
    session.run("python", "-m", "attnkit", "bench", *session.posargs)
