"""``attnkit.sdpa``: ``torch.nn.functional.scaled_dot_product_attention``'s signature, layout and semantics.

Tensors are ``(batch, heads, seqlen, headdim)`` (or ``(heads, seqlen, headdim)``), ``is_causal`` is aligned to the
top-left corner as in PyTorch, GQA needs ``enable_gqa=True``. What runs:

* no mask: :func:`attnkit.attention` (top-left causal becomes a window or a key slice when the lengths differ);
* a boolean key-padding mask (one row of keys per batch entry: ``(B, 1, 1, Sk)``, ``(1, 1, Sk)``, ``(1, Sk)``):
  the kept keys of each row are packed and :func:`attnkit.attention_varlen` runs;
* any other mask (per query, per head, additive floats): PyTorch's own SDPA, the backend that supports them.

Differences from PyTorch: a row whose keys are all masked gives 0 (PyTorch's math kernel gives NaN), and dropout
draws attnkit's reproducible mask (``torch.manual_seed`` repeats it) rather than PyTorch's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import validation
from ..errors import InvalidArgumentError, InvalidArgumentTypeError
from .attention import attention
from .varlen import attention_varlen


def _key_padding(mask: torch.Tensor, batch: int, seqlen_k: int) -> torch.Tensor | None:
    """The (batch, seqlen_k) keep-mask when a boolean mask only says which keys exist; else None."""
    if mask.dtype != torch.bool or not 2 <= mask.dim() <= 4 or mask.shape[-1] != seqlen_k:
        return None
    shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    if shape[1] != 1 or shape[2] != 1 or shape[0] not in (1, batch):
        return None
    return mask.reshape(shape[0], seqlen_k).expand(batch, seqlen_k)


def sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    backend: str | Sequence[str] = "auto",
) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` (same arguments and result).

    Args:
        query: ``(B, Hq, Sq, D)`` or ``(Hq, Sq, D)``; key ``(B, Hk, Sk, D)``; value ``(B, Hk, Sk, Dv)``.
        attn_mask: boolean (True = attend) or additive float mask broadcastable to ``(B, Hq, Sq, Sk)``.
        dropout_p: applied whenever > 0, as in PyTorch (pass 0.0 in evaluation).
        is_causal: top-left aligned causal mask (query ``i`` sees keys ``j <= i``); not together with a mask.
        scale: default ``1 / sqrt(D)``.
        enable_gqa: allow ``Hq != Hk`` (``Hq % Hk == 0``; K/V heads are never copied).
        backend: attnkit's backend request for the calls attnkit runs itself.

    Returns:
        ``(B, Hq, Sq, Dv)`` (or ``(Hq, Sq, Dv)``).
    """
    query = validation.tensor("query", query, (3, 4))
    key = validation.tensor("key", key, query.dim())
    value = validation.tensor("value", value, query.dim())
    if not isinstance(is_causal, bool) or not isinstance(enable_gqa, bool):
        raise InvalidArgumentTypeError(f"is_causal and enable_gqa must be bools, got {is_causal!r}, {enable_gqa!r}")
    if attn_mask is not None and is_causal:
        raise InvalidArgumentError("attn_mask and is_causal=True cannot be combined (as in PyTorch's SDPA)")
    if query.shape[-3] != key.shape[-3] and not enable_gqa:
        raise InvalidArgumentError(
            f"query has {query.shape[-3]} heads but key has {key.shape[-3]}; pass enable_gqa=True for grouped-query "
            "attention"
        )
    squeeze = query.dim() == 3
    if squeeze:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
    batch, _, seqlen_q, _ = query.shape
    seqlen_k = key.shape[2]
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise InvalidArgumentTypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        keep = _key_padding(attn_mask, batch, seqlen_k)
        if keep is None:  # a general mask: PyTorch's kernels take those
            out = torch.nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask=attn_mask,
                dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa,
            )  # fmt: skip
            return out.squeeze(0) if squeeze else out
        out = _key_padded(query, key, value, keep, dropout_p, scale, backend)
        return out.squeeze(0) if squeeze else out
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    window = (-1, -1)
    if is_causal and seqlen_q > seqlen_k:
        window, is_causal = (-1, seqlen_q - seqlen_k), False  # top-left diagonal as a bottom-right window
    elif is_causal and seqlen_q < seqlen_k:
        k, v = k[:, :seqlen_q], v[:, :seqlen_q]  # keys past the last query's index are never visible
    out = attention(
        q, k, v, causal=is_causal, window_size=window, softmax_scale=scale, dropout_p=dropout_p, backend=backend
    )
    out = out.transpose(1, 2)
    return out.squeeze(0) if squeeze else out


def _key_padded(query, key, value, keep: torch.Tensor, dropout_p, scale, backend) -> torch.Tensor:
    batch, heads_q, seqlen_q, _ = query.shape
    lengths = keep.sum(dim=-1, dtype=torch.int32)
    cu_k = torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    cu_q = torch.arange(0, (batch + 1) * seqlen_q, seqlen_q, dtype=torch.int32, device=query.device)
    idx = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
    q = query.transpose(1, 2).reshape(batch * seqlen_q, heads_q, -1)
    k = key.transpose(1, 2).reshape(-1, *key.shape[1:2], key.shape[-1])[idx]
    v = value.transpose(1, 2).reshape(-1, *value.shape[1:2], value.shape[-1])[idx]
    longest = int(lengths.max()) if lengths.numel() else 0
    out = attention_varlen(
        q, k, v, cu_q, cu_k, seqlen_q, longest, softmax_scale=scale, dropout_p=dropout_p, backend=backend
    )
    return out.view(batch, seqlen_q, heads_q, -1).transpose(1, 2)
