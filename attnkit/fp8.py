"""FP8 inputs (``torch.float8_e4m3fn``) with descales, FlashAttention-3's convention.

A float8 tensor ``x`` with descale ``d`` stands for the real values ``x.float() * d[b, hk]``: ``d`` is float32 of
shape ``(batch, nheads_k)``, one factor per batch row and KV head. ``q_descale`` is per KV head too: it applies to
every query head of that KV head's group (query head ``h`` uses ``q_descale[b, h // (nheads // nheads_k)]``).
A descale left as None is 1. Such calls are forward only and return ``out_dtype`` (default bfloat16); lse stays
float32. q, k and v (and the caches and new keys/values of ``attention_with_kvcache``) are either all
float8_e4m3fn or none of them.

This module holds the input checks the operators call for such calls, the record a backend receives
(:class:`Fp8Scales`) and :func:`quantize` / :func:`dequantize` for building inputs and references.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from . import validation
from .errors import InvalidArgumentError, InvalidArgumentTypeError

FP8_DTYPE = torch.float8_e4m3fn
FEATURE = "fp8"  # the AttentionSpec feature of fp8 calls; a backend declares it with FP8_DTYPE in its dtypes
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DEFAULT_OUT_DTYPE = torch.bfloat16
DESCALE_NAMES = ("q_descale", "k_descale", "v_descale")

# Every float8 format torch knows, so the others get an error that names the one that works.
_FLOAT8 = frozenset(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")
    if hasattr(torch, name)
)


@dataclass(frozen=True)
class Fp8Scales:
    """What a backend receives with float8 inputs: descales as contiguous float32 ``(batch, nheads_k)`` tensors
    on the inputs' device (ones where the caller gave none) and the output dtype."""

    q_descale: torch.Tensor
    k_descale: torch.Tensor
    v_descale: torch.Tensor
    out_dtype: torch.dtype


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def same_dtype_device(named: Mapping[str, torch.Tensor]) -> bool:
    """:func:`attnkit.validation.same_dtype_device` for calls that may be fp8: True when every tensor is
    float8_e4m3fn (and all share a real device), False when the usual check passes; raises otherwise, naming
    float8_e4m3fn where a float8 tensor is involved."""
    first_name, first = next(iter(named.items()))
    if first.dtype != FP8_DTYPE:
        # Every call that is not fp8 pays only for this branch: the usual check, then nothing.
        try:
            validation.same_dtype_device(named)
            return False
        except InvalidArgumentTypeError:
            if not any(x.dtype in _FLOAT8 for x in named.values()):
                raise
    fp8 = [name for name, x in named.items() if x.dtype in _FLOAT8]
    for name in fp8:
        if named[name].dtype != FP8_DTYPE:
            raise InvalidArgumentTypeError(
                f"{name}.dtype is {_name(named[name].dtype)}; the only float8 format attnkit takes is float8_e4m3fn "
                "(FlashAttention-3's), with q_descale/k_descale/v_descale"
            )
    others = [name for name in named if name not in fp8]
    if others:
        other = others[0]
        raise InvalidArgumentTypeError(
            f"{fp8[0]} is float8_e4m3fn but {other} is {_name(named[other].dtype)}; fp8 attention needs "
            f"{', '.join(named)} all in float8_e4m3fn (quantize {other} too), or none of them"
        )
    if first.device.type == "meta":
        raise InvalidArgumentError(
            f"{first_name} is on the meta device, which holds no data; attnkit needs tensors on a real device"
        )
    for name, x in named.items():
        if x.device != first.device:
            raise InvalidArgumentError(
                f"{name} is on {x.device} but {first_name} is on {first.device}; all tensors must be on one device"
            )
    return True


def scales(
    is_fp8: bool,
    named: Mapping[str, torch.Tensor],
    *,
    q_descale: object,
    k_descale: object,
    v_descale: object,
    out_dtype: object,
    batch: int,
    num_heads_k: int,
    requires_grad: bool,
) -> Fp8Scales | None:
    """Checks the fp8 arguments of one call; :class:`Fp8Scales` for fp8 inputs, None for the others (which must
    then pass no descales, and no ``out_dtype`` other than their own dtype)."""
    if not is_fp8 and q_descale is None and k_descale is None and v_descale is None and out_dtype is None:
        return None  # the common case, first
    first = next(iter(named.values()))
    given = dict(zip(DESCALE_NAMES, (q_descale, k_descale, v_descale)))
    if not is_fp8:
        for name, value in given.items():
            if value is not None:
                raise InvalidArgumentError(
                    f"{name} is given but the inputs are {_name(first.dtype)}; descales apply to float8_e4m3fn "
                    "inputs only"
                )
        if out_dtype is not None and out_dtype != first.dtype:
            raise InvalidArgumentError(
                f"out_dtype={out_dtype!r} applies to float8_e4m3fn inputs only; {_name(first.dtype)} inputs give "
                f"{_name(first.dtype)} outputs"
            )
        return None
    if requires_grad:
        needs = [name for name, x in named.items() if x.requires_grad]
        raise InvalidArgumentError(
            f"fp8 attention is forward only (no backward, like FlashAttention-3's), but {', '.join(needs)} "
            "require grad; call it under torch.no_grad() or pass detached tensors"
        )
    if out_dtype is None:
        out_dtype = DEFAULT_OUT_DTYPE
    if not isinstance(out_dtype, torch.dtype) or out_dtype not in OUT_DTYPES:
        raise InvalidArgumentTypeError(
            f"out_dtype is {out_dtype!r}; allowed for float8 inputs: {', '.join(_name(d) for d in OUT_DTYPES)} "
            "(default bfloat16)"
        )
    shape = (batch, num_heads_k)
    checked = [_descale(name, value, shape, first.device) for name, value in given.items()]
    return Fp8Scales(*checked, out_dtype=out_dtype)


def _descale(name: str, value: object, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    if value is None:
        return torch.ones(shape, dtype=torch.float32, device=device)
    if not isinstance(value, torch.Tensor):
        raise InvalidArgumentTypeError(f"{name} must be a torch.Tensor or None, got {type(value).__name__}")
    if value.dtype != torch.float32:
        raise InvalidArgumentTypeError(f"{name}.dtype is {_name(value.dtype)}; allowed: float32")
    if tuple(value.shape) != shape:
        raise InvalidArgumentError(
            f"{name} has shape {tuple(value.shape)}; allowed: (batch, nheads_k) = {shape}, one factor per batch row "
            "and KV head"
        )
    if value.device != device:
        raise InvalidArgumentError(f"{name} is on {value.device} but q is on {device}")
    if value.requires_grad and torch.is_grad_enabled():
        raise InvalidArgumentError(f"{name} requires grad; fp8 attention is forward only")
    return value.detach().contiguous()


def features(found: Fp8Scales | None) -> frozenset[str]:
    """The extra AttentionSpec features of a call: ``{"fp8"}`` for fp8 calls."""
    return frozenset({FEATURE}) if found is not None else frozenset()


def no_rotary(is_fp8: bool, rotary: bool) -> None:
    """Rotary embedding of float8 keys would round the rotated values to e4m3 again (and can leave its range)."""
    if is_fp8 and rotary:
        raise InvalidArgumentError(
            "rotary_cos/rotary_sin cannot be used with float8_e4m3fn inputs: rotate q and k before quantizing them"
        )


def no_sink(is_fp8: bool, sink: bool) -> None:
    """The fp8 kernels have no sink term (attnkit.sink) in their softmax denominator."""
    if is_fp8 and sink:
        raise InvalidArgumentError(
            "learnable_sink cannot be used with float8_e4m3fn inputs (the fp8 path has no sink term); pass "
            "bfloat16/float16 inputs for attention with a sink"
        )


def quantize(x: torch.Tensor, num_heads_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_fp8, descale)`` for a ``(batch, seqlen, nheads, headdim)`` tensor, one descale per batch row and KV
    head: ``descale = amax / 448`` over that slice (all query heads of a group for q: pass ``num_heads_k``), so
    ``x_fp8.float() * descale`` (broadcast per KV head) approximates ``x``. A slice of zeros gets descale 1."""
    _batch, _seqlen, heads, _dim = x.shape
    groups = heads if num_heads_k is None else num_heads_k
    if heads % groups:
        raise InvalidArgumentError(f"x has {heads} heads, not a multiple of num_heads_k={groups}")
    xs = x.detach().float().unflatten(2, (groups, heads // groups))  # (B, S, Hk, G, D)
    amax = xs.abs().amax(dim=(1, 3, 4))
    descale = torch.where(amax > 0, amax / torch.finfo(FP8_DTYPE).max, torch.ones_like(amax))
    scaled = xs / descale[:, None, :, None, None]
    return scaled.flatten(2, 3).to(FP8_DTYPE), descale.contiguous()


def dequantize(x: torch.Tensor, descale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x.to(dtype) * descale`` for ``x`` shaped ``(batch, seqlen, nheads, headdim)`` (or ``(seqlen, nheads,
    headdim)`` for one batch row, with ``descale`` of shape ``(nheads_k,)``), descale per KV head."""
    heads = x.shape[-2]
    groups = descale.shape[-1]
    per_head = descale.to(dtype).repeat_interleave(heads // groups, dim=-1)  # (..., nheads)
    if x.dim() == 4:
        return x.to(dtype) * per_head[:, None, :, None]
    return x.to(dtype) * per_head[None, :, None]
