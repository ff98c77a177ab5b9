"""Pieces shared by the public operators: spec construction, option resolution, empty inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import dropout as dropout_rng
from .. import validation
from ..dispatch import select_backend_name
from ..params import AttentionParams, lse_dtype
from ..spec import AttentionSpec, device_capability, is_hip


def resolve_params(
    *,
    head_dim: int,
    causal: bool,
    softmax_scale: float | None,
    window_size: Sequence[int],
    softcap: float,
    dropout_p: float,
    deterministic: bool,
) -> AttentionParams:
    left, right = validation.window(window_size, causal)
    p = validation.dropout_p(dropout_p)
    if not isinstance(deterministic, bool):
        raise validation.InvalidArgumentTypeError(f"deterministic must be a bool, got {deterministic!r}")
    return AttentionParams(
        softmax_scale=validation.softmax_scale(softmax_scale, head_dim),
        causal=causal,
        window_left=left,
        window_right=right,
        softcap=validation.softcap(softcap),
        dropout_p=p,
        dropout_seed=dropout_rng.draw_seed() if p > 0 else 0,
        deterministic=deterministic,
    )


def features(
    params: AttentionParams, *, alibi: bool, gqa: bool, dv_ne_d: bool, requires_grad: bool, sink: bool = False
) -> frozenset[str]:
    found = set()
    if params.causal:
        found.add("causal")
    if params.has_window:
        found.add("window")
    if alibi:
        found.add("alibi")
    if params.softcap > 0:
        found.add("softcap")
    if params.dropout_p > 0:
        found.add("dropout")
    if gqa:
        found.add("gqa")
    if dv_ne_d:
        found.add("dv_ne_d")
    if params.deterministic and requires_grad:
        found.add("deterministic")
    if sink:
        found.add("sink")
    return frozenset(found)


def choose(
    op: str,
    backend: str | Sequence[str],
    *,
    q: torch.Tensor,
    head_dim_v: int,
    num_heads_k: int,
    batch: int,
    seqlen_q: int,
    seqlen_k: int,
    params: AttentionParams,
    alibi: bool,
    requires_grad: bool,
    sink: bool = False,
    merged_backward: bool = False,
    extra_features: frozenset[str] = frozenset(),
) -> str:
    """Registry name of the backend that will run this call (``merged_backward``: see AttentionSpec).
    ``extra_features`` are features the options do not show (``fp8``: attnkit.fp8.features)."""
    num_heads_q, head_dim = q.shape[-2], q.shape[-1]
    spec = AttentionSpec(
        op=op,
        device_type=q.device.type,
        compute_capability=device_capability(q.device),
        is_hip=is_hip() and q.device.type == "cuda",
        dtype=q.dtype,
        head_dim=head_dim,
        head_dim_v=head_dim_v,
        num_heads_q=num_heads_q,
        num_heads_k=num_heads_k,
        batch=batch,
        seqlen_q=seqlen_q,
        seqlen_k=seqlen_k,
        features=features(
            params,
            alibi=alibi,
            gqa=num_heads_q != num_heads_k,
            dv_ne_d=head_dim_v != head_dim,
            requires_grad=requires_grad,
            sink=sink,
        )
        | extra_features,
        requires_grad=requires_grad,
        merged_backward=merged_backward and requires_grad,
    )
    return select_backend_name(spec, backend)


def needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def sink_lse(lse: torch.Tensor, sink: torch.Tensor | None, head_axis: int) -> torch.Tensor:
    """The lse of a call without keys: -inf, or the sink (the only term of the denominator) where one is given."""
    if sink is None:
        return lse
    shape = [1] * lse.dim()
    shape[head_axis] = -1
    return sink.detach().to(lse.dtype).view(shape).expand(lse.shape).clone()


class EmptyAttention(torch.autograd.Function):
    """Output for calls with no queries or no keys: zeros (and lse -inf), with zero gradients."""

    @staticmethod
    def forward(ctx, out_shape, lse_shape, q, k, v):  # type: ignore[override]
        ctx.shapes = (q, k, v)
        out = q.new_zeros(out_shape)
        lse = torch.full(lse_shape, float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):  # type: ignore[override]
        q, k, v = ctx.shapes
        return None, None, torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
