"""``attnkit bench --mode overhead`` on CPU: every case beside SDPA in one run, the files it writes, and the
kernel-free ``attnkit:frontend`` provider (which must leave no backend registered behind it)."""

from __future__ import annotations

import json

import pytest
import torch

import attnkit
from attnkit.bench import overhead
from attnkit.cli import main as cli_main
from attnkit.registry import REGISTRY


@pytest.fixture
def one_thread():
    # Tiny calls: intra-op threads only add contention on a shared CI machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cli_overhead_end_to_end(tmp_path, capsys, one_thread):
    out = tmp_path / "bench"
    rc = cli_main(["bench", "--mode", "overhead", "--overhead-seconds", "0.03", "--overhead-rounds", "3", "--out",
                   str(out), "--device", "cpu"])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| case | provider | wall us/call | host us/call | wall vs SDPA |" in printed
    doc = json.loads((out / "overhead.json").read_text())
    assert doc["meta"]["torch"] == torch.__version__ and doc["config"]["dtype"] == "float32"
    by_case: dict[str, dict[str, dict]] = {}
    for row in doc["rows"]:
        by_case.setdefault(row["case"], {})[row["provider"]] = row
    assert set(by_case) == {c.name for c in overhead.CASES}
    for case, rows in by_case.items():
        assert {"sdpa", "attnkit:reference", "attnkit:frontend"} <= set(rows), case
        for provider, row in rows.items():
            assert row["error"] is None, (case, provider, row["error"])
            assert (
                row["wall_us"] > 0
                and row["host_us"] > 0
                and row["rounds"] == 3
                and row["calls_per_round"] >= overhead.MIN_CALLS
            )
            assert row["vs_sdpa"] == row["wall_us"] / rows["sdpa"]["wall_us"]
    assert "| kvcache_tensor | sdpa |" in (out / "overhead.md").read_text()
    assert overhead._FRONTEND_BACKEND not in REGISTRY.names()


def test_frontend_provider_runs_attnkit_without_a_kernel():
    """The frontend backend returns the same preallocated buffers each call: the call still validates, dispatches
    and goes through the op and autograd, but computes nothing."""
    attnkit.register_backend(overhead._FRONTEND_BACKEND, overhead._FrontendOnly)
    try:
        q = torch.randn(1, 16, 2, 8, requires_grad=True)
        out1 = attnkit.attention(q, q, q, causal=True, backend=overhead._FRONTEND_BACKEND)
        out2 = attnkit.attention(q, q, q, causal=True, backend=overhead._FRONTEND_BACKEND)
        assert out1.shape == q.shape and out1.data_ptr() == out2.data_ptr()
        out1.sum().backward()
        assert q.grad.shape == q.shape
        k_cache = torch.zeros(1, 32, 1, 8)
        new = torch.ones(1, 1, 1, 8)
        with torch.no_grad():
            attnkit.attention_with_kvcache(q[:, :1].detach(), k_cache, k_cache.clone(), new, new, cache_seqlens=3,
                                           backend=overhead._FRONTEND_BACKEND)  # fmt: skip
        assert torch.equal(k_cache[0, 3], new[0, 0])  # the append itself is attnkit's, not the backend's
    finally:
        REGISTRY.unregister(overhead._FRONTEND_BACKEND)
