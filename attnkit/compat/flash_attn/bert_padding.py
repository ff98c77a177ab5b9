"""flash-attn's ``bert_padding`` helpers: remove padding tokens before varlen attention and put them back after."""

from __future__ import annotations

import torch

from ...errors import InvalidArgumentError


def index_first_axis(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``x.reshape(-1, *x.shape[2:])[indices]`` for a ``(batch, seqlen, ...)`` tensor; differentiable."""
    return x.reshape(-1, *x.shape[2:])[indices]


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor, unused_mask: torch.Tensor | None = None):
    """Pack the valid tokens of a padded batch (flash-attn 2.8's return value).

    Args:
        hidden_states: ``(batch, seqlen, ...)``.
        attention_mask: ``(batch, seqlen)`` bool or int, 1 for tokens to keep.
        unused_mask: ``(batch, seqlen)`` or None: tokens that are allocated but unused; they are kept in the packed
            tensor (and in ``cu_seqlens``) but not counted in ``seqused``.

    Returns:
        ``(hidden_states[kept], indices, cu_seqlens, max_seqlen, seqused)``: the packed tokens, their flat indices
        into ``batch * seqlen``, int32 ``(batch + 1,)`` offsets, the longest row (an int), and int32 ``(batch,)``
        counts of the tokens that ``attention_mask`` marks.
    """
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != tuple(hidden_states.shape[:2]):
        raise InvalidArgumentError(
            f"attention_mask must be (batch, seqlen) = {tuple(hidden_states.shape[:2])}, got "
            f"{tuple(attention_mask.shape)}"
        )
    kept = attention_mask.bool() if unused_mask is None else attention_mask.bool() | unused_mask.bool()
    seqlens = kept.sum(dim=-1, dtype=torch.int32)
    seqused = attention_mask.bool().sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(kept.flatten(), as_tuple=False).flatten()
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0
    return index_first_axis(hidden_states, indices), indices, cu_seqlens, max_seqlen, seqused


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of :func:`unpad_input`: ``(total, ...)`` back to ``(batch, seqlen, ...)`` with zeros at padding."""
    out = hidden_states.new_zeros((batch * seqlen, *hidden_states.shape[1:]))
    out = out.index_put((indices,), hidden_states)  # out of place, so autograd sees a plain scatter
    return out.view(batch, seqlen, *hidden_states.shape[1:])
