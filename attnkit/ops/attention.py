"""``attnkit.attention``: dense (batch, seqlen, heads, headdim) attention."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import fp8, validation
from .. import sink as sink_rule
from . import _common, _fastcall, _fp8_library, _library


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
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
    """Exact softmax attention, flash-attn 2.x semantics.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``.
        k: ``(batch, seqlen_k, nheads_k, headdim)``; ``nheads % nheads_k == 0`` (MQA/GQA, K/V never repeated).
        v: ``(batch, seqlen_k, nheads_k, headdim_v)``; ``headdim_v`` may differ from ``headdim``.
        causal: causal mask, aligned to the bottom-right corner of the score matrix. With seqlen_q=2, seqlen_k=5
            (1 = attended)::

                1 1 1 1 0
                1 1 1 1 1

            and with seqlen_q=5, seqlen_k=2 the first three rows see no key (their output is 0)::

                0 0
                0 0
                0 0
                1 0
                1 1
        softmax_scale: defaults to ``1 / sqrt(headdim)``.
        window_size: ``(left, right)``; query ``i`` sees keys ``j`` with
            ``i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right``; -1 means unbounded.
            ``causal=True`` sets ``right = 0``.
        alibi_slopes: float32 ``(nheads,)`` or ``(batch, nheads)``; adds ``-slope * |i + seqlen_k - seqlen_q - j|``.
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)`` (before ALiBi).
        dropout_p: dropout probability on the attention weights (pass 0.0 in eval). The mask comes from a seed
            drawn from PyTorch's default generator, so ``torch.manual_seed`` makes it reproducible.
        deterministic: make the backward pass bitwise reproducible (may be slower).
        return_lse: also return the log-sum-exp of the scores, ``(batch, nheads, seqlen_q)`` float32, natural log
            (-inf for rows that see no key; with a sink it includes ``exp(sink)``).
        backend: ``"auto"``, a backend name (``reference``, ``triton``, ``triton_cuda``, ``triton_rocm``,
            ``cupy_cuda``) or an ordered list of names.
        learnable_sink: float32 ``(nheads,)``: one logit per query head that joins the softmax denominator only
            (attention sinks, flash-attn 4's name; transformers' ``s_aux``). Differentiable.
        q_descale, k_descale, v_descale: for float8_e4m3fn q, k, v (FlashAttention-3's convention, see
            :mod:`attnkit.fp8`): float32 ``(batch, nheads_k)``, real value = fp8 value * descale; None means 1.
            fp8 calls are forward only.
        out_dtype: output dtype of fp8 calls (bfloat16, the default, float16 or float32).

    Returns:
        ``out`` of shape ``(batch, seqlen_q, nheads, headdim_v)`` in q's dtype (``out_dtype`` for fp8 inputs), or
        ``(out, lse)``.
    """
    key = _fastcall.attention_key(
        q, k, v, causal, softmax_scale, window_size, softcap, dropout_p, deterministic, return_lse, backend,
        alibi_slopes is None and learnable_sink is None and q_descale is None and k_descale is None
        and v_descale is None and out_dtype is None,
    )  # fmt: skip
    hit = _fastcall.lookup(key)
    if hit is not None:
        out, lse = _run_resolved(hit, q, k, v)
        return (out, lse) if return_lse else out
    q = validation.tensor("q", q, 4)
    k = validation.tensor("k", k, 4)
    v = validation.tensor("v", v, 4)
    is_fp8 = fp8.same_dtype_device({"q": q, "k": k, "v": v})
    validation.heads_and_dims(q.shape, k.shape, v.shape, seq_axis=1)
    validation.last_dim_contiguous({"q": q, "k": k, "v": v})
    batch, seqlen_q, num_heads_q, head_dim = q.shape
    seqlen_k, num_heads_k = k.shape[1], k.shape[2]
    params = _common.resolve_params(
        head_dim=head_dim,
        causal=causal,
        softmax_scale=softmax_scale,
        window_size=window_size,
        softcap=softcap,
        dropout_p=dropout_p,
        deterministic=deterministic,
        seqlen_q=seqlen_q,
        seqlen_k=seqlen_k,
    )
    slopes = validation.alibi_slopes(alibi_slopes, batch, num_heads_q, q.device)
    validation.flag("return_lse", return_lse)
    sink = sink_rule.validate(learnable_sink, num_heads_q, q.device)
    requires_grad = _common.needs_grad(q, k, v) or (sink is not None and _common.needs_grad(sink))
    fp8.no_sink(is_fp8, sink is not None)
    scales = fp8.scales(
        is_fp8, {"q": q, "k": k, "v": v}, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
        out_dtype=out_dtype, batch=batch, num_heads_k=num_heads_k, requires_grad=requires_grad,
    )  # fmt: skip
    chosen = _common.choose(
        "attention",
        backend,
        q=q,
        head_dim_v=v.shape[-1],
        num_heads_k=num_heads_k,
        batch=batch,
        seqlen_q=seqlen_q,
        seqlen_k=seqlen_k,
        params=params,
        alibi=slopes is not None,
        requires_grad=requires_grad,
        sink=sink is not None,
        fp8=scales is not None,
    )
    if scales is not None:
        out, lse = _fp8_library.forward(
            q, k, v, None, None, seqlen_q, seqlen_k, slopes, params, scales, chosen,
            (batch, seqlen_q, num_heads_q, v.shape[-1]), (batch, num_heads_q, seqlen_q),
            _common.dropout_seed_tensor(params),
        )  # fmt: skip
    elif q.numel() == 0 or seqlen_k == 0:
        out, lse = _common.EmptyAttention.apply(
            (batch, seqlen_q, num_heads_q, v.shape[-1]), (batch, num_heads_q, seqlen_q), q, k, v
        )
        lse = _common.sink_lse(lse, sink, head_axis=1)
    else:
        out, lse = _library.attention_forward(
            q, k, v, None, None, seqlen_q, seqlen_k, slopes,
            params.softmax_scale, params.causal, params.window_left, params.window_right, params.softcap,
            params.dropout_p, params.dropout_seed, params.deterministic, chosen, sink,
            _common.dropout_seed_tensor(params),
        )  # fmt: skip
        if not is_fp8 and slopes is None and sink is None:  # the key's preconditions hold: reuse the decision
            _fastcall.remember(key, params, chosen, requires_grad, q, k, v, return_lse)
    return (out, lse) if return_lse else out


def _run_resolved(hit: _fastcall.Resolved, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """A repeated call: straight to the backend when nothing else would see the op (see _fastcall), else the op."""
    if not hit.requires_grad and _fastcall.no_modes():
        if hit.runner is not None:
            return hit.runner(q, k, v)
        out, lse = hit.backend.forward(q, k, v, None, hit.params, None)
        return out.contiguous(), lse.contiguous()
    p = hit.params
    return _library.attention_forward(
        q, k, v, None, None, q.shape[1], k.shape[1], None, p.softmax_scale, p.causal, p.window_left,
        p.window_right, p.softcap, 0.0, 0, p.deterministic, hit.backend_name, None, None,
    )  # fmt: skip
