"""``attnkit.attention_varlen``: attention over packed variable-length sequences."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from .. import fp8, validation
from .. import sink as sink_rule
from ..errors import InvalidArgumentError
from . import _common, _fp8_library, _library


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    alibi_slopes: torch.Tensor | None = None,
    softcap: float = 0.0,
    dropout_p: float = 0.0,
    deterministic: bool = False,
    return_lse: bool = False,
    backend: str | Sequence[str] = "auto",
    learnable_sink: torch.Tensor | None = None,
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over packed sequences (flash-attn's ``flash_attn_varlen_func``).

    Args:
        q: ``(total_q, nheads, headdim)``: the queries of every sequence, one after another.
        k: ``(total_k, nheads_k, headdim)``; v: ``(total_k, nheads_k, headdim_v)``.
        cu_seqlens_q, cu_seqlens_k: int32 ``(batch + 1,)`` offsets: sequence ``b`` owns rows
            ``cu_seqlens[b]:cu_seqlens[b + 1]``. Both must describe the same number of sequences.
        max_seqlen_q, max_seqlen_k: the longest sequence lengths (checked against the offsets).
        Other keywords as in :func:`attnkit.attention`; masks are aligned per sequence (bottom-right), and
        ``alibi_slopes`` may be ``(nheads,)`` or ``(batch, nheads)``; ``learnable_sink`` float32 ``(nheads,)``; with
        float8_e4m3fn inputs the descales are ``(batch, nheads_k)``, one row per sequence (see :mod:`attnkit.fp8`).

    Returns:
        ``out`` ``(total_q, nheads, headdim_v)``, or ``(out, lse)`` with lse ``(nheads, total_q)`` float32.
    """
    q = validation.tensor("q", q, 3)
    k = validation.tensor("k", k, 3)
    v = validation.tensor("v", v, 3)
    is_fp8 = fp8.same_dtype_device({"q": q, "k": k, "v": v})
    validation.heads_and_dims(q.shape, k.shape, v.shape, seq_axis=None)
    validation.last_dim_contiguous({"q": q, "k": k, "v": v})
    # The offsets as lists (None while torch.compile traces the call: then checked on the device).
    cq = validation.cu_seqlens("cu_seqlens_q", cu_seqlens_q, "max_seqlen_q", max_seqlen_q, q.shape[0], q.device)
    ck = validation.cu_seqlens("cu_seqlens_k", cu_seqlens_k, "max_seqlen_k", max_seqlen_k, k.shape[0], q.device)
    batch = cu_seqlens_q.shape[0] - 1
    if cu_seqlens_k.shape[0] - 1 != batch:
        raise InvalidArgumentError(
            f"cu_seqlens_q has {batch} sequences but cu_seqlens_k has {cu_seqlens_k.shape[0] - 1}; they must match"
        )
    # Every backend reads the offsets as a dense int32 array (the Triton and CuPy kernels index them directly):
    # hand over a contiguous copy of a strided or offset view.
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    # Backends size their grids by max_seqlen: pass on the longest sequence, not a larger claim (max_seqlen_q=10**6
    # over 16 tokens kept the Triton kernels busy for minutes).
    if cq is not None:
        max_seqlen_q = max(b - a for a, b in itertools.pairwise(cq))
        max_seqlen_k = max(b - a for a, b in itertools.pairwise(ck))
    else:  # traced by torch.compile: the offsets stay on the device, and no sequence outgrows the packed tensor
        max_seqlen_q, max_seqlen_k = min(max_seqlen_q, q.shape[0]), min(max_seqlen_k, k.shape[0])
    num_heads_q, head_dim = q.shape[1], q.shape[2]
    params = _common.resolve_params(
        head_dim=head_dim,
        causal=causal,
        softmax_scale=softmax_scale,
        window_size=window_size,
        softcap=softcap,
        dropout_p=dropout_p,
        deterministic=deterministic,
        seqlen_q=max_seqlen_q,
        seqlen_k=max_seqlen_k,
    )
    slopes = validation.alibi_slopes(alibi_slopes, batch, num_heads_q, q.device)
    validation.flag("return_lse", return_lse)
    sink = sink_rule.validate(learnable_sink, num_heads_q, q.device)
    requires_grad = _common.needs_grad(q, k, v) or (sink is not None and _common.needs_grad(sink))
    fp8.no_sink(is_fp8, sink is not None)
    scales = fp8.scales(
        is_fp8, {"q": q, "k": k, "v": v}, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
        out_dtype=out_dtype, batch=batch, num_heads_k=k.shape[1], requires_grad=requires_grad,
    )  # fmt: skip
    chosen = _common.choose(
        "varlen",
        backend,
        q=q,
        head_dim_v=v.shape[-1],
        num_heads_k=k.shape[1],
        batch=batch,
        seqlen_q=max_seqlen_q,
        seqlen_k=max_seqlen_k,
        params=params,
        alibi=slopes is not None,
        requires_grad=requires_grad,
        sink=sink is not None,
        fp8=scales is not None,
    )
    if scales is not None:
        out, lse = _fp8_library.forward(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, slopes, params, scales, chosen,
            (q.shape[0], num_heads_q, v.shape[-1]), (num_heads_q, q.shape[0]), _common.dropout_seed_tensor(params),
        )  # fmt: skip
    elif q.shape[0] == 0 or max_seqlen_q == 0 or max_seqlen_k == 0:
        out, lse = _common.EmptyAttention.apply(
            (q.shape[0], num_heads_q, v.shape[-1]), (num_heads_q, q.shape[0]), q, k, v
        )
        if max_seqlen_q > 0:  # rows of a sequence without keys have lse = sink; padding rows stay -inf
            lse = _varlen_sink_lse(lse, sink, cu_seqlens_q)
    else:
        out, lse = _library.attention_forward(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, slopes,
            params.softmax_scale, params.causal, params.window_left, params.window_right, params.softcap,
            params.dropout_p, params.dropout_seed, params.deterministic, chosen, sink,
            _common.dropout_seed_tensor(params),
        )  # fmt: skip
    return (out, lse) if return_lse else out


def _varlen_sink_lse(lse: torch.Tensor, sink: torch.Tensor | None, cu_seqlens_q: torch.Tensor) -> torch.Tensor:
    if sink is None:
        return lse
    # A mask rather than a slice up to cu_seqlens_q[-1]: no read-back, so it traces under torch.compile too.
    rows = torch.arange(lse.shape[1], device=lse.device) < cu_seqlens_q[-1]
    return torch.where(rows[None, :], sink.detach().to(lse.dtype)[:, None], lse)
