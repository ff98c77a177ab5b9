"""Hugging Face transformers integration: ``attn_implementation="attnkit"``.

Importing this module (or calling :func:`register`, which is idempotent) adds ``"attnkit"`` to transformers'
``AttentionInterface`` and ``AttentionMaskInterface``. The mask entry matters: a name missing from the mask
registry makes transformers skip the padding mask silently. Then::

    import attnkit.integrations.transformers
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="attnkit")
    model.set_attn_implementation("attnkit")            # or switch a loaded model

The attention function follows transformers' flash-attention path: the mask function passes on the 2D padding mask
(or None when nothing is padded), the attention function unpads to :func:`attnkit.attention_varlen`; packed batches
come through ``cu_seq_lens_q/k`` with ``max_length_q/k`` or through ``position_ids`` that restart; ``sliding_window``
becomes ``window_size=(sliding_window - 1, sliding_window - 1)`` (causal keeps only the left bound); ``softcap``,
dropout (in training) and ``s_aux`` (attention sinks, as :func:`attnkit.attention`'s ``learnable_sink``) pass
through. A 4D mask given by the caller goes to :func:`attnkit.sdpa`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import InvalidArgumentError
from ..ops.attention import attention
from ..ops.varlen import attention_varlen

NAME = "attnkit"
INSTALL_HINT = "pip install transformers"


def padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """transformers' mask hook: the 2D padding mask of the last ``kv_length`` keys, or None if nothing is padded.

    Causality, sliding windows and packing are not encoded here: the attention function gets them as arguments.
    """
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def _int32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.int32 else x.to(torch.int32)


def _offsets(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Flat indices of the kept tokens, int32 offsets and the longest row of a (batch, seqlen) mask."""
    lengths = mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    cu = torch.nn.functional.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    return indices, cu, int(lengths.max()) if lengths.numel() else 0


def _restarting_positions(position_ids: torch.Tensor | None, batch: int) -> bool:
    """True when one row packs several sequences: its positions are not a single increasing range."""
    if position_ids is None or batch != 1 or position_ids.shape[-1] <= 1:
        return False
    pos = position_ids.reshape(-1)
    return bool((pos != torch.arange(pos.numel(), device=pos.device) + pos.min()).any())


def _packed_offsets(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Offsets of the packed sequences of one row: a sequence starts wherever the position is the smallest."""
    pos = position_ids.reshape(-1)
    starts = torch.nonzero(pos == pos.min(), as_tuple=False).flatten().to(torch.int32)
    cu = torch.cat((starts, torch.tensor([pos.numel()], dtype=torch.int32, device=pos.device)))
    return cu, int((cu[1:] - cu[:-1]).max())


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature. query ``(B, Hq, Sq, D)``, key/value ``(B, Hk, Sk, D)`` (K/V
    heads not repeated). Returns ``((B, Sq, Hq, Dv) contiguous, None)``: attention weights are never formed."""
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if attention_mask is not None and attention_mask.dim() == 4:
        from ..ops.sdpa import sdpa

        out = sdpa(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1],
        )  # fmt: skip
        return out.transpose(1, 2).contiguous(), None
    options = dict(
        causal=bool(is_causal),
        softmax_scale=scaling,
        window_size=(-1, -1) if sliding_window is None else (sliding_window - 1, sliding_window - 1),
        softcap=0.0 if softcap is None else float(softcap),
        dropout_p=float(dropout),
        learnable_sink=None if s_aux is None else s_aux.float(),
    )
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, S, H, D) views
    batch, seqlen_q, heads_q = q.shape[0], q.shape[1], q.shape[2]
    if attention_mask is not None:
        return _padded(q, k, v, attention_mask, options), None
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    if all(x is not None for x in (cu_q, cu_k, max_q, max_k)):
        out = attention_varlen(
            q.reshape(-1, heads_q, q.shape[-1]), k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:]),
            _int32(cu_q), _int32(cu_k), int(max_q), int(max_k), **options,
        )  # fmt: skip
        return out.view(batch, seqlen_q, heads_q, -1), None
    position_ids = kwargs.get("position_ids")
    if _restarting_positions(position_ids, batch):
        cu, longest = _packed_offsets(position_ids)
        out = attention_varlen(q[0], k[0], v[0], cu, cu, longest, longest, **options)
        return out.unsqueeze(0), None
    return attention(q, k, v, **options).contiguous(), None


def _padded(q, k, v, mask: torch.Tensor, options: dict) -> torch.Tensor:
    """Unpad to varlen, attend, pad back: query rows that are padding come out 0."""
    batch, seqlen_q, heads_q, _ = q.shape
    if mask.dim() != 2 or mask.shape[0] != batch:
        raise InvalidArgumentError(f"attention_mask must be a (batch, seqlen) padding mask, got {tuple(mask.shape)}")
    mask = mask.bool()
    if k.shape[1] > mask.shape[1]:  # a static cache is longer than the tokens it holds
        k, v = k[:, : mask.shape[1]], v[:, : mask.shape[1]]
    if k.shape[1] != mask.shape[1]:
        raise InvalidArgumentError(f"attention_mask covers {mask.shape[1]} keys but there are {k.shape[1]}")
    idx_k, cu_k, max_k = _offsets(mask)
    if seqlen_q == mask.shape[1]:
        idx_q, cu_q, max_q = idx_k, cu_k, max_k
    elif seqlen_q == 1:  # decoding: every row's new token is real
        idx_q = torch.arange(batch, device=q.device)
        cu_q = torch.arange(batch + 1, dtype=torch.int32, device=q.device)
        max_q = 1
    else:  # a chunk of new queries sits at the end of each row (left padding)
        idx_q, cu_q, max_q = _offsets(mask[:, -seqlen_q:])
    q_u = q.reshape(-1, *q.shape[2:])[idx_q]
    k_u, v_u = k.reshape(-1, *k.shape[2:])[idx_k], v.reshape(-1, *v.shape[2:])[idx_k]
    out = attention_varlen(q_u, k_u, v_u, cu_q, cu_k, max_q, max_k, **options)
    full = out.new_zeros((batch * seqlen_q, heads_q, out.shape[-1]))
    full = full.index_put((idx_q,), out)
    return full.view(batch, seqlen_q, heads_q, -1)


def register(name: str = NAME) -> None:
    """Add ``name`` to transformers' attention and mask registries (calling it again changes nothing)."""
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
    except ImportError as exc:  # pragma: no cover - exercised only without transformers
        raise ImportError(f"attnkit.integrations.transformers needs transformers ({INSTALL_HINT})") from exc
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, padding_mask)


register()
