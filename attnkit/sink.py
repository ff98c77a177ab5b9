"""Learnable attention sinks (flash-attn 4's ``learnable_sink``, transformers' ``s_aux``).

A sink is one extra logit per query head that joins the softmax denominator and carries no value:

    p_ij = exp(s_ij) / (exp(sink_h) + sum_j' exp(s_ij'))        out_i = sum_j p_ij v_j
    lse_i = log(exp(sink_h) + sum_j exp(s_ij))

so rows that see no key still give ``out = 0`` (with ``lse = sink_h``). A backend that declares the ``sink``
feature receives the tensor as ``forward(..., learnable_sink=...)`` and folds it into its lse; its backward needs
nothing new, because the probabilities ``exp(s - lse)`` it recomputes already include the sink. The sink's own
gradient follows from the lse and ``delta = rowsum(dout * out)``:

    d(sink_h) = -sum over rows of exp(sink_h - lse_i) * delta_i
"""

from __future__ import annotations

import torch

from .errors import InvalidArgumentError, InvalidArgumentTypeError


def validate(learnable_sink: object, num_heads_q: int, device: torch.device) -> torch.Tensor | None:
    """The sink as given (float32 ``(nheads,)`` on q's device), or None."""
    if learnable_sink is None:
        return None
    if not isinstance(learnable_sink, torch.Tensor):
        raise InvalidArgumentTypeError(
            f"learnable_sink must be a torch.Tensor or None, got {type(learnable_sink).__name__}"
        )
    if learnable_sink.dtype != torch.float32:
        raise InvalidArgumentTypeError(
            f"learnable_sink.dtype is {str(learnable_sink.dtype).removeprefix('torch.')}; it must be float32 "
            "(cast it with .float(), the gradient flows back through the cast)"
        )
    if tuple(learnable_sink.shape) != (num_heads_q,):
        raise InvalidArgumentError(
            f"learnable_sink must have shape ({num_heads_q},) (one logit per query head), "
            f"got {tuple(learnable_sink.shape)}"
        )
    if learnable_sink.device != device:
        raise InvalidArgumentError(f"learnable_sink is on {learnable_sink.device} but q is on {device}")
    return learnable_sink


def grad(sink: torch.Tensor, dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, varlen: bool) -> torch.Tensor:
    """d(loss)/d(sink) for ``out``/``lse`` of a dense ``(B, S, H, D)``/``(B, H, S)`` or varlen ``(T, H, D)``/``(H, T)``
    call. Rows with ``lse = -inf`` (varlen padding, or a ``-inf`` sink on a row without keys) contribute nothing."""
    delta = (dout.to(torch.float32) * out.to(torch.float32)).sum(-1)  # (B, S, H) or (T, H)
    delta = delta.transpose(-1, -2)  # like lse: (B, H, S) or (H, T)
    lse = lse.to(torch.float32)
    head_axis = 0 if varlen else 1
    shape = [1] * lse.dim()
    shape[head_axis] = -1
    p_sink = torch.exp(sink.view(shape) - lse)
    p_sink = torch.where(torch.isneginf(lse), torch.zeros_like(p_sink), p_sink)
    dims = [d for d in range(lse.dim()) if d != head_axis]
    return -(p_sink * delta).sum(dim=dims)
