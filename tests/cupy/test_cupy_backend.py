"""CPU tests of backends/cupy/backend.py: availability, capabilities and reasons, the choice of kernel per arch,
head dim and switch, and the guard of direct calls."""

from __future__ import annotations

import pytest
import torch
from attnkit.backends.cupy import backend as cb
from attnkit.backends.cupy import config
from helpers import make_spec

import attnkit
from attnkit.params import AttentionParams
from attnkit.spec import AttentionSpec


def _spec(**kw) -> AttentionSpec:
    hopper = dict(compute_capability=(9, 0), dtype=torch.bfloat16, head_dim=128, head_dim_v=128)
    return make_spec(**{**hopper, **kw})


# ---- availability and capabilities ---------------------------------------------------------------------------
def test_unavailable_without_cupy(monkeypatch):
    real = cb.importlib.util.find_spec
    monkeypatch.setattr(cb.importlib.util, "find_spec", lambda name, *a: None if name == "cupy" else real(name, *a))
    cb._cupy_problem.cache_clear()
    try:
        reason = cb.CupyCudaBackend().unavailable_reason()
        assert reason == cb.CUPY_MISSING
        assert "pip install 'attnkit[cupy]'" in reason and "cupy-cuda12x" in reason and "cupy-cuda13x" in reason
        assert cb.CupyCudaBackend().why_not(_spec()) == [reason]
        assert cb.CupyCudaBackend().info() == {"status": reason}
    finally:
        cb._cupy_problem.cache_clear()


def test_registered_and_skipped_by_auto_on_cpu():
    from attnkit.registry import REGISTRY

    backend = REGISTRY.get("cupy_cuda")
    assert isinstance(backend, cb.CupyCudaBackend)
    assert backend.name == "cupy_cuda" and backend.priority == 20
    if not torch.cuda.is_available():
        assert backend.unavailable_reason()
        q = torch.randn(1, 4, 2, 8)
        out = attnkit.attention(q, q, q)  # auto must not pick cupy_cuda without a GPU
        assert out.shape == q.shape


@pytest.fixture
def available(monkeypatch):
    """Pretend CuPy and a GPU are present so why_not reaches the capability table."""
    monkeypatch.setattr(cb.CupyCudaBackend, "unavailable_reason", lambda self: None)
    monkeypatch.setattr(cb.torch.cuda, "is_available", lambda: False)  # skip the live shared-memory query
    return cb.CupyCudaBackend()


def test_capabilities_accept_supported_calls(available):
    for feats in ({"causal"}, {"window"}, {"alibi", "softcap", "gqa"}, set()):
        for dtype in (torch.float16, torch.bfloat16):
            for d in (32, 40, 64, 96, 128, 200, 256):
                spec = _spec(dtype=dtype, head_dim=d, head_dim_v=d, features=frozenset(feats), requires_grad=True)
                assert available.why_not(spec) == [], spec.describe()
    assert available.why_not(_spec(op="varlen", requires_grad=True)) == []


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"features": frozenset({"dropout"})}, "dropout"),
        ({"features": frozenset({"deterministic"})}, "deterministic"),
        ({"head_dim_v": 64}, "head_dim_v"),
        ({"dtype": torch.float32}, "dtype float32"),
        ({"compute_capability": (7, 5)}, "compute capability 7.5"),
        ({"is_hip": True}, "amd"),
        ({"device_type": "cpu", "compute_capability": None}, "device type 'cpu'"),
        ({"head_dim": 512, "head_dim_v": 512}, "head_dim=512"),
        ({"op": "kvcache"}, "kvcache"),
        ({"op": "piecewise"}, "piecewise"),
    ],
)
def test_capabilities_reject_with_reason(available, change, needle):
    reasons = available.why_not(_spec(**change))
    assert reasons and any(needle in r for r in reasons), reasons


def test_shared_memory_limit_is_a_reason(monkeypatch, available):
    monkeypatch.setattr(cb.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cb.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(cb, "max_smem_optin", lambda dev: 48 * 1024)
    reasons = available.why_not(_spec(head_dim=256, head_dim_v=256, requires_grad=True))
    assert any("shared memory" in r and "49152" in r for r in reasons), reasons
    assert available.why_not(_spec(head_dim=32, head_dim_v=32, requires_grad=True)) == []
    monkeypatch.setattr(cb, "max_smem_optin", lambda dev: 99 * 1024)  # consumer Ampere/Ada
    assert available.why_not(_spec(head_dim=256, head_dim_v=256, requires_grad=True)) == []
    assert config.bwd_config(128, torch.float16, 99 * 1024).block_m == 32  # smaller tiles on 99 KB devices


@pytest.mark.parametrize(
    "head_dim, arch, env_value, smem, expected",
    [
        (128, "sm_90", None, 227 * 1024, "fwd_sm90.cu"),
        (64, "sm_90", "1", 227 * 1024, "fwd_sm90.cu"),
        (40, "sm_90", None, 227 * 1024, "fwd_sm90.cu"),  # padded to the 64 kernel
        (96, "sm_90", None, 227 * 1024, "fwd.cu"),  # no wgmma kernel for 96
        (256, "sm_90", None, 227 * 1024, "fwd.cu"),
        (32, "sm_90", None, 227 * 1024, "fwd.cu"),
        (128, "sm_90", "0", 227 * 1024, "fwd.cu"),  # ATTNKIT_CUPY_WGMMA=0
        (128, "sm_80", None, 163 * 1024, "fwd.cu"),
        (128, "sm_89", None, 99 * 1024, "fwd.cu"),
        (128, "compute_90", None, 227 * 1024, "fwd.cu"),  # PTX fallback: no sm_90a machine code
        (128, "sm_90", None, 99 * 1024, "fwd_sm90.cu"),  # the smaller wgmma tile (1, 64) fits
        (128, "sm_90", None, 60 * 1024, "fwd.cu"),  # no wgmma tile fits
    ],
)
def test_forward_kernel_choice(monkeypatch, head_dim, arch, env_value, smem, expected):
    if env_value is None:
        monkeypatch.delenv("ATTNKIT_CUPY_WGMMA", raising=False)
    else:
        monkeypatch.setenv("ATTNKIT_CUPY_WGMMA", env_value)
    source, name, cfg = cb.forward_kernel(head_dim, torch.float16, arch, smem)
    assert source == expected and cfg.smem_bytes <= smem
    assert name == ("attnkit_fwd_sm90" if expected == "fwd_sm90.cu" else "attnkit_fwd")


def test_bad_wgmma_switch_is_rejected(monkeypatch):
    from attnkit.errors import EnvironmentVariableError

    monkeypatch.setenv("ATTNKIT_CUPY_WGMMA", "maybe")
    with pytest.raises(EnvironmentVariableError, match="ATTNKIT_CUPY_WGMMA='maybe'"):
        cb.forward_kernel(128, torch.float16, "sm_90", 227 * 1024)


@pytest.mark.parametrize(
    "head_dim, arch, env_value, expected",
    [
        (128, "sm_90", None, "bwd_sm90.cu"),
        (64, "sm_90", None, "bwd_sm90.cu"),
        (48, "sm_90", None, "bwd_sm90.cu"),
        (96, "sm_90", None, "bwd.cu"),
        (256, "sm_90", None, "bwd.cu"),
        (128, "sm_90", "0", "bwd.cu"),
        (128, "sm_80", None, "bwd.cu"),
    ],
)
def test_backward_kernel_choice(monkeypatch, head_dim, arch, env_value, expected):
    if env_value is None:
        monkeypatch.delenv("ATTNKIT_CUPY_WGMMA", raising=False)
    else:
        monkeypatch.setenv("ATTNKIT_CUPY_WGMMA", env_value)
    source, name, cfg = cb.backward_kernel(head_dim, torch.bfloat16, arch, 227 * 1024)
    assert source == expected and cfg.smem_bytes <= 227 * 1024
    assert name == ("attnkit_bwd_sm90" if expected == "bwd_sm90.cu" else "attnkit_bwd")
    assert cb.backward_kernel(head_dim, torch.bfloat16, arch, 40 * 1024)[0] == "bwd.cu"  # does not fit: fallback


def test_rejects_what_it_does_not_implement():
    q = torch.randn(1, 4, 2, 16, dtype=torch.float16)
    with pytest.raises(attnkit.BackendUnsupportedError, match="dropout"):
        cb.CupyCudaBackend().forward(q, q, q, None, AttentionParams(softmax_scale=1.0, dropout_p=0.1), None)
    with pytest.raises(attnkit.BackendUnsupportedError, match="head dim"):
        cb.CupyCudaBackend().forward(q, q, q[..., :8], None, AttentionParams(softmax_scale=1.0), None)
