"""flash-attn 2.8's Python API on attnkit: ``from attnkit.compat import flash_attn`` where code says ``flash_attn``.

The functions keep flash-attn's names, parameter lists (explicit named parameters, in flash-attn's order, so code
that inspects them, like transformers, sees the same thing), layouts and return conventions, and run on whatever
backend attnkit's dispatch picks (any device PyTorch runs on). ``bert_padding`` and ``layers.rotary`` mirror the
helper modules of the same names.
"""

from .flash_attn_interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]
