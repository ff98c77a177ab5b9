"""The Triton backends as registry members: capabilities, reasons, and life without triton or a GPU."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from attnkit.backends.triton import TritonCudaBackend, TritonRocmBackend, probes
from helpers import make_spec

import attnkit
from attnkit.registry import REGISTRY
from attnkit.spec import AttentionSpec


def _spec(**kw) -> AttentionSpec:
    small = dict(device_type="cpu", compute_capability=None, dtype=torch.bfloat16, num_heads_q=4, num_heads_k=2,
                 batch=1, seqlen_q=8, seqlen_k=8)  # fmt: skip
    return make_spec(**{**small, **kw})


def test_registered_names_and_priorities():
    cuda, rocm = REGISTRY.get("triton_cuda"), REGISTRY.get("triton_rocm")
    assert isinstance(cuda, TritonCudaBackend) and isinstance(rocm, TritonRocmBackend)
    assert (cuda.name, cuda.priority, rocm.name, rocm.priority) == ("triton_cuda", 30, "triton_rocm", 30)


def test_cpu_runs_only_under_interpreter(monkeypatch):
    be = REGISTRY.get("triton_cuda")
    assert be.why_not(_spec()) == []
    monkeypatch.delenv("TRITON_INTERPRET")
    reasons = be.why_not(_spec())
    assert reasons and ("TRITON_INTERPRET" in reasons[0])


def test_auto_never_picks_triton_on_cpu():
    spec = _spec()
    assert REGISTRY.get("triton_cuda").why_not_auto(spec)
    q = torch.randn(1, 8, 2, 16)
    _, _ = attnkit.attention(q, q, q, return_lse=True)  # auto on CPU: must not need the interpreter
    assert not REGISTRY.get("triton_cuda").why_not_auto(_spec(device_type="cuda", compute_capability=(9, 0)))


@pytest.mark.parametrize(
    "spec,needle",
    [
        (_spec(device_type="cuda", compute_capability=(7, 5)), "compute capability 7.5"),
        (_spec(dtype=torch.float64), "dtype float64"),
        (_spec(head_dim=512), "head_dim=512"),
        (_spec(device_type="cuda", compute_capability=(9, 0), is_hip=True), "amd devices"),
    ],
)
def test_capability_reasons(spec, needle):
    reasons = REGISTRY.get("triton_cuda").why_not(spec)
    assert any(needle in r for r in reasons), reasons


def test_rocm_rejects_nvidia_specs():
    reasons = REGISTRY.get("triton_rocm").why_not(_spec(device_type="cuda", compute_capability=(9, 0)))
    assert any("nvidia devices" in r for r in reasons)


def test_every_feature_declared_is_a_known_feature():
    from attnkit.spec import FEATURES, OPS

    for be in (TritonCudaBackend(), TritonRocmBackend()):
        assert be.capabilities.features <= set(FEATURES)
        assert be.capabilities.ops <= set(OPS)
        assert {"kvcache", "paged_kvcache"} <= be.capabilities.ops  # the split-KV decode kernel (kvcache_kernel.py)


def test_probe_summary_has_versions():
    info = REGISTRY.get("triton_cuda").info()
    assert info["triton"] == probes.triton_version()
    assert info["interpreter"] == "on"


def test_module_loads_and_explains_without_triton():
    """Simulate a machine without triton: importing the backend must work and name the install command."""
    code = textwrap.dedent(
        """
        import importlib.util, sys
        real = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "triton" else real(name, *a)
        sys.modules["triton"] = None
        from attnkit.backends.triton import TritonCudaBackend
        print(TritonCudaBackend().unavailable_reason())
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "triton is not installed: pip install 'attnkit[triton]'" in out


def test_module_import_does_not_import_triton():
    code = "import sys, attnkit.backends.triton as t; t.TritonCudaBackend().why_not; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_frontend_autograd_through_triton():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 21, 2, 16, generator=gen, dtype=torch.float32, requires_grad=True) for _ in range(3))
    out = attnkit.attention(q, k, v, causal=True, backend="triton_cuda")
    ref = attnkit.attention(q, k, v, causal=True, backend="reference")
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)
    g = torch.autograd.grad(out.sum(), (q, k, v))
    g_ref = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
