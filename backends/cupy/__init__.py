"""CuPy RawKernel CUDA backend (``cupy_cuda``): hand-written FlashAttention-2 style kernels built by NVRTC."""

from .backend import CupyCudaBackend

__all__ = ["CupyCudaBackend"]
