"""Pieces shared by the public operators: spec construction, option resolution, empty inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import dispatch, validation
from .. import dropout as dropout_rng
from ..params import AttentionParams, lse_dtype
from ..spec import feature_bits as spec_feature_bits

# Seeds are 63-bit non-negative integers; this one stands for "the seed tensor passed beside it" (see below).
TRACED_SEED = -1


def dropout_seed_tensor(params: AttentionParams) -> torch.Tensor | None:
    """The dropout seed of a call traced by torch.compile, drawn in the graph (each run draws anew, from PyTorch's
    default generator through inductor's RNG): a Python int cannot be drawn there without a graph break. None for
    eager calls, whose seed is ``params.dropout_seed``."""
    if params.dropout_seed != TRACED_SEED:
        return None
    return torch.randint(0, 2**63 - 1, (), dtype=torch.int64)


def resolve_params(
    *,
    head_dim: int,
    causal: bool,
    softmax_scale: float | None,
    window_size: Sequence[int],
    softcap: float,
    dropout_p: float,
    deterministic: bool,
    seqlen_q: int | None = None,
    seqlen_k: int | None = None,
) -> AttentionParams:
    """``seqlen_q``/``seqlen_k``: the longest query and key sequence of the call, when known; window bounds no
    pair can reach then become -1 (unbounded), so backends never see bounds near their integer limits."""
    left, right = validation.window(window_size, causal)
    left, right = validation.reachable_window(left, right, seqlen_q, seqlen_k)
    p = validation.dropout_p(dropout_p)
    validation.flag("deterministic", deterministic)
    return AttentionParams(
        softmax_scale=validation.softmax_scale(softmax_scale, head_dim),
        causal=causal,
        window_left=left,
        window_right=right,
        softcap=validation.softcap(softcap),
        dropout_p=p,
        dropout_seed=(TRACED_SEED if torch.compiler.is_compiling() else dropout_rng.draw_seed()) if p > 0 else 0,
        deterministic=deterministic,
    )


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
    fp8: bool = False,
) -> str:
    """What the custom op is told about the backend: in eager mode the registry name of the backend that will run
    this call (raising now when none can); while ``torch.compile`` traces the call, a request token, and the op
    decides when it runs (see :mod:`attnkit.dispatch`). ``merged_backward``: see AttentionSpec; ``fp8``: float8_e4m3fn
    inputs with descales (attnkit.fp8), a feature the options do not show."""
    merged_backward = merged_backward and requires_grad
    if torch.compiler.is_compiling():
        token = dispatch.traced_token(backend, requires_grad, merged_backward)
        dispatch.raise_for_token(token)
        return token
    num_heads_q, head_dim = q.shape[-2], q.shape[-1]
    bits = spec_feature_bits(
        params.causal, params.has_window, alibi, params.softcap > 0, params.dropout_p > 0, num_heads_q != num_heads_k,
        head_dim_v != head_dim, params.deterministic and requires_grad, sink, fp8,
    )  # fmt: skip
    return dispatch.decide(
        dispatch.request_token(backend), op, q.device, q.dtype, head_dim, head_dim_v, num_heads_q, num_heads_k, batch,
        seqlen_q, seqlen_k, bits, requires_grad, merged_backward,
    )  # fmt: skip


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
