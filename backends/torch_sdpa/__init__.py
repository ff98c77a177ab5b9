"""The ``torch_sdpa`` backend: PyTorch's own fused attention kernels behind attnkit's interface."""

from .backend import TorchSdpaBackend

__all__ = ["TorchSdpaBackend"]
