"""Pure-PyTorch reference backend."""

from .backend import ReferenceBackend

__all__ = ["ReferenceBackend"]
