"""The measured speed table (attnkit.speed): keys, ranking, building from benchmark rows, the environment
variable, and auto's use of it in dispatch."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_spec

from attnkit import Backend, BackendCapabilities, EnvironmentVariableError, dispatch, speed
from attnkit.dispatch import select_backend_name
from attnkit.registry import REGISTRY
from attnkit.spec import AttentionSpec

ROOT = Path(__file__).resolve().parents[1]


def spec(**kw) -> AttentionSpec:
    hopper = dict(compute_capability=(9, 0), dtype=torch.bfloat16, head_dim=128, head_dim_v=128, seqlen_q=4096,
                  seqlen_k=4096)  # fmt: skip
    return make_spec(**{**hopper, **kw})


def table(*entries) -> speed.SpeedTable:
    return speed.parse({"format": speed.TABLE_FORMAT, "entries": list(entries)})


def entry(order, arch="sm_90", head_dim=128, causal=False, pass_="fwd"):
    return {"arch": arch, "head_dim": head_dim, "causal": causal, "pass": pass_, "order": list(order)}


def test_key_of_a_call():
    assert speed.key_of(spec()) == speed.SpeedKey("sm_90", 128, False, "fwd")
    assert speed.key_of(spec(head_dim=80, head_dim_v=80)).head_dim == 128
    assert speed.key_of(spec(head_dim=64, head_dim_v=64)).head_dim == 64
    assert speed.key_of(spec(features=frozenset({"causal"}), requires_grad=True)) == speed.SpeedKey(
        "sm_90", 128, True, "train"
    )
    assert speed.key_of(spec(is_hip=True, compute_capability=(9, 4))).arch == "hip_94"
    # No entry applies: fp32, CPU, other operators, head dims beyond the classes.
    assert speed.key_of(spec(dtype=torch.float32)) is None
    assert speed.key_of(spec(device_type="cpu", compute_capability=None)) is None
    assert speed.key_of(spec(op="kvcache")) is None
    assert speed.key_of(spec(head_dim=512, head_dim_v=512)) is None


def test_rank_reorders_only_listed_backends():
    t = table(entry(["b", "a"]))
    # 'x' and 'y' are not in the table and keep their places; 'a' and 'b' swap slots.
    assert speed.rank(spec(), ["x", "a", "y", "b"], t) == ["x", "b", "y", "a"]
    # A listed backend that is not registered is ignored.
    assert speed.rank(spec(), ["a", "x"], table(entry(["gone", "a"]))) == ["a", "x"]
    # Another class, or no table: the priority order.
    assert speed.rank(spec(features=frozenset({"causal"})), ["a", "b"], t) == ["a", "b"]
    assert speed.rank(spec(), ["a", "b"], None) == ["a", "b"]


def test_rank_keeps_the_priority_below_the_measured_lengths():
    doc = {"format": speed.TABLE_FORMAT, "min_seqlen": 2048, "entries": [entry(["b", "a"])]}
    t = speed.parse(doc)
    assert t.min_seqlen == 2048
    assert speed.rank(spec(seqlen_q=2048, seqlen_k=2048, batch=8), ["a", "b"], t) == ["b", "a"]
    # Shorter queries or keys than the table measured: the host cost decides there, so the priority order holds.
    assert speed.rank(spec(seqlen_q=2047, seqlen_k=8192), ["a", "b"], t) == ["a", "b"]
    assert speed.rank(spec(seqlen_q=8192, seqlen_k=100), ["a", "b"], t) == ["a", "b"]
    # Long but little work (one head of one sequence): host cost decides, the priority order holds.
    assert speed.rank(spec(seqlen_q=4096, seqlen_k=4096, batch=1, num_heads_q=1, num_heads_k=1), ["a", "b"], t) == [
        "a", "b"]  # fmt: skip
    # A table without the field ranks from the default length on.
    assert table(entry(["b"])).min_seqlen == speed.MIN_SEQLEN


@pytest.mark.parametrize(
    "doc",
    [
        {"format": 99, "entries": []},
        {"format": 1, "min_seqlen": "long", "entries": []},
        {"format": 1, "entries": [{"arch": "sm_90"}]},
        {"format": 1, "entries": [entry(["a"], pass_="bwd")]},
        {"format": 1, "entries": [entry(["a"], head_dim=100)]},
        {"format": 1, "entries": [entry([])]},
    ],
)
def test_malformed_tables_are_refused(doc):
    with pytest.raises(ValueError, match="speed table"):
        speed.parse(doc)


def rows(backend, mode, tflops_by_seqlen, head_dim=128, causal=False, status="ok"):
    return [
        {
            "provider": f"attnkit:{backend}",
            "mode": mode,
            "head_dim": head_dim,
            "causal": causal,
            "seqlen_q": s,
            "status": status,
            "tflops": t,
        }
        for s, t in tflops_by_seqlen.items()
    ]


def test_build_ranks_by_measured_speed():
    data = (
        rows("fast_fwd", "fwd", {1024: 10.0, 2048: 500.0, 4096: 520.0})
        + rows("fast_fwd", "bwd", {2048: 200.0, 4096: 210.0})
        + rows("fast_bwd", "fwd", {1024: 900.0, 2048: 450.0, 4096: 460.0})
        + rows("fast_bwd", "bwd", {2048: 350.0, 4096: 360.0})
        + rows("broken", "fwd", {2048: 999.0}, status="WRONG")  # wrong answers never rank
        + [
            {
                "provider": "sdpa:cudnn",
                "mode": "fwd",
                "head_dim": 128,
                "causal": False,
                "seqlen_q": 4096,
                "status": "ok",
                "tflops": 2000.0,
            }
        ]
    )
    doc = speed.build(data, (9, 0), source="unit test")
    t = speed.parse(doc)
    # Forward alone: fast_fwd (the 1024 row is below MIN_SEQLEN and does not count).
    assert t.order[speed.SpeedKey("sm_90", 128, False, "fwd")] == ("fast_fwd", "fast_bwd")
    # A training step: 1/fwd + 2.5/bwd favours the faster backward.
    assert t.order[speed.SpeedKey("sm_90", 128, False, "train")] == ("fast_bwd", "fast_fwd")
    assert doc["source"] == "unit test"
    fwd_entry = next(e for e in doc["entries"] if e["pass"] == "fwd")
    assert fwd_entry["tflops"]["fast_fwd"]["fwd"] == pytest.approx((500.0 * 520.0) ** 0.5, abs=0.1)


def test_build_compares_on_common_lengths():
    # 'a' ran 16k too (where everything is faster); it must not win on a length 'b' never ran.
    data = rows("a", "fwd", {4096: 400.0, 16384: 900.0}) + rows("b", "fwd", {4096: 450.0})
    t = speed.parse(speed.build(data, (9, 0)))
    assert t.order[speed.SpeedKey("sm_90", 128, False, "fwd")] == ("b", "a")


def test_fp8_calls_have_their_own_pass():
    fp8_spec = spec(dtype=torch.float8_e4m3fn, features=frozenset({"fp8", "causal"}))
    assert speed.key_of(fp8_spec) == speed.SpeedKey("sm_90", 128, True, "fp8")
    data = rows("a", "fwd", {4096: 500.0}) + rows("b", "fwd", {4096: 400.0})
    data += (
        rows("a", "fp8", {4096: 500.0})
        + rows("b", "fp8", {4096: 700.0})
        + rows("c", "fp8", {4096: 900.0}, status="WRONG")
    )
    t = speed.parse(speed.build(data, (9, 0)))
    # The fp8 forwards rank apart from the 16-bit ones (and a wrong answer never ranks).
    assert t.order[speed.SpeedKey("sm_90", 128, False, "fp8")] == ("b", "a")
    assert t.order[speed.SpeedKey("sm_90", 128, False, "fwd")] == ("a", "b")
    assert speed.rank(dataclasses.replace(fp8_spec, features=frozenset({"fp8"})), ["a", "b"], t) == ["b", "a"]


def test_merge_replaces_entries_of_the_same_class_and_keeps_the_others():
    base = {"format": 1, "source": "grid", "entries": [entry(["a", "b"]), entry(["b", "a"], pass_="fp8")]}
    fresh = {
        "format": 1,
        "source": "fp8 run",
        "entries": [entry(["c", "b"], pass_="fp8"), entry(["c"], head_dim=64, pass_="fp8")],
    }
    merged = speed.merge(base, fresh)
    t = speed.parse(merged)
    assert t.order[speed.SpeedKey("sm_90", 128, False, "fwd")] == ("a", "b")
    assert t.order[speed.SpeedKey("sm_90", 128, False, "fp8")] == ("c", "b")
    assert t.order[speed.SpeedKey("sm_90", 64, False, "fp8")] == ("c",)
    assert merged["source"] == "grid; fp8 run" and len(merged["entries"]) == 3


def test_builtin_table_is_valid_and_names_builtin_backends():
    t = speed.load(speed.builtin_path())
    assert t.order, "the built-in table has entries"
    from attnkit.registry import BUILTIN_BACKENDS

    known = set(BUILTIN_BACKENDS)
    for names in t.order.values():
        assert set(names) <= known


def test_active_table_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("ATTNKIT_SPEED_TABLE", raising=False)
    assert speed.active_table(None).path == str(speed.builtin_path())
    for off in ("0", "off", " OFF "):
        assert speed.active_table(off) is None
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"format": 1, "entries": [entry(["a"])]}))
    assert speed.active_table(str(path)).order[speed.SpeedKey("sm_90", 128, False, "fwd")] == ("a",)
    with pytest.raises(EnvironmentVariableError, match=r"ATTNKIT_SPEED_TABLE.*no such file"):
        speed.active_table(str(tmp_path / "missing.json"))
    path.write_text("{not json")
    with pytest.raises(EnvironmentVariableError, match="ATTNKIT_SPEED_TABLE"):
        speed.active_table(str(path))


CAPS = BackendCapabilities(
    device_types=frozenset({"cuda"}),
    dtypes=frozenset({torch.float16, torch.bfloat16}),
    ops=frozenset({"attention", "varlen"}),
    features=frozenset({"causal"}),
)


def _fake(name, priority):
    return type(f"Fake_{name}", (Backend,), dict(name=name, priority=priority, capabilities=CAPS,
                                                  unavailable_reason=lambda self: None))  # fmt: skip


@pytest.fixture
def two_fakes(monkeypatch, clean_env):
    REGISTRY.names()
    monkeypatch.setattr(REGISTRY, "_entries", {"reference": REGISTRY._entries["reference"]})
    monkeypatch.setattr(REGISTRY, "_discovered", True)
    REGISTRY.register("slow_high", _fake("slow_high", 100))
    REGISTRY.register("fast_low", _fake("fast_low", 50))
    yield
    dispatch.clear_cache()


def test_auto_follows_the_table_and_explicit_requests_ignore_it(two_fakes, monkeypatch, tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"format": 1, "entries": [entry(["fast_low", "slow_high"])]}))
    assert select_backend_name(spec()) == "slow_high"  # the built-in table names neither: priority
    monkeypatch.setenv("ATTNKIT_SPEED_TABLE", str(path))
    assert select_backend_name(spec()) == "fast_low"
    assert select_backend_name(spec(features=frozenset({"causal"}))) == "slow_high"  # no entry for causal
    assert select_backend_name(spec(), backend="slow_high") == "slow_high"
    assert select_backend_name(spec(), backend=["slow_high", "fast_low"]) == "slow_high"
    token = dispatch.request_token("auto")
    dev = torch.device("cuda")
    args = (token, "attention", dev, torch.bfloat16, 128, 128, 8, 8, 2, 4096, 4096, 0, False)
    monkeypatch.setattr("attnkit.dispatch.device_capability", lambda d: (9, 0))
    assert dispatch.decide(*args) == "fast_low"
    monkeypatch.setenv("ATTNKIT_SPEED_TABLE", "off")  # the cached decision does not outlive the setting
    assert dispatch.decide(*args) == "slow_high"
    assert select_backend_name(spec()) == "slow_high"


def test_cli_builds_a_table_from_saved_runs(tmp_path):
    results = {
        "meta": {"gpu": "Fake GPU", "compute_capability": "9.0", "date_utc": "2026-12-02T00:00:00Z"},
        "results": rows("triton_cuda", "fwd", {4096: 300.0}) + rows("cupy_cuda", "fwd", {4096: 400.0}),
    }
    src = tmp_path / "results.json"
    src.write_text(json.dumps(results))
    out = tmp_path / "table.json"
    cmd = [sys.executable, "-m", "attnkit", "bench", "--speed-table-from", str(src), "--speed-table", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "sm_90 d128 non-causal fwd" in proc.stdout and "cupy_cuda > triton_cuda" in proc.stdout
    t = speed.load(out)
    assert t.order[speed.SpeedKey("sm_90", 128, False, "fwd")] == ("cupy_cuda", "triton_cuda")
    assert "Fake GPU" in t.source


def test_cli_takes_the_gpu_kind_from_the_runs(tmp_path):
    # A ROCm run ranked on a CUDA (or CPU) machine keys its entries hip_XY; runs of two kinds are refused.
    rocm = {
        "meta": {"compute_capability": "9.4", "torch_hip": "6.2"},
        "results": rows("triton_rocm", "fwd", {4096: 1.0}),
    }
    cuda = {
        "meta": {"compute_capability": "9.4", "torch_hip": None},
        "results": rows("triton_cuda", "fwd", {4096: 1.0}),
    }
    paths = []
    for name, doc in (("rocm", rocm), ("cuda", cuda)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(doc))
    out = tmp_path / "table.json"
    base = [sys.executable, "-m", "attnkit", "bench", "--speed-table", str(out)]
    proc = subprocess.run([*base, "--speed-table-from", str(paths[0])], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert speed.SpeedKey("hip_94", 128, False, "fwd") in speed.load(out).order
    both = [*base, "--speed-table-from", str(paths[0]), "--speed-table-from", str(paths[1])]
    proc = subprocess.run(both, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "several GPU kinds" in proc.stderr


def test_describe_states_where_the_table_applies():
    doc = {"format": speed.TABLE_FORMAT, "min_seqlen": 4096, "source": "a run", "entries": [entry(["b", "a"])]}
    lines = speed.describe(speed.parse(doc, "t.json"))
    assert lines[:2] == ["t.json", "source: a run"]
    assert lines[2] == "applies to calls with seqlen_q and seqlen_k >= 4096 and >= 1e+11 FLOPs"
    assert lines[3].startswith("sm_90 d128 non-causal fwd") and lines[3].endswith("b > a")
