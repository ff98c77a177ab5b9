"""attnkit.distributed on 2 (and 4) GPUs with NCCL, bf16, head dim 128, against one-GPU attention and the float64
reference (flash-attn's tolerance rule). Run on the device machine: ``pytest -m gpu tests/test_distributed_gpu.py``.
"""

from __future__ import annotations

import distributed_worker as worker
import pytest
import torch
import torch.distributed as dist
from test_distributed import run_and_judge

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (dist.is_available() and dist.is_nccl_available()), reason="needs NCCL"),
]


@pytest.mark.parametrize("world", [2, 4])
def test_nccl_ranks_match_single_gpu(world, tmp_path):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA GPUs, found {torch.cuda.device_count()}")
    run_and_judge(world, tmp_path, "cuda", worker.gpu_cases(world))
