"""A small cupy_cuda forward + backward for compute-sanitizer (memcheck) to watch; launched by test_cupy_gpu.py.

Shapes are odd on purpose (partial tiles in both directions, a padded head dim, GQA, varlen with an empty
sequence) so out-of-bounds reads or writes at tile edges would be caught.
"""

from __future__ import annotations

import torch

import attnkit


def main() -> None:
    torch.manual_seed(0)
    dev = "cuda"
    for d, dtype in ((40, torch.bfloat16), (128, torch.float16), (256, torch.bfloat16)):
        q = torch.randn(1, 37, 4, d, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(1, 53, 2, d, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn(1, 53, 2, d, device=dev, dtype=dtype, requires_grad=True)
        out = attnkit.attention(q, k, v, causal=True, softcap=2.0, backend="cupy_cuda")
        out.backward(torch.randn_like(out))
    cu_q = torch.tensor([0, 5, 5, 40], dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0, 17, 20, 71], dtype=torch.int32, device=dev)
    q = torch.randn(40, 4, 64, device=dev, dtype=torch.float16, requires_grad=True)
    k = torch.randn(71, 4, 64, device=dev, dtype=torch.float16, requires_grad=True)
    v = torch.randn(71, 4, 64, device=dev, dtype=torch.float16, requires_grad=True)
    out = attnkit.attention_varlen(q, k, v, cu_q, cu_k, 35, 51, window_size=(9, 3), backend="cupy_cuda")
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    print("sanitizer case ok")


if __name__ == "__main__":
    main()
