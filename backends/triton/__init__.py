"""Triton backends (``triton_cuda``, ``triton_rocm``): FlashAttention-2 forward and backward kernels.

Importing this package never imports triton; see :mod:`.probes` for what is detected and when.
"""

from .backend import TritonCudaBackend, TritonRocmBackend

__all__ = ["TritonCudaBackend", "TritonRocmBackend"]
