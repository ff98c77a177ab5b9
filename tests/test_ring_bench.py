"""benchmarks/ring_bench.py runs as is: its own command line, on CPU with gloo and tiny sizes (spawned ranks and a
torchrun launch), and writes the results it promises."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "ring_bench.py"
TINY = ["--device", "cpu", "--seqlens", "32", "--heads", "2", "--kv-heads", "1", "--head-dim", "16",
        "--dtype", "float32", "--repeats", "1", "--warmup", "0", "--causal", "true"]  # fmt: skip

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _check(out: Path, modes: list[str]) -> None:
    data = json.loads((out / "results.json").read_text())
    rows = data["rows"]
    assert data["meta"]["world"] == 2 and data["meta"]["backend"] == "gloo"
    assert [(r["mode"], r["strategy"]) for r in rows] == [(m, s) for m in modes for s in ("ring", "allgather")]
    for r in rows:
        assert r["max_abs_err"] < 1e-5  # the distributed output matches the one-device output
        for key in ("single_s", "cp_s", "comm_s", "speedup", "efficiency", "tflops_per_gpu"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        if r["strategy"] == "ring":
            assert r["compute_s"] > 0 and 0.0 <= r["hidden_comm"] <= 1.0
    assert "| tokens |" in (out / "results.md").read_text()


def test_ring_bench_spawns_gloo_ranks(tmp_path):
    cmd = [sys.executable, str(SCRIPT), *TINY, "--nprocs", "2", "--modes", "fwd,fwdbwd", "--out", str(tmp_path)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "hidden comm" in done.stdout
    _check(tmp_path, ["fwd", "fwdbwd"])


def test_ring_bench_under_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT),
           *TINY, "--modes", "fwdbwd", "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    _check(tmp_path, ["fwdbwd"])
