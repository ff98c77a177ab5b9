"""The differential fuzzer on the Triton backends under the interpreter (the GPU run is
``attnkit check --fuzz SECONDS`` in benchmarks/gpu_validate.sh)."""

from __future__ import annotations

import pytest
import torch

from attnkit import fuzz

LIMITS = fuzz.Limits(max_seqlen=40, max_batch=2, max_heads_q=4, max_scores=2**12, max_head_dim=48)


@pytest.mark.parametrize("name", ["triton_cuda", "triton_rocm"])
def test_triton_backends_pass(name):
    summary = fuzz.fuzz(600, device=torch.device("cpu"), backends=[name], first_seed=101, max_cases=20, limits=LIMITS)
    assert summary.cases == 20 and not summary.failures, summary.format()
    assert sum(s["pass"] for s in summary.counts.values()) == 20  # every case ran (none declined)
