"""The Triton kernels compile for sm_90 (H100/H200) on a machine without a GPU.

The interpreter, which runs every other CPU test of these kernels, never compiles them: a kernel that triton's
front end or ptxas rejects for the GPU (a global that is not a ``tl.constexpr``, a device assert, an unsupported
layout) passes every interpreter test and fails on the first GPU call, as a kv-cache length-check kernel did on
the H200 (benchmarks/NOTES-triton.md, "Launches through the driver"). sm90_compile_child.py drives the real
launchers through a fake driver with every launch turned into a compile: forward and backward at head dims 64,
128, 36/24 and 256, a varlen forward, the kv-cache append, length check, split and combine kernels and the state
merge. For each it also checks that direct_launch would pack the kernel's parameters as the compiled PTX declares them
(count and sizes), the layout cuLaunchKernel reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

# (both append kernels, plain and checked, are one Python function: _append_kv)
EXPECTED = {"attn_fwd", "attn_bwd_preprocess", "attn_bwd_dkdv", "attn_bwd_dq", "_append_kv", "kvcache_split_fwd",
            "combine_splits", "merge_states_fwd", "check_range"}  # fmt: skip


def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = Path(__file__).with_name("sm90_compile_child.py")
    run = subprocess.run([sys.executable, str(child)], capture_output=True, text=True, env=env, timeout=900)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULTS ")]
    assert run.returncode == 0 and lines, run.stdout[-2000:] + run.stderr[-4000:]
    results = json.loads(lines[-1][len("RESULTS ") :])
    failed = [f"{name}: {status}" for name, status, _, _ in results if status != "ok"]
    assert not failed, "\n".join(failed)
    assert {name for name, _, _, _ in results} == EXPECTED
    assert all(size > 0 for _, _, size, _ in results)
    assert [name for name, _, _, packed in results if not packed] == []
