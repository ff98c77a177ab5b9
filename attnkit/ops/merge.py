"""``attnkit.merge_attention_states``: combine attention results computed over disjoint key sets."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import validation
from ..dispatch import select_backend_name
from ..errors import InvalidArgumentError, InvalidArgumentTypeError
from ..spec import AttentionSpec, device_capability, is_hip
from . import _merge_library


def merge_attention_states(
    outs: Sequence[torch.Tensor] | torch.Tensor,
    lses: Sequence[torch.Tensor] | torch.Tensor,
    *,
    out_dtype: torch.dtype | None = None,
    backend: str | Sequence[str] = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial attention states into the attention over all their keys (FA3's ``flash_attn_combine``,
    FlashInfer's ``merge_state``), the building block of split-KV decoding, cascade (shared-prefix) attention and
    context parallelism.

    Part ``i`` is the ``(out, lse)`` of attention over one subset of the keys, as ``attention(...,
    return_lse=True)`` (and the other operators) return it. With ``lse = log(sum_i exp(lse_i))``, the merge is
    ``out = sum_i exp(lse_i - lse) * out_i``: exactly attention over the union of the subsets. Natural-log lse,
    float32 arithmetic (float64 for float64 parts). Parts with ``lse_i = -inf`` (no visible key) are left out,
    their ``out_i`` unread; a row where every part is empty gives ``out = 0``, ``lse = -inf``. Differentiable in
    the outs and lses.

    Args:
        outs: the partial outputs, all ``(batch, seqlen_q, nheads, headdim)`` (or ``(total_q, nheads, headdim)``
            for varlen), any float dtype; or one tensor with the parts stacked on a new leading axis (no copy; a
            list is stacked first).
        lses: their log-sum-exps, ``(batch, nheads, seqlen_q)`` (or ``(nheads, total_q)``), float; or stacked.
        out_dtype: dtype of the merged out; default that of the parts.
        backend: as in :func:`attnkit.attention` (Triton on GPUs, the reference elsewhere).

    Returns:
        ``(out, lse)``: out like one part (in ``out_dtype``), lse float32 (float64 for float64 parts).
    """
    out_parts = _stacked("outs", outs, (3, 4))
    lse_parts = _stacked("lses", lses, (2, 3))
    varlen = out_parts.dim() == 4
    if out_parts.dtype not in validation.FLOAT_DTYPES:
        raise InvalidArgumentTypeError(f"outs dtype is {out_parts.dtype}; allowed: float16, bfloat16, float32, float64")
    if lse_parts.dtype not in validation.FLOAT_DTYPES:
        raise InvalidArgumentTypeError(f"lses dtype is {lse_parts.dtype}; allowed: float32 or float64 (any float)")
    if lse_parts.device != out_parts.device:
        raise InvalidArgumentError(f"lses are on {lse_parts.device} but outs are on {out_parts.device}")
    if out_dtype is None:
        out_dtype = out_parts.dtype
    elif out_dtype not in validation.FLOAT_DTYPES:
        raise InvalidArgumentTypeError(
            f"out_dtype is {out_dtype!r}; allowed: None, float16, bfloat16, float32, float64"
        )
    parts = out_parts.shape[0]
    if parts == 0:
        raise InvalidArgumentError("outs has no parts; pass at least one (out, lse) pair")
    if varlen:  # (P, T, H, D), (P, H, T): one sequence of T rows
        out_parts, lse_parts = out_parts.unsqueeze(1), lse_parts.unsqueeze(1)
    _, batch, seqlen, heads, head_dim = out_parts.shape
    expected = (parts, batch, heads, seqlen)
    if tuple(lse_parts.shape) != expected:
        want = expected[2:] if varlen else expected[1:]
        got = tuple(lse_parts.shape[2:] if varlen else lse_parts.shape[1:])
        raise InvalidArgumentError(
            f"lses must have {parts} parts of shape {want} (nheads, {'total_q' if varlen else 'batch, seqlen_q'} "
            f"of outs {tuple(out_parts.shape[1:])}), got {lse_parts.shape[0]} of shape {got}"
        )
    spec = AttentionSpec(
        op="merge",
        device_type=out_parts.device.type,
        compute_capability=device_capability(out_parts.device),
        is_hip=is_hip() and out_parts.device.type == "cuda",
        dtype=out_parts.dtype,
        head_dim=head_dim,
        head_dim_v=head_dim,
        num_heads_q=heads,
        num_heads_k=heads,
        batch=batch,
        seqlen_q=seqlen,
        seqlen_k=parts,
    )
    chosen = select_backend_name(spec, backend)
    out, lse = _merge_library.merge_states(out_parts, lse_parts, out_dtype, chosen)
    return (out[0], lse[0]) if varlen else (out, lse)


def _stacked(name: str, x: object, part_ndims: tuple[int, ...]) -> torch.Tensor:
    """The parts as one tensor with a leading parts axis (a sequence is stacked; a tensor is taken as stacked)."""
    if isinstance(x, torch.Tensor):
        return validation.tensor(name, x, tuple(n + 1 for n in part_ndims))
    if not isinstance(x, (list, tuple)) or not x:
        raise InvalidArgumentTypeError(
            f"{name} must be a non-empty list of tensors or one stacked tensor, got {type(x).__name__}"
            + (" of length 0" if isinstance(x, (list, tuple)) else "")
        )
    first = validation.tensor(f"{name}[0]", x[0], part_ndims)
    for i, part in enumerate(x):
        part = validation.tensor(f"{name}[{i}]", part, part_ndims)
        if part.shape != first.shape or part.dtype != first.dtype or part.device != first.device:
            raise InvalidArgumentError(
                f"{name}[{i}] is {part.dtype} {tuple(part.shape)} on {part.device} but {name}[0] is {first.dtype} "
                f"{tuple(first.shape)} on {first.device}; all parts must agree"
            )
    return torch.stack(list(x))
