"""Input checks shared by every operator. Each error names the argument, the value seen and what is allowed."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from .errors import InvalidArgumentError, InvalidArgumentTypeError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor(name: str, x: object, ndim: int | Sequence[int]) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InvalidArgumentTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if x.dim() not in allowed:
        want = " or ".join(str(n) for n in allowed)
        raise InvalidArgumentError(f"{name} must have {want} dimensions, got shape {tuple(x.shape)}")
    return x


def same_dtype_device(named: dict[str, torch.Tensor]) -> tuple[torch.dtype, torch.device]:
    first_name, first = next(iter(named.items()))
    if first.dtype not in FLOAT_DTYPES:
        raise InvalidArgumentTypeError(
            f"{first_name}.dtype is {_dtype_name(first.dtype)}; allowed: float16, bfloat16, float32, float64"
        )
    if first.device.type == "meta":
        raise InvalidArgumentError(
            f"{first_name} is on the meta device, which holds no data; attnkit needs tensors on a real device "
            "(torch.compile and FakeTensorMode trace attnkit calls through its fake kernels without meta tensors)"
        )
    for name, x in named.items():
        if x.dtype != first.dtype:
            raise InvalidArgumentTypeError(
                f"{name}.dtype is {_dtype_name(x.dtype)} but {first_name}.dtype is {_dtype_name(first.dtype)}; "
                "q, k and v must share one dtype"
            )
        if x.device != first.device:
            raise InvalidArgumentError(
                f"{name} is on {x.device} but {first_name} is on {first.device}; all tensors must be on one device"
            )
    return first.dtype, first.device


def last_dim_contiguous(named: dict[str, torch.Tensor]) -> None:
    for name, x in named.items():
        if x.numel() and x.stride(-1) != 1:
            raise InvalidArgumentError(
                f"{name} must be contiguous in its last (head) dimension, got strides {tuple(x.stride())}"
            )


def heads_and_dims(q_shape, k_shape, v_shape, *, seq_axis: int | None) -> None:
    """Shared shape rules: head dims, kv length, head counts. ``seq_axis`` is None for varlen (no batch axis)."""
    hq, d = q_shape[-2], q_shape[-1]
    hk, dk = k_shape[-2], k_shape[-1]
    hv, dv = v_shape[-2], v_shape[-1]
    if dk != d:
        raise InvalidArgumentError(f"k head dim {dk} != q head dim {d} (shapes q {tuple(q_shape)}, k {tuple(k_shape)})")
    for label, dim in (("q head dim", d), ("v head dim", dv)):
        if not 1 <= dim <= MAX_HEAD_DIM:
            raise InvalidArgumentError(f"{label} is {dim}; allowed 1..{MAX_HEAD_DIM}")
    if hv != hk:
        raise InvalidArgumentError(f"v has {hv} heads but k has {hk}; k and v must have the same number of heads")
    if hk == 0 or hq % hk:
        raise InvalidArgumentError(
            f"q has {hq} heads, which is not a multiple of k/v's {hk} heads (MQA/GQA needs Hq % Hk == 0)"
        )
    if k_shape[:-2] != v_shape[:-2]:
        raise InvalidArgumentError(
            f"k and v must agree on batch and sequence length, got k {tuple(k_shape)} and v {tuple(v_shape)}"
        )
    if seq_axis is not None and q_shape[0] != k_shape[0]:
        raise InvalidArgumentError(f"batch sizes differ: q has {q_shape[0]}, k has {k_shape[0]}")


def window(window_size: object, causal: bool) -> tuple[int, int]:
    """Resolved (left, right); causal forces right = 0 (flash-attn semantics)."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise InvalidArgumentTypeError(f"window_size must be a pair (left, right), got {window_size!r}")
    left, right = window_size
    for label, val in (("window_size[0]", left), ("window_size[1]", right)):
        if isinstance(val, bool) or not isinstance(val, int) or val < -1:
            raise InvalidArgumentError(f"{label} is {val!r}; allowed: an int >= 0, or -1 for unbounded")
    return left, 0 if flag("causal", causal) else right


# No tensor dimension can reach this length, so a window this wide is unbounded whatever the sequence lengths.
UNREACHABLE_WINDOW = 2**62


def reachable_window(left: int, right: int, seqlen_q: int | None, seqlen_k: int | None) -> tuple[int, int]:
    """(left, right) with -1 for a bound that no (query, key) pair can reach.

    Distances ``d = i + Sk - Sq - j`` lie in ``[1 - Sq, Sk - 1]``, so ``left >= Sk`` or ``right >= Sq`` masks
    nothing; huge bounds (``2**31 - 1``, ``2**63``) would otherwise overflow the kernels' 32-bit arithmetic or the
    custom op's int64 schema. Without known lengths only bounds past any possible length are dropped. A causal
    ``right = 0`` is kept: backends rely on ``causal`` implying ``window_right == 0``.
    """
    left_limit = UNREACHABLE_WINDOW if seqlen_k is None else min(seqlen_k, UNREACHABLE_WINDOW)
    right_limit = UNREACHABLE_WINDOW if seqlen_q is None else min(seqlen_q, UNREACHABLE_WINDOW)
    if left >= max(left_limit, 1):
        left = -1
    if right >= max(right_limit, 1):
        right = -1
    return left, right


def flag(name: str, value: object) -> bool:
    """A real bool: ``'no'``, ``0`` or ``None`` would otherwise act by their truthiness."""
    if not isinstance(value, bool):
        raise InvalidArgumentTypeError(f"{name} must be a bool (True or False), got {value!r}")
    return value


# Kernels fold log2(e) into the scale and the softcap in float32: larger magnitudes would be inf there.
SCALE_LIMIT = 2.0**127


def _finite(value: float) -> bool:
    # Comparisons rather than math.isfinite, which Dynamo cannot trace under dynamic shapes (NaN fails both).
    return -math.inf < value < math.inf


def softmax_scale(value: object, head_dim: int) -> float:
    if value is None:
        return 1.0 / math.sqrt(head_dim)
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or abs(value) > SCALE_LIMIT  # first: huge ints overflow float conversions
        or not _finite(value)
    ):
        raise InvalidArgumentError(
            f"softmax_scale is {value!r}; allowed: a number with |softmax_scale| <= 2**127 (float32 range), "
            "or None (1/sqrt(head_dim))"
        )
    return float(value)


def softcap(value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 <= value <= SCALE_LIMIT  # first: huge ints overflow float conversions
        or not _finite(value)
    ):
        raise InvalidArgumentError(f"softcap is {value!r}; allowed: a number in [0, 2**127] (0 disables it)")
    return float(value)


def dropout_p(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise InvalidArgumentError(f"dropout_p is {value!r}; allowed: 0 <= dropout_p < 1")
    return float(value)


def alibi_slopes(slopes: object, batch: int, num_heads_q: int, device: torch.device) -> torch.Tensor | None:
    if slopes is None:
        return None
    if not isinstance(slopes, torch.Tensor):
        raise InvalidArgumentTypeError(f"alibi_slopes must be a torch.Tensor or None, got {type(slopes).__name__}")
    if tuple(slopes.shape) not in ((num_heads_q,), (batch, num_heads_q)):
        raise InvalidArgumentError(
            f"alibi_slopes has shape {tuple(slopes.shape)}; allowed: ({num_heads_q},) or ({batch}, {num_heads_q})"
        )
    if slopes.dtype != torch.float32:
        raise InvalidArgumentTypeError(f"alibi_slopes.dtype is {_dtype_name(slopes.dtype)}; allowed: float32")
    if slopes.device != device:
        raise InvalidArgumentError(f"alibi_slopes is on {slopes.device} but q is on {device}")
    return slopes.contiguous()


def cu_seqlens(
    name: str, cu: object, max_name: str, max_seqlen: object, total: int, device: torch.device
) -> list[int] | None:
    """Checks one cu_seqlens tensor against its max_seqlen and the packed length; returns it as a list.

    While torch.compile traces the call the offsets cannot be read back (a graph break, and a device sync per call):
    the same rules then run as device-side asserts in the graph and None is returned."""
    if not isinstance(cu, torch.Tensor):
        raise InvalidArgumentTypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.shape[0] < 2:
        raise InvalidArgumentError(
            f"{name} must be a 1-D int32 tensor of batch+1 offsets, got dtype {_dtype_name(cu.dtype)} "
            f"shape {tuple(cu.shape)}"
        )
    if cu.device != device:
        raise InvalidArgumentError(f"{name} is on {cu.device} but q is on {device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise InvalidArgumentError(f"{max_name} is {max_seqlen!r}; allowed: an int >= 0")
    if torch.compiler.is_compiling():
        _cu_seqlens_on_device(name, cu, max_name, max_seqlen, total)
        return None
    values = cu.tolist()
    lengths = [b - a for a, b in itertools.pairwise(values)]
    if values[0] != 0 or any(n < 0 for n in lengths):
        raise InvalidArgumentError(f"{name}={values} must start at 0 and never decrease")
    if values[-1] > total:
        raise InvalidArgumentError(f"{name} ends at {values[-1]} but the packed tensor has only {total} rows")
    if max(lengths) > max_seqlen:
        raise InvalidArgumentError(
            f"{max_name}={max_seqlen} is smaller than the longest sequence in {name} ({max(lengths)})"
        )
    return values


def _cu_seqlens_on_device(name: str, cu: torch.Tensor, max_name: str, max_seqlen: int, total: int) -> None:
    lengths = cu[1:] - cu[:-1]
    torch._assert_async(cu[0] == 0, f"{name} must start at 0")
    torch._assert_async((lengths >= 0).all(), f"{name} must never decrease")
    torch._assert_async(cu[-1] <= total, f"{name} ends past the packed tensor's rows")
    torch._assert_async(lengths.max() <= max_seqlen, f"{max_name} is smaller than the longest sequence in {name}")
