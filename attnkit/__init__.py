"""attnkit: fast, exact, memory-efficient attention for PyTorch with pluggable backends.

>>> import torch, attnkit
>>> q = k = v = torch.randn(2, 128, 8, 64)
>>> out = attnkit.attention(q, k, v, causal=True)
"""

from __future__ import annotations

import importlib.util as _importlib_util
import os as _os

# backends/ installs as attnkit.backends through a package-dir mapping. A plain source checkout on sys.path, or an
# old-style "develop" install that only adds the repository root, lacks that mapping: fall back to the sibling
# folder so that the built-in backends still load.
if _importlib_util.find_spec(__name__ + ".backends") is None:
    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    if _os.path.isfile(_os.path.join(_root, "backends", "__init__.py")):
        __path__.append(_root)

from . import nn
from .dispatch import select_backend, use_backend
from .errors import (
    AttnkitError,
    BackendCompileError,
    BackendUnsupportedError,
    EnvironmentVariableError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
    KVCacheOverflowError,
    NoBackendError,
)
from .info import BackendStatus, list_backends
from .ops.attention import attention
from .ops.kvcache import attention_with_kvcache
from .ops.merge import merge_attention_states
from .ops.piecewise import piecewise_attention
from .ops.sdpa import sdpa
from .ops.varlen import attention_varlen
from .params import AttentionParams, KVCacheInfo, VarlenInfo
from .registry import Backend, BackendCapabilities, register_backend
from .spec import AttentionSpec

__version__ = "0.1.0"


from .registry import REGISTRY as _REGISTRY

_REGISTRY.load_builtins()

__all__ = [
    "AttentionParams",
    "AttentionSpec",
    "AttnkitError",
    "Backend",
    "BackendCapabilities",
    "BackendCompileError",
    "BackendStatus",
    "BackendUnsupportedError",
    "EnvironmentVariableError",
    "InvalidArgumentError",
    "InvalidArgumentTypeError",
    "KVCacheInfo",
    "KVCacheOverflowError",
    "NoBackendError",
    "VarlenInfo",
    "__version__",
    "attention",
    "attention_varlen",
    "attention_with_kvcache",
    "list_backends",
    "merge_attention_states",
    "nn",
    "piecewise_attention",
    "register_backend",
    "sdpa",
    "select_backend",
    "use_backend",
]
